"""The fused operators. Each public function here runs a compiled kernel (torch.ops.exaone_ext.*)
on CPU or CUDA, is differentiable, works under torch.compile, and has a plain-PyTorch twin of the
same name in exaone_ext.ops.reference; decode_layers (all the decoder layers against a KV cache in
one call) is the exception: inference only, compiled for the CPU."""
from . import reference
from ._dispatch import has_kernel
from .attention import flash_attn, flash_attn_varlen, flash_attn_with_kvcache
from .decode_layers import decode_layers
from .linear import linear, linear_cat
from .linear_cross_entropy import linear_cross_entropy
from .quant import linear_int4, linear_int4_cat, linear_int8, linear_int8_cat
from .rms_norm import add_rms_norm, rms_norm
from .rope import apply_rope, rope_cos_sin
from .swiglu import swiglu

__all__ = ["reference", "has_kernel", "add_rms_norm", "apply_rope", "decode_layers", "flash_attn", "flash_attn_varlen",
           "flash_attn_with_kvcache", "linear", "linear_cat", "linear_cross_entropy", "linear_int4", "linear_int4_cat",
           "linear_int8", "linear_int8_cat",
           "rms_norm", "rope_cos_sin", "swiglu"]
