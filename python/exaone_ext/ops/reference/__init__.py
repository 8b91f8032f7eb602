"""Every exaone_ext op in plain PyTorch: the oracle in tests, the baseline in benchmarks and the
fallback on devices without a compiled kernel. Importable without the compiled extension's kernels
being used, and written for clarity rather than speed."""
from .swiglu import swiglu

__all__ = ["swiglu"]
