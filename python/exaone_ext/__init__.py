"""exaone_ext: fused CPU and CUDA kernels, model, checkpoints and generation for EXAONE 3.5.

    import exaone_ext
    exaone_ext.build_info()          # what this build contains and uses on this machine
    from exaone_ext import ops       # apply_rope, swiglu, rms_norm, ... (torch.ops.exaone_ext)
    from exaone_ext.ops import reference  # the same ops in plain PyTorch
"""
from __future__ import annotations

import torch

from ._loader import load_extension as _load_extension

_C = _load_extension()

__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """Package version, the torch version it was built against, whether CUDA kernels are compiled
    in and for which architectures, and the CPU kernel variant and features in use."""
    info = _C.build_info()
    info["torch_runtime_version"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info


def set_cpu_isa(name: str) -> None:
    """Choose the CPU kernel variant: 'auto' (the widest this CPU supports), 'avx512', 'avx2' or
    'scalar'. A variant wider than the CPU supports is refused with ValueError."""
    _C.set_cpu_isa(name)


def get_cpu_isa() -> str:
    """The CPU kernel variant in use."""
    return _C.get_cpu_isa()


# Importing ops registers the fake kernels and autograd formulas on the loaded operators.
from . import ops  # noqa: E402
from . import model  # noqa: E402
from .generation import GenerationConfig, generate, stream  # noqa: E402
from .model import ExaoneConfig, ExaoneForCausalLM, KVCache  # noqa: E402
from .tokenizer import ExaoneTokenizer  # noqa: E402
from .memory import keep_freed_memory  # noqa: E402

__all__ = ["build_info", "set_cpu_isa", "get_cpu_isa", "ops", "model", "ExaoneConfig", "ExaoneForCausalLM",
           "KVCache", "ExaoneTokenizer", "GenerationConfig", "generate", "stream", "keep_freed_memory", "__version__"]
