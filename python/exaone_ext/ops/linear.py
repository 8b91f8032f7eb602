"""Linear layer without bias, y = x @ weight.T, fast for decode (a few rows against a large weight)."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_tensor, has_kernel

_ops = torch.ops.exaone_ext


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], the same as nn.Linear(in, out, bias=False).

    Same dtype (float32, bfloat16, float16; float64 on CPU) and device for both. On CPU, up to 16
    rows of x (decode) stream the weight once at memory bandwidth with float32 accumulation; more
    rows (prefill) and CUDA use the library matrix multiply. Differentiable in both inputs.
    """
    check_tensor(x, "x", "linear")
    check_tensor(weight, "weight", "linear")
    if not has_kernel(x.device):
        return reference.linear(x, weight)
    return _ops.linear(x, weight)


@torch.library.register_fake("exaone_ext::linear")
def _(x, weight):
    torch._check(weight.dim() == 2, lambda: "exaone_ext.linear: 'weight' must be 2-dimensional")
    torch._check(x.dim() >= 1, lambda: "exaone_ext.linear: 'x' must have at least 1 dimension")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: "exaone_ext.linear: the last dimension of 'x' must equal in_features of 'weight'")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.matmul(grad, weight)                                   # [..., out] @ [out, in]
    if ctx.needs_input_grad[1]:
        dw = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]))  # [out, in]
    return dx, dw


torch.library.register_autograd("exaone_ext::linear", _backward, setup_context=_setup)
