"""Linear layers with quantized weights (int8 per output channel, int4 in groups with zero points),
fast for decode: the quantized bytes are streamed once and dequantised in registers. Formats and
quantisers: exaone_ext.ops.reference.quant."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import autocast, check_tensor, has_kernel

_ops = torch.ops.exaone_ext


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (qweight int8 [out, in] * scales[out, None]).T -> [..., out] in x's dtype.

    x float32, bfloat16 or float16; scales float32 or x's dtype. Up to 16 rows of x stream the
    weight once (float32 accumulation); more rows multiply tiles of the dequantised weight.
    Differentiable in x only (the quantized weight is for inference).
    """
    if not (isinstance(x, torch.Tensor) and isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor)):
        for t, name in ((x, "x"), (qweight, "qweight"), (scales, "scales")):
            check_tensor(t, name, "linear_int8")
    x, = autocast(x)
    if not has_kernel(x):
        return reference.linear_int8(x, qweight, scales)
    return _ops.linear_int8(x, qweight, scales)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out], W = (q - zeros) * scales per group of group_size inputs.

    qweight uint8 [out, in / 2] (two 4-bit values a byte, packing in reference.quant), scales
    [out, in / group_size] float32 or x's dtype, zeros uint8 [out, in / group_size]; in a multiple
    of group_size, group_size a multiple of 32. Differentiable in x only.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor)
            and isinstance(zeros, torch.Tensor)):
        for t, name in ((x, "x"), (qweight, "qweight"), (scales, "scales"), (zeros, "zeros")):
            check_tensor(t, name, "linear_int4")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"exaone_ext.linear_int4: 'group_size' must be an int, got {type(group_size).__name__}")
    x, = autocast(x)
    if not has_kernel(x):
        return reference.linear_int4(x, qweight, scales, zeros, group_size)
    return _ops.linear_int4(x, qweight, scales, zeros, group_size)


def _tensor_list(ts, name: str, op: str) -> list[torch.Tensor]:
    if isinstance(ts, list):   # the common case first, in one pass (this runs on every decode-step call)
        for t in ts:
            if not isinstance(t, torch.Tensor):
                break
        else:
            return ts
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"exaone_ext.{op}: '{name}' must be a list or tuple of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        check_tensor(t, f"{name}[{i}]", op)
    return list(ts)


def linear_int8_cat(x: torch.Tensor, qweights, scales) -> torch.Tensor:
    """x [..., in] @ cat(W_i).T -> [..., sum of out_i] for int8 weights (qweights[i], scales[i] as
    linear_int8 takes them), without concatenating them: e.g. a layer's q, k and v projections in
    one call. On CPU the weights stream in one parallel pass (x converted once); each weight's
    outputs are the same as linear_int8 gives for it alone. Differentiable in x only."""
    check_tensor(x, "x", "linear_int8_cat")
    qweights, scales = _tensor_list(qweights, "qweights", "linear_int8_cat"), _tensor_list(scales, "scales", "linear_int8_cat")
    x, = autocast(x)
    if not has_kernel(x):
        return reference.linear_int8_cat(x, qweights, scales)
    return _ops.linear_int8_cat(x, qweights, scales)


def linear_int4_cat(x: torch.Tensor, qweights, scales, zeros, group_size: int = 128) -> torch.Tensor:
    """x [..., in] @ cat(W_i).T -> [..., sum of out_i] for int4 weights (qweights[i], scales[i],
    zeros[i] as linear_int4 takes them, one group_size), without concatenating them. On CPU the
    weights stream in one parallel pass (x converted once); each weight's outputs are the same as
    linear_int4 gives for it alone. Differentiable in x only."""
    op = "linear_int4_cat"
    check_tensor(x, "x", op)
    qweights, scales, zeros = (_tensor_list(qweights, "qweights", op), _tensor_list(scales, "scales", op),
                               _tensor_list(zeros, "zeros", op))
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"exaone_ext.{op}: 'group_size' must be an int, got {type(group_size).__name__}")
    x, = autocast(x)
    if not has_kernel(x):
        return reference.linear_int4_cat(x, qweights, scales, zeros, group_size)
    return _ops.linear_int4_cat(x, qweights, scales, zeros, group_size)


@torch.library.register_fake("exaone_ext::linear_int8")
def _(x, qweight, scales):
    torch._check(qweight.dim() == 2, lambda: "exaone_ext.linear_int8: 'qweight' must be 2-dimensional")
    torch._check(x.shape[-1] == qweight.shape[1],
                 lambda: "exaone_ext.linear_int8: the last dimension of 'x' must equal in_features of 'qweight'")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("exaone_ext::linear_int4")
def _(x, qweight, scales, zeros, group_size=128):
    torch._check(qweight.dim() == 2, lambda: "exaone_ext.linear_int4: 'qweight' must be 2-dimensional")
    torch._check(x.shape[-1] == 2 * qweight.shape[1],
                 lambda: "exaone_ext.linear_int4: the last dimension of 'x' must be twice qweight's columns")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _cat_out_features(x, qweights, op):
    torch._check(len(qweights) > 0, lambda: f"exaone_ext.{op}: 'qweights' must hold at least one tensor")
    for q in qweights:
        torch._check(q.dim() == 2, lambda: f"exaone_ext.{op}: every qweight must be 2-dimensional")
    return x.new_empty((*x.shape[:-1], sum(q.shape[0] for q in qweights)))


@torch.library.register_fake("exaone_ext::linear_int8_cat")
def _(x, qweights, scales):
    for q in qweights:
        torch._check(x.shape[-1] == q.shape[1] if q.dim() == 2 else False,
                     lambda: "exaone_ext.linear_int8_cat: the last dimension of 'x' must equal in_features of every qweight")
    return _cat_out_features(x, qweights, "linear_int8_cat")


@torch.library.register_fake("exaone_ext::linear_int4_cat")
def _(x, qweights, scales, zeros, group_size=128):
    for q in qweights:
        torch._check(x.shape[-1] == 2 * q.shape[1] if q.dim() == 2 else False,
                     lambda: "exaone_ext.linear_int4_cat: the last dimension of 'x' must be twice every qweight's columns")
    return _cat_out_features(x, qweights, "linear_int4_cat")


def _setup(ctx, inputs, output):
    # the quantized weight (never given a gradient) and, for int4, group_size
    ctx.n_inputs = len(inputs)
    ctx.group_size = inputs[4] if len(inputs) == 5 else None
    ctx.save_for_backward(*inputs[1:4])


def _backward(ctx, grad):
    dx = None
    if ctx.needs_input_grad[0]:
        if ctx.group_size is None:
            w = reference.dequantize_int8(*ctx.saved_tensors, dtype=grad.dtype)
        else:
            w = reference.dequantize_int4(*ctx.saved_tensors, ctx.group_size, dtype=grad.dtype)
        dx = torch.matmul(grad, w)                                          # [..., out] @ [out, in]
    return (dx,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd("exaone_ext::linear_int8", _backward, setup_context=_setup)
torch.library.register_autograd("exaone_ext::linear_int4", _backward, setup_context=_setup)


def _setup_cat(ctx, inputs, output):
    # the quantized weights (never given a gradient) and, for int4, group_size
    ctx.n_inputs = len(inputs)
    ctx.n_weights = len(inputs[1])
    ctx.group_size = inputs[4] if len(inputs) == 5 else None
    ctx.save_for_backward(*[t for lst in inputs[1:4] for t in lst])


def _backward_cat(ctx, grad):
    dx = None
    if ctx.needs_input_grad[0]:
        n, saved = ctx.n_weights, ctx.saved_tensors
        if ctx.group_size is None:
            ws = [reference.dequantize_int8(saved[i], saved[n + i], dtype=grad.dtype) for i in range(n)]
        else:
            ws = [reference.dequantize_int4(saved[i], saved[n + i], saved[2 * n + i], ctx.group_size, dtype=grad.dtype)
                  for i in range(n)]
        dx = torch.matmul(grad, torch.cat(ws))                             # [..., sum out] @ [sum out, in]
    # a list of Nones for each list of weight tensors, and nothing more: the structure torch's wrapper
    # of ops with tensor lists checks (it adds the trailing None itself; test_cat_gradient_in_x)
    lists = 2 if ctx.group_size is None else 3
    return (dx,) + tuple([None] * ctx.n_weights for _ in range(lists))


torch.library.register_autograd("exaone_ext::linear_int8_cat", _backward_cat, setup_context=_setup_cat)
torch.library.register_autograd("exaone_ext::linear_int4_cat", _backward_cat, setup_context=_setup_cat)
