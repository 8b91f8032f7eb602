"""Training objectives: causal-LM cross-entropy through the fused linear + cross-entropy op, the
per-sequence log-probabilities that preference losses take, and DPO / SimPO.

Metrics follow TRL's names and definitions: rewards/chosen and rewards/rejected are the batch means
of the (detached) implicit rewards, rewards/margins the mean of chosen - rejected, and
rewards/accuracies the fraction of pairs whose chosen reward is higher. Metric values are 0-dim
detached tensors on the inputs' device (no synchronisation; call .item() when logging).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear_cross_entropy


def causal_lm_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = -100, reduction: str = "mean", shift: bool = True,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM from its final hidden states (the head is fused
    into the loss; the [tokens, vocab] logits are never held).

    hidden: [..., S, D] (after the final norm); lm_weight: [V, D]; labels: int64 [..., S].
    shift=True: labels are aligned with the inputs (the Hugging Face convention, labels = input_ids
    with ignore_index where no loss is wanted); position t predicts labels[t + 1] and the last
    position has no target. shift=False: labels are already shifted (labels[t] is the target of
    position t), as for packed rows whose per-document shifting was done by the data pipeline
    (the last token of each document then carries ignore_index).
    Returns the loss as linear_cross_entropy does for `reduction`.
    """
    if shift:
        if labels.dim() < 1 or hidden.dim() < 2:
            raise ValueError(f"exaone_ext.causal_lm_loss: with shift=True 'hidden' must be [..., S, D] and 'labels' "
                             f"[..., S], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    return linear_cross_entropy(hidden, lm_weight, labels, ignore_index=ignore_index, reduction=reduction,
                                chunk_size=chunk_size)


def sequence_logps(per_token_logps: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, num_sequences: int | None = None,
                   return_lengths: bool = False):
    """Sum of per-token log-probabilities over each sequence's masked tokens.

    per_token_logps: [B, S] (one sequence per row) or packed [T] (e.g. -linear_cross_entropy(...,
    reduction="none")); loss_mask: same shape, bool (True where a token counts).
    Packed sequences are given either by cu_seqlens (int [n + 1], 0 = cu[0] <= ... <= cu[n] <= T;
    tokens past cu[n] belong to none) or by segment_ids (int64 [T], the sequence of each token in
    [0, num_sequences), negative for none; num_sequences defaults to max + 1, which reads it back
    from the device). Returns float32 [B] or [n] (float64 for float64 input), differentiable in
    per_token_logps; with return_lengths also the number of masked tokens per sequence (int64).
    """
    op = "sequence_logps"
    if not isinstance(per_token_logps, torch.Tensor) or not per_token_logps.is_floating_point():
        raise TypeError(f"exaone_ext.{op}: 'per_token_logps' must be a floating-point tensor, got "
                        f"{getattr(per_token_logps, 'dtype', type(per_token_logps).__name__)}")
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != per_token_logps.shape:
        raise ValueError(f"exaone_ext.{op}: 'loss_mask' must be a tensor of the shape of 'per_token_logps' "
                         f"{tuple(per_token_logps.shape)}, got {tuple(getattr(loss_mask, 'shape', ()))}")
    if cu_seqlens is not None and segment_ids is not None:
        raise ValueError(f"exaone_ext.{op}: give 'cu_seqlens' or 'segment_ids', not both")
    acc = torch.float64 if per_token_logps.dtype == torch.float64 else torch.float32
    mask = loss_mask.to(torch.bool)
    vals = torch.where(mask, per_token_logps.to(acc), torch.zeros((), dtype=acc, device=per_token_logps.device))
    if cu_seqlens is None and segment_ids is None:
        if vals.dim() != 2:
            raise ValueError(f"exaone_ext.{op}: without 'cu_seqlens' or 'segment_ids' 'per_token_logps' must be "
                             f"[batch, seq], got shape {tuple(vals.shape)}")
        sums, lengths = vals.sum(-1), mask.sum(-1)
        return (sums, lengths) if return_lengths else sums
    if vals.dim() != 1:
        raise ValueError(f"exaone_ext.{op}: packed sequences need 1-D 'per_token_logps' [T], got shape {tuple(vals.shape)}")
    total = vals.shape[0]
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"exaone_ext.{op}: 'cu_seqlens' must be int32/int64 [n + 1], got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=vals.device, dtype=torch.int64)
        if cu.is_cpu and (cu[0] != 0 or (cu.diff() < 0).any() or cu[-1] > total):
            raise ValueError(f"exaone_ext.{op}: 'cu_seqlens' must start at 0, never decrease and end at most at "
                             f"{total} (the tokens), got {cu.tolist()}")
        n = cu.numel() - 1
        # token i belongs to the sequence whose [cu[j], cu[j+1]) holds it; past cu[n]: bin n, dropped
        seg = torch.searchsorted(cu[1:], torch.arange(total, device=vals.device), right=True)
    else:
        if segment_ids.shape != vals.shape or segment_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"exaone_ext.{op}: 'segment_ids' must be int32/int64 of shape {tuple(vals.shape)}, got "
                             f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
        seg = segment_ids.to(device=vals.device, dtype=torch.int64)
        n = int(seg.max().item()) + 1 if num_sequences is None and total else (num_sequences or 0)
        if seg.is_cpu and total and seg.max() >= n:
            raise ValueError(f"exaone_ext.{op}: 'segment_ids' must be below num_sequences={n}, got {int(seg.max())}")
        seg = torch.where(seg < 0, torch.full_like(seg, n), seg)
    sums = torch.zeros(n + 1, dtype=acc, device=vals.device).index_add(0, seg, vals)[:n]
    if not return_lengths:
        return sums
    lengths = torch.zeros(n + 1, dtype=torch.int64, device=vals.device).index_add(0, seg, mask.to(torch.int64))[:n]
    return sums, lengths


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def _check_pairs(op: str, **tensors: torch.Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"exaone_ext.{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"exaone_ext.{op}: '{name}' must be [batch] (one value per pair), got shape {tuple(t.shape)}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"exaone_ext.{op}: '{name}' must have the shape of '{first}' {tuple(shape)}, got {tuple(t.shape)}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (sigmoid loss):
    mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

    All inputs [batch]: summed log-probabilities of the chosen / rejected responses under the
    policy and under the reference (computed once before the stage; no gradient flows into them).
    Returns (loss, metrics) with rewards = beta * (policy - reference) log-probs, detached.
    """
    _check_pairs("dpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, _metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
               beta: float = 2.0, gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: reference-free, length-normalised preference loss with a target margin gamma:
    mean over pairs of -log sigmoid(beta * (pi_c / |y_c| - pi_r / |y_r|) - gamma).

    policy_*_logps: [batch] summed log-probabilities; *_lengths: [batch] token counts (> 0).
    Returns (loss, metrics) with rewards = beta * length-averaged log-probs, detached
    (TRL's CPO trainer with loss_type="simpo": its simpo_gamma is this gamma).
    """
    _check_pairs("simpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if chosen_lengths.is_cpu and rejected_lengths.is_cpu and ((chosen_lengths <= 0).any() or (rejected_lengths <= 0).any()):
        raise ValueError("exaone_ext.simpo_loss: 'chosen_lengths' and 'rejected_lengths' must be positive token counts, got "
                         f"{chosen_lengths.tolist()} and {rejected_lengths.tolist()}")
    chosen = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
    rejected = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma).mean()
    return loss, _metrics(beta * chosen.detach(), beta * rejected.detach())
