"""Every exaone_ext op in plain PyTorch: the oracle in tests, the baseline in benchmarks and the
fallback on devices without a compiled kernel. Written for clarity rather than speed, computing the
way the Hugging Face EXAONE model does."""
from .attention import flash_attn, flash_attn_varlen, flash_attn_with_kvcache
from .decode_layers import decode_layers
from .linear import linear, linear_cat
from .linear_cross_entropy import linear_cross_entropy
from .quant import (dequantize_int4, dequantize_int8, linear_int4, linear_int4_cat, linear_int8, linear_int8_cat,
                    pack_int4, quantize_int4, quantize_int8, unpack_int4)
from .rms_norm import add_rms_norm, rms_norm
from .rope import apply_rope, parse_rope_scaling, rope_cos_sin, rope_inv_freq
from .swiglu import swiglu

__all__ = [
    "add_rms_norm", "apply_rope", "decode_layers", "flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache",
    "linear", "linear_cat", "linear_cross_entropy", "linear_int8", "linear_int4", "linear_int8_cat",
    "linear_int4_cat", "quantize_int8", "quantize_int4",
    "dequantize_int8", "dequantize_int4", "pack_int4", "unpack_int4", "parse_rope_scaling", "rms_norm",
    "rope_cos_sin", "rope_inv_freq", "swiglu",
]
