from __future__ import annotations

import torch

from .attention import flash_attn_with_kvcache
from .linear import linear_cat
from .quant import linear_int4_cat, linear_int8_cat
from .rms_norm import add_rms_norm, rms_norm
from .rope import apply_rope
from .swiglu import swiglu

GROUPS = 4  # q/k/v, out, gate/up, down


def _project(x, kind, tensors, group):
    n = len(tensors) // (1 if kind == 0 else 2 if kind == 8 else 3)
    if kind == 0:
        return linear_cat(x, tensors)
    if kind == 8:
        return linear_int8_cat(x, tensors[:n], tensors[n:])
    return linear_int4_cat(x, tensors[:n], tensors[n:2 * n], tensors[2 * n:], group)


def decode_layers(h, weights, layout, eps, k_caches, v_caches, cache_seqlens, cache_seqlens_max, cos, sin,
                  position_ids, position_ids_max, num_heads, num_kv_heads, softmax_scale):
    """EXAONE's decoder layers over h [b, s, hidden] against a KV cache, one after the other, each
    writing its new keys and values into k_caches[l] / v_caches[l] after cache_seqlens[b] tokens.
    Arguments as exaone_ext.ops.decode_layers takes them. Returns the residual stream after the last layer."""
    b, s, _ = h.shape
    hq, hk = num_heads, num_kv_heads
    w = 0
    for layer in range(len(k_caches)):
        ln1, ln2 = weights[w], weights[w + 1]
        w += 2
        proj = []
        for g in range(GROUPS):
            kind, count, group = layout[3 * (layer * GROUPS + g):3 * (layer * GROUPS + g) + 3]
            n = count * (1 if kind == 0 else 2 if kind == 8 else 3)
            proj.append((kind, list(weights[w:w + n]), group))
            w += n
        qkv = _project(rms_norm(h, ln1, eps[2 * layer]), *proj[0])
        hd = qkv.shape[-1] // (hq + 2 * hk)
        q, k, v = qkv.view(b, s, hq + 2 * hk, hd).split((hq, hk, hk), dim=2)
        q, k = apply_rope(q, k, cos, sin, position_ids)
        out = flash_attn_with_kvcache(q, k_caches[layer], v_caches[layer], cache_seqlens, k, v, True, softmax_scale)
        a = _project(out.reshape(b, s, hq * hd), *proj[1])
        y, h = add_rms_norm(a, h, ln2, eps[2 * layer + 1])
        h = h + _project(swiglu(_project(y, *proj[2])), *proj[3])
    return h
