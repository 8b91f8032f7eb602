"""Fused SwiGLU: silu(gate) * up, from two tensors or from one gate_up tensor."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_tensor, has_kernel

_ops = torch.ops.exaone_ext


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up.

    gate, up: [..., intermediate], same shape, dtype and device; or
    gate alone: [..., 2 * intermediate] whose last dim holds gate then up (a fused gate/up
    projection), returning [..., intermediate].
    Math in float32 (float64 for float64 inputs); differentiable in both inputs.
    """
    check_tensor(gate, "gate" if up is not None else "gate_up", "swiglu")
    if up is not None:
        check_tensor(up, "up", "swiglu")
    if not has_kernel(gate):
        return reference.swiglu(gate, up)
    if up is None:
        return _ops.swiglu_fused(gate)
    return _ops.swiglu(gate, up)


@torch.library.register_fake("exaone_ext::swiglu")
def _(gate, up):
    torch._check(gate.shape == up.shape, lambda: f"exaone_ext.swiglu: 'up' must have the same shape as 'gate'")
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("exaone_ext::swiglu_backward")
def _(grad, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


@torch.library.register_fake("exaone_ext::swiglu_fused")
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("exaone_ext::swiglu_fused_backward")
def _(grad, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = _ops.swiglu_backward(grad, gate, up)
    return dgate, dup


def _fused_backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _ops.swiglu_fused_backward(grad, gate_up)


torch.library.register_autograd("exaone_ext::swiglu", _backward, setup_context=_setup)
torch.library.register_autograd("exaone_ext::swiglu_fused", _fused_backward, setup_context=_setup)
