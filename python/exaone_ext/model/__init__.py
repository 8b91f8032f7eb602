"""The EXAONE 3.5 model: config and presets, the decoder, its KV cache, and Hugging Face checkpoints
(EXAONE or Llama tensor names) in and out.

    from exaone_ext.model import ExaoneForCausalLM, KVCache
    model = ExaoneForCausalLM.from_pretrained("EXAONE-3.5-2.4B-Instruct", dtype=torch.bfloat16)
    logits = model(input_ids)                       # [b, s, vocab] float32
    hidden = model(input_ids, return_hidden=True)   # [b, s, hidden] after ln_f, for a fused head + loss
    convert_checkpoint(src, dst, to="llama")        # the same weights under Llama names
    checkpoint_info(path)                           # shapes, parameter count, dtypes, memory needed
    ExaoneForCausalLM.from_pretrained("model.gguf")  # llama.cpp's GGUF files too (exaone_ext.model.gguf)
"""
from .checkpoint import (CheckpointError, checkpoint_info, convert_checkpoint, detect_naming,
                         exaone_to_llama_name, llama_to_exaone_name, parse_size)
from .config import ConfigError, ExaoneConfig
from .gguf import GGUFError, convert_gguf, gguf_info
from .kv_cache import KVCache, LayerKVCache
from .layers import Linear, linear_group
from .modeling import Block, ExaoneForCausalLM, ForwardContext, RMSNorm

__all__ = [
    "Block", "CheckpointError", "ConfigError", "ExaoneConfig", "ExaoneForCausalLM", "ForwardContext", "GGUFError",
    "KVCache", "LayerKVCache", "Linear", "RMSNorm", "checkpoint_info", "convert_checkpoint", "convert_gguf",
    "detect_naming", "exaone_to_llama_name", "gguf_info", "linear_group", "llama_to_exaone_name", "parse_size",
]
