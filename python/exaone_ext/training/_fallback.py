"""Plain-PyTorch objectives used where the package's fused op and losses module are absent.

linear_cross_entropy: per-token cross-entropy of hidden @ weight.T, computed chunk by chunk over
tokens (each chunk's logits are recomputed in backward by checkpointing, so the full [tokens,
vocab] logits never exist at once). dpo_loss / simpo_loss: the formulas with TRL's metrics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(h, weight, t, ignore_index):
    logits = (h @ weight.t()).float()                                   # [chunk, V]
    return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", chunk_size=None):
    """hidden [n, d], weight [V, d], targets int64 [n] -> float32 loss (per token with "none")."""
    chunk = chunk_size or max(1, min(hidden.shape[0], 2 ** 24 // max(1, weight.shape[0])))
    losses = [checkpoint(_chunk_ce, hidden[i:i + chunk], weight, targets[i:i + chunk], ignore_index,
                         use_reentrant=False) for i in range(0, hidden.shape[0], chunk)]
    loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)


def _metrics(chosen_rewards, rejected_rewards):
    return {"rewards/chosen": chosen_rewards.detach().mean(), "rewards/rejected": rejected_rewards.detach().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}


def dpo_loss(pc, pr, rc, rr, beta=0.1):
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))), mean over pairs; rewards beta * (p - ref)."""
    losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    return losses.mean(), _metrics(beta * (pc - rc), beta * (pr - rr))


def simpo_loss(pc, pr, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5):
    """-log sigmoid(beta * pc / |y_w| - beta * pr / |y_l| - gamma), mean over pairs."""
    chosen, rejected = beta * pc / chosen_lengths, beta * pr / rejected_lengths
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), _metrics(chosen, rejected)
