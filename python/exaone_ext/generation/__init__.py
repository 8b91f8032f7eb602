"""Text generation for EXAONE models: decoding controls, sampling, batched generate and streaming.

    from exaone_ext.generation import GenerationConfig, generate, stream
"""
from .config import GenerationConfig
from .engine import GenerationResult, GenerationStats, TextStream, generate, prepare_prompts, stream
from .history import trim_history
from .sampling import process_logits, select_next_tokens

__all__ = ["GenerationConfig", "GenerationResult", "GenerationStats", "TextStream", "generate", "stream",
           "prepare_prompts", "process_logits", "select_next_tokens", "trim_history"]
