"""EXAONE's decoder layers against a KV cache in one call: inference on the CPU."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import check_tensor

_ops = torch.ops.exaone_ext


def decode_layers(h: torch.Tensor, weights: list[torch.Tensor], layout: list[int], eps: list[float],
                  k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], cache_seqlens: torch.Tensor,
                  cache_seqlens_max: int, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                  position_ids_max: int | None, num_heads: int, num_kv_heads: int,
                  softmax_scale: float) -> torch.Tensor:
    """The decoder layers of EXAONE over h [b, s, hidden] (the residual stream) against a KV cache, in
    one call: per layer rms_norm, the q/k/v projections (one linear_cat), apply_rope,
    flash_attn_with_kvcache (the new keys and values written into k_caches[l] / v_caches[l] after
    cache_seqlens[b] tokens; cache_seqlens is not advanced), the output projection, add_rms_norm,
    the gate/up projections, swiglu and the down projection with the residual add. On the CPU these
    are the very kernels the ops above run, in the same order with the same arguments (bit for bit
    the same results), without the dispatcher and Python between them: what a decode step of a
    small model spends most of its time on. Inference only: not differentiable; CPU tensors (on
    another device, or where no kernel is built, the reference composes the reference ops).

    weights: per layer ln_1's weight, ln_2's weight, then four projection groups (q/k/v, out,
    gate/up, down), each as its layout entry says. layout: three ints per layer and group: kind (0:
    `count` dense weights [out, in]; 8: `count` int8 qweights then their scales, as linear_int8_cat
    takes them; 4: `count` int4 qweights, scales and zeros, as linear_int4_cat), count, and int4's
    group size (else 0). eps: ln_1's and ln_2's epsilon per layer. cache_seqlens_max: the host bound
    flash_attn_with_kvcache takes; position_ids_max: apply_rope's (None: not known). Returns the
    residual stream after the last layer [b, s, hidden]."""
    check_tensor(h, "h", "decode_layers")
    if position_ids_max is None:
        position_ids_max = -1
    if h.is_cpu:
        return _ops.decode_layers.default(h, weights, layout, eps, k_caches, v_caches, cache_seqlens,
                                          cache_seqlens_max, cos, sin, position_ids, position_ids_max, num_heads,
                                          num_kv_heads, softmax_scale)
    return reference.decode_layers(h, weights, layout, eps, k_caches, v_caches, cache_seqlens, cache_seqlens_max,
                                   cos, sin, position_ids, position_ids_max, num_heads, num_kv_heads, softmax_scale)


@torch.library.register_fake("exaone_ext::decode_layers")
def _(h, weights, layout, eps, k_caches, v_caches, cache_seqlens, cache_seqlens_max, cos, sin, position_ids,
      position_ids_max, num_heads, num_kv_heads, softmax_scale):
    return torch.empty_like(h, memory_format=torch.contiguous_format)
