"""Grouped-query flash attention: dense, packed (varlen) and KV-cache decode.

Layouts: q [batch, seq_q, q_heads, head_dim], k / v [batch, seq_k, kv_heads, head_dim] with q_heads a
multiple of kv_heads (K/V are never repeated); packed sequences use [total_tokens, heads, head_dim]
with int32 cu_seqlens [batch + 1]. Head dims 64, 80, 96, 128, 256; float32, bfloat16, float16
(float64 on CPU). The causal mask is aligned bottom-right: query i of a sequence sees keys up to
i + seq_k - seq_q; a query that sees no key outputs zeros and has lse = -inf.

The backward recomputes the attention matrix from the saved log-sum-exp; it is never stored.
The returned lse is not differentiable (its gradient is not propagated).
"""
from __future__ import annotations

import math

import torch

from .. import _C
from . import reference
from ._dispatch import autocast, check_float, check_int, check_tensor, has_kernel

_ops = torch.ops.exaone_ext

# The head dims the attention kernels are compiled for: the C++ rule (common/attention.h), read back.
ATTENTION_HEAD_DIMS = tuple(_C.build_info()["attention_head_dims"])


def attention_head_dim_supported(head_dim: int) -> bool:
    """Whether the attention kernels take this head dim (elsewhere the model runs the references)."""
    return head_dim in ATTENTION_HEAD_DIMS


def _scale(q: torch.Tensor, softmax_scale: float | None, op: str) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.dim() else 1.0
    return check_float(softmax_scale, "softmax_scale", op)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 0 or x.stride(-1) == 1 else x.contiguous()


def flash_attn(q, k, v, causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * scale) v per kv-head group. q [b, sq, hq, d], k / v [b, sk, hk, d].
    Returns out like q, and with return_lse also lse [b, hq, sq] float32."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(x, name, "flash_attn")
    scale = _scale(q, softmax_scale, "flash_attn")
    q, k, v = autocast(q, k, v)  # under torch.autocast its dtype, as SDPA
    if not has_kernel(q):
        return reference.flash_attn(q, k, v, causal, softmax_scale, return_lse)
    out, lse = _ops.flash_attn_fwd(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), bool(causal),
                                   scale)
    return (out, lse) if return_lse else out


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False):
    """Packed sequences: q [total_q, hq, d], k / v [total_k, hk, d]; sequence i owns rows
    cu_seqlens[i] .. cu_seqlens[i + 1] - 1 (int32 [batch + 1]); no token attends across a
    sequence boundary. Returns out like q, and with return_lse also lse [hq, total_q] float32."""
    for x, name in ((q, "q"), (k, "k"), (v, "v"), (cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        check_tensor(x, name, "flash_attn_varlen")
    scale = _scale(q, softmax_scale, "flash_attn_varlen")
    max_seqlen_q = check_int(max_seqlen_q, "max_seqlen_q", "flash_attn_varlen")
    max_seqlen_k = check_int(max_seqlen_k, "max_seqlen_k", "flash_attn_varlen")
    q, k, v = autocast(q, k, v)
    if not has_kernel(q):
        return reference.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           causal, softmax_scale, return_lse)
    out, lse = _ops.flash_attn_varlen_fwd(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v),
                                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          bool(causal), scale)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, causal: bool = True,
                            softmax_scale: float | None = None, cache_seqlens_max: int | None = None):
    """Decode / chunked prefill against a preallocated cache. q [b, s_new, hq, d]; caches
    [b, max_seq, hk, d] (last dim contiguous; modified in place); cache_seqlens int32 [b]: tokens
    already in each row. k_new / v_new [b, s_new, hk, d], when given, are written into the caches at
    each row's offset first; each query then attends to the first cache_seqlens[b] (+ s_new) keys.
    cache_seqlens is not modified: the caller advances it. Not differentiable.

    cache_seqlens_max: a bound on cache_seqlens the caller already knows on the host (KVCache keeps
    one). It is checked against max_seq; on CUDA the op then does not read the lengths back from the
    device, which would otherwise synchronise with the GPU on every call. On CUDA a bound below the
    true lengths is not detected (detecting it is the synchronisation): the kernels clamp every
    length to [0, max_seq], so nothing outside the caches is touched, but the rows concerned are
    wrong. On the CPU the lengths are checked against it."""
    for x, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (cache_seqlens, "cache_seqlens")):
        check_tensor(x, name, "flash_attn_with_kvcache")
    if (k_new is None) != (v_new is None):
        raise ValueError("exaone_ext.flash_attn_with_kvcache: 'k_new' and 'v_new' must be given together")
    if k_new is not None:
        check_tensor(k_new, "k_new", "flash_attn_with_kvcache")
        check_tensor(v_new, "v_new", "flash_attn_with_kvcache")
    if cache_seqlens_max is not None and (isinstance(cache_seqlens_max, bool)
                                          or not isinstance(cache_seqlens_max, int)):
        raise TypeError(f"exaone_ext.flash_attn_with_kvcache: 'cache_seqlens_max' must be an int or None, "
                        f"got {type(cache_seqlens_max).__name__}")
    scale = _scale(q, softmax_scale, "flash_attn_with_kvcache")
    if not has_kernel(q):
        return reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal,
                                                 softmax_scale, cache_seqlens_max)
    if k_new is not None:
        k_new, v_new = _last_contiguous(k_new), _last_contiguous(v_new)
    return _ops.flash_attn_kvcache(_last_contiguous(q), k_cache, v_cache, cache_seqlens, k_new, v_new, bool(causal),
                                   scale, cache_seqlens_max)


# ---- fake (meta) kernels: shapes only, for torch.compile and opcheck ---------------------------------

@torch.library.register_fake("exaone_ext::flash_attn_fwd")
def _(q, k, v, causal, softmax_scale):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "exaone_ext.flash_attn_fwd: q, k, v must be 4-dimensional")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))


@torch.library.register_fake("exaone_ext::flash_attn_bwd")
def _(dout, q, k, v, out, lse, causal, softmax_scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("exaone_ext::flash_attn_varlen_fwd")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    torch._check(q.dim() == 3 and k.dim() == 3, lambda: "exaone_ext.flash_attn_varlen_fwd: q, k, v must be 3-dimensional")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.register_fake("exaone_ext::flash_attn_varlen_bwd")
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("exaone_ext::flash_attn_kvcache")
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, cache_seqlens_max=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- autograd ------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = inputs[3], inputs[4]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_bwd(_last_contiguous(dout), q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.causal, ctx.scale = max_q, max_k, causal, scale


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_varlen_bwd(_last_contiguous(dout), q, k, v, out, lse, cu_q, cu_k, ctx.max_q,
                                            ctx.max_k, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("exaone_ext::flash_attn_fwd", _backward, setup_context=_setup)
torch.library.register_autograd("exaone_ext::flash_attn_varlen_fwd", _backward_varlen, setup_context=_setup_varlen)
