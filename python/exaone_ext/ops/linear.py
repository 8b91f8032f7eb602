"""Linear layer without bias, y = x @ weight.T, fast for decode (a few rows against a large weight)."""
from __future__ import annotations

import math

import torch

from . import reference
from ._dispatch import autocast, check_tensor, has_kernel

_ops = torch.ops.exaone_ext


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], the same as nn.Linear(in, out, bias=False).

    Same dtype (float32, bfloat16, float16; float64 on CPU) and device for both (under torch.autocast
    both are cast to its dtype first, as F.linear is). On CPU, up to 16
    rows of x (decode) stream the weight once at memory bandwidth with float32 accumulation; more
    rows (prefill) and CUDA use the library matrix multiply. Differentiable in both inputs.
    """
    check_tensor(x, "x", "linear")
    check_tensor(weight, "weight", "linear")
    x, weight = autocast(x, weight)
    if not has_kernel(x):
        return reference.linear(x, weight)
    return _ops.linear(x, weight)


def linear_cat(x: torch.Tensor, weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x [..., in] @ cat(weights).T -> [..., sum of out_i], without concatenating the weights: e.g.
    the q, k and v projections (or the gate and up projections) of a layer in one call. For decode
    on CPU the weights stream in one parallel pass, as one long weight would; the outputs of each
    weight are the same as linear(x, weight) gives. Differentiable in x and every weight."""
    check_tensor(x, "x", "linear_cat")
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"exaone_ext.linear_cat: 'weights' must be a list or tuple of tensors, "
                        f"got {type(weights).__name__}")
    for i, w in enumerate(weights):
        check_tensor(w, f"weights[{i}]", "linear_cat")
    x, *weights = autocast(x, *weights)
    if not has_kernel(x):
        return reference.linear_cat(x, list(weights))
    return _ops.linear_cat(x, list(weights))


@torch.library.register_fake("exaone_ext::linear")
def _(x, weight):
    torch._check(weight.dim() == 2, lambda: "exaone_ext.linear: 'weight' must be 2-dimensional")
    torch._check(x.dim() >= 1, lambda: "exaone_ext.linear: 'x' must have at least 1 dimension")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: "exaone_ext.linear: the last dimension of 'x' must equal in_features of 'weight'")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] (reshape(-1, n) cannot infer the rows when n is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


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
        dw = torch.matmul(_rows(grad).t(), _rows(x))                       # [out, in]
    return dx, dw


torch.library.register_autograd("exaone_ext::linear", _backward, setup_context=_setup)


@torch.library.register_fake("exaone_ext::linear_cat")
def _(x, weights):
    torch._check(len(weights) > 0, lambda: "exaone_ext.linear_cat: 'weights' must hold at least one weight")
    for w in weights:
        torch._check(w.dim() == 2, lambda: "exaone_ext.linear_cat: every weight must be 2-dimensional")
        torch._check(x.shape[-1] == w.shape[1],
                     lambda: "exaone_ext.linear_cat: the last dimension of 'x' must equal in_features of every weight")
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def _setup_cat(ctx, inputs, output):
    x, weights = inputs
    ctx.sizes = [w.shape[0] for w in weights]
    ctx.save_for_backward(x, *weights)


def _backward_cat(ctx, grad):
    x, *weights = ctx.saved_tensors
    grads = grad.split(ctx.sizes, dim=-1)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = sum(torch.matmul(g, w) for g, w in zip(grads, weights))          # [..., out_i] @ [out_i, in]
    x2 = _rows(x)
    needs_w = ctx.needs_input_grad[1]  # one flag per weight: frozen weights get no gradient computed
    dws = [torch.matmul(_rows(g).t(), x2) if need else None                     # [out_i, in]
           for g, need in zip(grads, needs_w)]
    return dx, dws


torch.library.register_autograd("exaone_ext::linear_cat", _backward_cat, setup_context=_setup_cat)
