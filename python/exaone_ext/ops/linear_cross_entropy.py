"""Fused linear + cross-entropy: the loss of hidden @ weight.T without the [N, V] logits.

Tokens are processed in chunks: a chunk's logits come from the library matmul into a reused
buffer, the kernel computes their log-sum-exp and loss and, when gradients are wanted, writes
softmax - onehot over them in place, and the chunk's gradient matmuls follow.

Where the gradients are computed. With reduction "mean" or "sum" and an input that requires grad,
the forward computes them (gradients of the summed loss; backward only scales them by the incoming
gradient and 1 / count): three matmuls per chunk in all, against four when the backward recomputes
each chunk's logits, and the memory held from forward to backward is the gradients themselves,
which the backward would allocate anyway. With reduction "none" the incoming gradient differs per
token and is not known in forward, so forward saves only the log-sum-exp [N] and backward
recomputes each chunk's logits.
"""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import autocast, check_tensor, has_kernel

_ops = torch.ops.exaone_ext
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# Default chunk: as many tokens as keep one chunk's logits near this size.
_CHUNK_BYTES = 128 << 20


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk when none is given: logits of one chunk ~128 MiB, a multiple of 64 rows."""
    rows = _CHUNK_BYTES // max(1, vocab * torch.empty((), dtype=dtype).element_size())
    rows = max(64, rows // 64 * 64)
    return max(1, min(rows, num_tokens))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index, reduction) without
    materialising the logits.

    hidden: [..., D] float32 / bfloat16 / float16 (float64 on CPU); weight: [V, D] same dtype;
    targets: int64 [...] (hidden's leading shape), each in [0, V) or equal to ignore_index.
    reduction: "mean" over non-ignored tokens (0 when all are ignored), "sum", or "none" ->
    float32 per-token loss [...] (0 at ignored positions; -loss is the token's log-probability).
    Loss in float32 (float64 for float64 inputs); differentiable in hidden and weight.
    chunk_size: tokens per chunk (default: logits of one chunk ~128 MiB).
    On the CPU an out-of-range target raises ValueError. On CUDA it is not checked (the check
    would synchronise with the device every call): that token's loss, and so a reduced loss, is NaN.
    """
    op = "linear_cross_entropy"
    check_tensor(hidden, "hidden", op)
    check_tensor(weight, "weight", op)
    check_tensor(targets, "targets", op)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"exaone_ext.{op}: 'reduction' must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"exaone_ext.{op}: 'ignore_index' must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"exaone_ext.{op}: 'chunk_size' must be None or a positive int, got {chunk_size!r}")
    if hidden.dim() < 1 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"exaone_ext.{op}: 'targets' must have the leading shape of 'hidden' "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"exaone_ext.{op}: 'weight' must be [vocab, hidden_size], got shape {tuple(weight.shape)}")
    hidden, weight = autocast(hidden, weight)  # under torch.autocast: the logits' matmul in its dtype
    if not has_kernel(hidden):
        return reference.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    red = _REDUCTIONS[reduction]
    chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0], hidden.dtype)
    grad_now = red != 0 and torch.is_grad_enabled()
    loss = _ops.linear_cross_entropy(h, weight, t, ignore_index, red, chunk,
                                     grad_now and hidden.requires_grad, grad_now and weight.requires_grad)[0]
    return loss.reshape(targets.shape) if red == 0 else loss


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("exaone_ext::linear_cross_entropy")
def _(hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden, grad_weight):
    n = hidden.shape[0]
    loss = hidden.new_empty((n,) if reduction == 0 else (), dtype=_acc_dtype(hidden))
    lse = hidden.new_empty((n,), dtype=_acc_dtype(hidden))
    gh = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if grad_weight else hidden.new_empty((0,))
    return loss, lse, gh, gw


@torch.library.register_fake("exaone_ext::linear_cross_entropy_backward")
def _(grad_loss, hidden, weight, targets, lse, ignore_index, chunk_size, grad_hidden, grad_weight):
    gh = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if grad_weight else hidden.new_empty((0,))
    return gh, gw


def _setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden, grad_weight = inputs
    _, lse, gh, gw = output
    ctx.mark_non_differentiable(lse, gh, gw)
    ctx.set_materialize_grads(False)  # else backward is handed zeros the size of gw ([V, D]) for nothing
    ctx.ignore_index, ctx.reduction, ctx.chunk_size = ignore_index, reduction, chunk_size
    ctx.have = (grad_hidden, grad_weight)
    ctx.save_for_backward(hidden, weight, targets, lse, gh if grad_hidden else None, gw if grad_weight else None)


def _backward(ctx, grad_loss, _lse, _gh, _gw):
    if grad_loss is None:  # the loss itself took no part in what is differentiated
        return None, None, None, None, None, None, None, None
    hidden, weight, targets, lse, gh, gw = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh = dw = None
    if ctx.reduction == 0:
        scale = grad_loss
    else:  # d(loss)/d(per-token loss) is one number for every non-ignored token
        scale = grad_loss if ctx.reduction == 2 else grad_loss / (targets != ctx.ignore_index).sum().clamp(min=1)
        if need_h and ctx.have[0]:
            dh = gh * scale
        if need_w and ctx.have[1]:
            dw = gw * scale
    rest_h, rest_w = need_h and dh is None, need_w and dw is None
    if rest_h or rest_w:
        a, b = _ops.linear_cross_entropy_backward(scale, hidden, weight, targets, lse, ctx.ignore_index,
                                                  ctx.chunk_size, rest_h, rest_w)
        dh = a if rest_h else dh
        dw = b if rest_w else dw
    return dh, dw, None, None, None, None, None, None


torch.library.register_autograd("exaone_ext::linear_cross_entropy", _backward, setup_context=_setup)
