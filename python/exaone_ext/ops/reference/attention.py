from __future__ import annotations

import math

import torch


def _attend(q, k, v, causal, scale, return_lse):
    """One sequence. q [sq, hq, d], k/v [sk, hk, d]. Softmax in float32 (float64 for float64),
    causal mask aligned bottom-right. Returns out [sq, hq, d] (q's dtype) and lse [hq, sq] float32."""
    sq, hq, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    g = hq // hk
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the matmuls run in the input dtype, as the Hugging Face model's eager attention does
    kk = k.repeat_interleave(g, dim=1)  # [sk, hq, d]
    vv = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk).to(compute) * scale  # [hq, sq, sk]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hq, sq]
    # rows that see no key (lse = -inf) -> 0; a NaN score stays NaN, as in softmax
    probs = torch.exp(scores - lse[..., None]).masked_fill(torch.isneginf(lse)[..., None], 0.0)
    out = torch.einsum("hqk,khd->qhd", probs.to(q.dtype), vv).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def flash_attn(q, k, v, causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False):
    """q [b, sq, hq, d], k/v [b, sk, hk, d] (hq a multiple of hk). Returns out like q, and with
    return_lse the log-sum-exp [b, hq, sq] float32."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, l = _attend(q[b], k[b], v[b], causal, scale, True)
        outs.append(o)
        lses.append(l)
    out = torch.stack(outs) if outs else q.new_empty(q.shape)
    if not return_lse:
        return out
    lse = torch.stack(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False):
    """Packed sequences: q [total_q, hq, d], k/v [total_k, hk, d], int32 cu_seqlens [batch + 1].
    No token attends across a sequence boundary. lse [hq, total_q] float32."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        o, l = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal, scale, True)
        out[cq[b]:cq[b + 1]] = o
        lse[:, cq[b]:cq[b + 1]] = l
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                            causal: bool = True, softmax_scale: float | None = None,
                            cache_seqlens_max: int | None = None):
    """q [b, s_new, hq, d]; caches [b, max_seq, hk, d]; cache_seqlens int32 [b]: tokens already in
    each row's cache. k_new/v_new [b, s_new, hk, d], when given, are written into the caches at
    each row's offset first (the caches are modified in place). Each query row attends to the
    first cache_seqlens[b] (+ s_new when new keys are given) keys, causal bottom-right."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lens = cache_seqlens.tolist()
    if cache_seqlens_max is not None and any(n > cache_seqlens_max for n in lens):
        raise ValueError(f"flash_attn_with_kvcache: cache_seqlens {lens} exceed cache_seqlens_max = {cache_seqlens_max}")
    outs = []
    for b in range(q.shape[0]):
        n = lens[b]
        if k_new is not None:
            s_new = k_new.shape[1]
            k_cache[b, n:n + s_new] = k_new[b]
            v_cache[b, n:n + s_new] = v_new[b]
            n += s_new
        outs.append(_attend(q[b], k_cache[b, :n], v_cache[b, :n], causal, scale, False))
    return torch.stack(outs) if outs else torch.empty_like(q)
