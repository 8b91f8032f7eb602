"""The EXAONE 3.5 model: config and presets, the decoder, its KV cache, and Hugging Face checkpoints
(EXAONE or Llama tensor names) in and out.

    from exaone_ext.model import ExaoneForCausalLM, KVCache
    model = ExaoneForCausalLM.from_pretrained("EXAONE-3.5-2.4B-Instruct", dtype=torch.bfloat16)
    logits = model(input_ids)                       # [b, s, vocab] float32
    convert_checkpoint(src, dst, to="llama")        # the same weights under Llama names
    checkpoint_info(path)                           # shapes, parameter count, dtypes, memory needed
"""
from .checkpoint import (CheckpointError, checkpoint_info, convert_checkpoint, detect_naming,
                         exaone_to_llama_name, llama_to_exaone_name, parse_size)
from .config import ConfigError, ExaoneConfig
from .kv_cache import KVCache
from .modeling import ExaoneForCausalLM

__all__ = [
    "CheckpointError", "ConfigError", "ExaoneConfig", "ExaoneForCausalLM", "KVCache", "checkpoint_info",
    "convert_checkpoint", "detect_naming", "exaone_to_llama_name", "llama_to_exaone_name", "parse_size",
]
