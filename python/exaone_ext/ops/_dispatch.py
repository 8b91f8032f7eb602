"""Where the compiled kernels run, and the fallback to the references elsewhere."""
from __future__ import annotations

import math
import numbers

import torch

from .. import _C

_CUDA_BUILT = bool(_C.build_info()["cuda"])


def has_kernel(device: torch.device | str | torch.Tensor) -> bool:
    """True when this build has compiled kernels for tensors on `device` (CPU always; CUDA when
    the package was built with CUDA), or for a tensor given in its place: where it lies. Elsewhere
    the public ops run their plain-PyTorch reference."""
    if isinstance(device, torch.Tensor):
        if device.is_cpu:   # the common case, without making a torch.device (every op call asks)
            return True
        device = device.device
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _CUDA_BUILT) or kind == "meta"


def autocast(*tensors):
    """Inside torch.autocast for the tensors' device: the floating tensors (not float64) cast to the
    autocast dtype, as torch's own matmul-like ops are (F.linear, SDPA), so that a model under
    autocast hands the kernels one dtype; the casts are differentiable (gradients of float32 weights
    come back in float32). Outside autocast, or for None, unchanged."""
    for first in tensors:   # the first tensor (a loop: this runs on every op call)
        if isinstance(first, torch.Tensor):
            break
    else:
        return tensors
    kind = first.device.type
    if (kind != "cpu" and kind != "cuda") or not torch.is_autocast_enabled(kind):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"exaone_ext.{op}: '{name}' must be a torch.Tensor, got {type(x).__name__}")


def check_int(value, name: str, op: str) -> int:
    """An integer argument (not a bool) as a Python int; TypeError naming the op otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"exaone_ext.{op}: '{name}' must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_float(value, name: str, op: str) -> float:
    """A finite real argument (int or float, not a bool) as a Python float; TypeError / ValueError
    naming the op otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"exaone_ext.{op}: '{name}' must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"exaone_ext.{op}: '{name}' must be finite, got {value}")
    return value
