"""The fused operators. Each public function here runs a compiled kernel (torch.ops.exaone_ext.*)
on CPU or CUDA, is differentiable, works under torch.compile, and has a plain-PyTorch twin of the
same name in exaone_ext.ops.reference."""
from . import reference
from ._dispatch import has_kernel
from .attention import flash_attn, flash_attn_varlen, flash_attn_with_kvcache
from .swiglu import swiglu

__all__ = [
    "reference", "has_kernel", "flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache", "swiglu",
]
