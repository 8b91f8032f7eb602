from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T, computed the unfused way: the whole
    [N, V] logits in the inputs' dtype, then float32 (float64 for float64 inputs) cross-entropy.

    hidden [..., D], weight [V, D], int64 targets [...]; reduction "mean" (over targets !=
    ignore_index, 0 when there are none), "sum", or "none" (per-token loss [...], 0 where ignored).
    chunk_size is accepted for signature parity and ignored."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"exaone_ext.linear_cross_entropy: 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(acc)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), ignore_index=ignore_index,
                           reduction="none")
    if reduction == "none":
        return loss.reshape(targets.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
