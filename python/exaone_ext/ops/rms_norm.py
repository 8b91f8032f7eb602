"""Fused RMSNorm and residual-add + RMSNorm, computed the way EXAONE does: normalise in float32,
cast back to x's dtype, then apply the weight."""
from __future__ import annotations

import math

import torch

from . import reference
from ._dispatch import check_tensor, has_kernel

_ops = torch.ops.exaone_ext


def _check_eps(eps, op: str) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:   # the common case first (every call)
        return eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"exaone_ext.{op}: 'eps' must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"exaone_ext.{op}: 'eps' must be a finite number > 0, got {eps}")
    return eps


def _check_device(t: torch.Tensor, name: str, x: torch.Tensor, op: str) -> None:
    if not (t.is_cpu and x.is_cpu) and t.device != x.device:
        raise ValueError(f"exaone_ext.{op}: '{name}' must be on the same device as 'x' ({x.device}), got {t.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)).to(x.dtype).

    x: [..., hidden] float32 / bfloat16 / float16 (float64 on CPU); weight: [hidden], float32,
    bfloat16 or float16 (need not match x). Returns y with x's shape and dtype. Differentiable in
    x and weight; the weight gradient is summed in a fixed order (bitwise reproducible).
    """
    check_tensor(x, "x", "rms_norm")
    check_tensor(weight, "weight", "rms_norm")
    _check_device(weight, "weight", x, "rms_norm")
    eps = _check_eps(eps, "rms_norm")
    if not has_kernel(x):
        return reference.rms_norm(x, weight, eps)
    return _ops.rms_norm(x, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (in x's dtype), y = rms_norm(h, weight, eps), in one pass. Returns (y, h).

    x, residual: [..., hidden], same shape and dtype (under torch.autocast, different dtypes are
    promoted to the wider one); weight: [hidden]. Differentiable in x, residual and weight; the
    gradient reaching h is the norm's plus the one of the returned h.
    """
    check_tensor(x, "x", "add_rms_norm")
    check_tensor(residual, "residual", "add_rms_norm")
    check_tensor(weight, "weight", "add_rms_norm")
    _check_device(residual, "residual", x, "add_rms_norm")
    _check_device(weight, "weight", x, "add_rms_norm")
    eps = _check_eps(eps, "add_rms_norm")
    if x.dtype != residual.dtype and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # under torch.autocast a projection's 16-bit output meets the float32 residual stream: the
        # sum in the wider dtype, as `residual + x` would be (the stream stays float32)
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    if not has_kernel(x):
        return reference.add_rms_norm(x, residual, weight, eps)
    y, h, _ = _ops.add_rms_norm(x, residual, weight, eps)
    return y, h


def _rstd_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("exaone_ext::rms_norm")
def _(x, weight, eps):
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: "exaone_ext.rms_norm: 'weight' must have shape [hidden] (the last dimension of 'x')")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x)))


@torch.library.register_fake("exaone_ext::add_rms_norm")
def _(x, residual, weight, eps):
    torch._check(residual.shape == x.shape, lambda: "exaone_ext.add_rms_norm: 'residual' must have the same shape as 'x'")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: "exaone_ext.add_rms_norm: 'weight' must have shape [hidden] (the last dimension of 'x')")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x)))


@torch.library.register_fake("exaone_ext::rms_norm_backward")
def _(dy, x, weight, rstd, dh):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    x, weight = inputs[0], inputs[-2]
    rstd = output[-1]
    ctx.mark_non_differentiable(rstd)
    # the normalised input: x for rms_norm, h = x + residual for add_rms_norm
    normed_input = x if len(inputs) == 3 else output[1]
    ctx.save_for_backward(normed_input, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _ops.rms_norm_backward(dy, x, weight, rstd, None)
    return dx, dweight, None


def _add_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh_total, dweight = _ops.rms_norm_backward(dy, h, weight, rstd, dh)
    return dh_total, dh_total, dweight, None


torch.library.register_autograd("exaone_ext::rms_norm", _backward, setup_context=_setup)
torch.library.register_autograd("exaone_ext::add_rms_norm", _add_backward, setup_context=_setup)
