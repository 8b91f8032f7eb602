"""Text generation for EXAONE models: decoding controls, sampling, the step-function Engine
(requests joining and leaving a running batch), batched generate and streaming.

    from exaone_ext.generation import Engine, GenerationConfig, generate, stream
"""
from .config import GenerationConfig
from .engine import Engine, Event, GenerationResult, GenerationStats, Request, TextStream, generate, prepare_prompts, stream
from .history import trim_history
from .sampling import process_logits, select_next_tokens

__all__ = ["Engine", "Event", "GenerationConfig", "GenerationResult", "GenerationStats", "Request", "TextStream",
           "generate", "stream", "prepare_prompts", "process_logits", "select_next_tokens", "trim_history"]
