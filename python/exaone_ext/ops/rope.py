"""Rotary position embedding: float32 cos/sin tables (llama3 frequency scaling) and the fused
rotation of q and k at arbitrary positions."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_float, check_tensor, has_kernel

_ops = torch.ops.exaone_ext

def _llama3_params(scaling: dict | None) -> tuple[bool, float, float, float, float]:
    """(llama3, factor, low_freq_factor, high_freq_factor, original) for the kernel."""
    params = reference.parse_rope_scaling(scaling, "exaone_ext.rope_cos_sin")
    return (False, 1.0, 1.0, 1.0, 1.0) if params is None else (True, *params)


def rope_cos_sin(head_dim: int, max_position: int, theta: float = 1e6, scaling: dict | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, float32 [max_position, head_dim // 2], of the angles
    position * inv_freq[i], inv_freq[i] = 1 / theta^(2i / head_dim) (rescaled by the llama3 rule when
    scaling is config.json's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}). Computed in float64 and rounded once to float32."""
    for name, value in (("head_dim", head_dim), ("max_position", max_position)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"exaone_ext.rope_cos_sin: '{name}' must be an int, got {type(value).__name__}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"exaone_ext.rope_cos_sin: 'head_dim' must be a positive even number, got {head_dim}")
    if max_position < 0:
        raise ValueError(f"exaone_ext.rope_cos_sin: 'max_position' must be >= 0, got {max_position}")
    if not check_float(theta, "theta", "rope_cos_sin") > 0:
        raise ValueError(f"exaone_ext.rope_cos_sin: 'theta' must be positive, got {theta}")
    params = _llama3_params(scaling)
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"exaone_ext.rope_cos_sin: 'device' must be a torch.device or a device string such as "
                   f"'cpu' or 'cuda:0', got {device!r}") from None
    if not has_kernel(device):
        return reference.rope_cos_sin(head_dim, max_position, theta, scaling, device)
    positions = torch.arange(max_position, dtype=torch.int64, device=device)
    return _ops.rope_cos_sin(positions, head_dim, float(theta), *params)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor, interleaved: bool = False,
               position_ids_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [batch, seq, q_heads, head_dim] and k [batch, seq, kv_heads, head_dim] by the
    angles of position_ids (int64 [batch, seq], or [1, seq] shared by the batch; any positions
    inside the table) in one fused pass. cos, sin: float32 [max_position, head_dim // 2] from
    rope_cos_sin. Rotate-half layout (pairs (i, i + head_dim / 2), as EXAONE) by default;
    interleaved=True pairs (2i, 2i + 1). Math in float32 (float64 for float64), outputs new
    contiguous tensors in the input dtype; differentiable in q and k.

    position_ids_max: the largest position, when the caller knows it on the host (a model knows its
    cache lengths). It is checked against the table; on CUDA the op then does not read the kernel's
    out-of-table report back, which would synchronise with the GPU on every call: a position outside
    the table that the bound did not cover gives NaN rows there instead of an error. On the CPU every
    position is checked either way."""
    for name, value in (("q", q), ("k", k), ("cos", cos), ("sin", sin), ("position_ids", position_ids)):
        check_tensor(value, name, "apply_rope")
    if not isinstance(interleaved, bool):
        raise TypeError(f"exaone_ext.apply_rope: 'interleaved' must be a bool, got {type(interleaved).__name__}")
    for name, value in (("k", k), ("cos", cos), ("sin", sin), ("position_ids", position_ids)):
        if not (value.is_cpu and q.is_cpu) and value.device != q.device:
            raise ValueError(f"exaone_ext.apply_rope: '{name}' must be on the same device as 'q' ({q.device}), "
                             f"got {value.device}")
    if position_ids_max is not None and (isinstance(position_ids_max, bool) or not isinstance(position_ids_max, int)):
        raise TypeError(f"exaone_ext.apply_rope: 'position_ids_max' must be an int or None, "
                        f"got {type(position_ids_max).__name__}")
    if not has_kernel(q):
        return reference.apply_rope(q, k, cos, sin, position_ids, interleaved, position_ids_max)
    return _ops.apply_rope(q, k, cos, sin, position_ids, interleaved, position_ids_max)


@torch.library.register_fake("exaone_ext::rope_cos_sin")
def _(positions, head_dim, theta, llama3, factor, low_freq_factor, high_freq_factor, original_max_position):
    shape = (positions.shape[0], head_dim // 2)
    return (positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32))


def _fake_rotation(q, k, cos, sin, position_ids, interleaved=False, position_ids_max=None):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "exaone_ext.apply_rope: q and k must be 4-dimensional")
    torch._check(k.shape[:2] == q.shape[:2], lambda: "exaone_ext.apply_rope: 'k' must have the batch and seq of 'q'")
    torch._check(k.shape[3] == q.shape[3], lambda: "exaone_ext.apply_rope: 'k' must have the head_dim of 'q'")
    return q.new_empty(q.shape), k.new_empty(k.shape)


torch.library.register_fake("exaone_ext::apply_rope")(_fake_rotation)
torch.library.register_fake("exaone_ext::apply_rope_backward")(_fake_rotation)


def _setup(ctx, inputs, output):
    _, _, cos, sin, position_ids, interleaved, *rest = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved = interleaved
    # The forward checked the positions (or the caller bounded them): the backward need not check
    # again, so it never synchronises with the GPU.
    ctx.position_ids_max = cos.shape[0] - 1 if cos.shape[0] > 0 else None


def _grads(ctx, grad_q, grad_k, op):
    # The rotation is orthogonal: its gradient is the rotation by the negative angle (and back).
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = op(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved, ctx.position_ids_max)
    return dq, dk, None, None, None, None, None


def _backward(ctx, grad_q, grad_k):
    return _grads(ctx, grad_q, grad_k, _ops.apply_rope_backward)


def _double_backward(ctx, grad_q, grad_k):
    return _grads(ctx, grad_q, grad_k, _ops.apply_rope)


torch.library.register_autograd("exaone_ext::apply_rope", _backward, setup_context=_setup)
torch.library.register_autograd("exaone_ext::apply_rope_backward", _double_backward, setup_context=_setup)
