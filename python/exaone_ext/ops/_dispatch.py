"""Where the compiled kernels run, and the fallback to the references elsewhere."""
from __future__ import annotations

import torch

from .. import _C

_CUDA_BUILT = bool(_C.build_info()["cuda"])


def has_kernel(device: torch.device | str) -> bool:
    """True when this build has compiled kernels for tensors on `device` (CPU always; CUDA when
    the package was built with CUDA). Elsewhere the public ops run their plain-PyTorch reference."""
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _CUDA_BUILT) or kind == "meta"


def check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"exaone_ext.{op}: '{name}' must be a torch.Tensor, got {type(x).__name__}")
