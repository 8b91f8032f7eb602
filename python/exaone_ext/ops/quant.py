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
    for t, name in ((x, "x"), (qweight, "qweight"), (scales, "scales")):
        check_tensor(t, name, "linear_int8")
    x, = autocast(x)
    if not has_kernel(x.device):
        return reference.linear_int8(x, qweight, scales)
    return _ops.linear_int8(x, qweight, scales)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out], W = (q - zeros) * scales per group of group_size inputs.

    qweight uint8 [out, in / 2] (two 4-bit values a byte, packing in reference.quant), scales
    [out, in / group_size] float32 or x's dtype, zeros uint8 [out, in / group_size]; in a multiple
    of group_size, group_size a multiple of 32. Differentiable in x only.
    """
    for t, name in ((x, "x"), (qweight, "qweight"), (scales, "scales"), (zeros, "zeros")):
        check_tensor(t, name, "linear_int4")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"exaone_ext.linear_int4: 'group_size' must be an int, got {type(group_size).__name__}")
    x, = autocast(x)
    if not has_kernel(x.device):
        return reference.linear_int4(x, qweight, scales, zeros, group_size)
    return _ops.linear_int4(x, qweight, scales, zeros, group_size)


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
