"""Next-token selection on a batch of logits, in plain torch on the logits' device.

Nothing here reads a value back to the host, so a decode step can be queued without waiting for
the previous one. Sampling uses the exponential-race form of a categorical draw
(argmax(p / E) with E ~ Exp(1) equals a draw from p), which needs no host-side check.
"""
from __future__ import annotations

import torch

from .config import GenerationConfig

__all__ = ["apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p", "apply_min_p",
           "process_logits", "select_next_tokens"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, V]; seen bool [b, V] (tokens in the prompt or already generated). Positive logits
    of seen tokens are divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]                        # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (the most
    likely token is always kept)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)       # [b, V]
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs                                   # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that the final draw (or argmax) sees: float32 [b, V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = apply_temperature(logits, config.temperature)
    logits = apply_top_k(logits, config.top_k)
    logits = apply_top_p(logits, config.top_p)
    return apply_min_p(logits, config.min_p)


def select_next_tokens(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, V] -> next token ids int64 [b] (greedy or sampled per `config`)."""
    if logits.dim() != 2:
        raise ValueError(f"select_next_tokens: logits must be [batch, vocab], got {tuple(logits.shape)}")
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)                                               # zeros where masked
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A draw of exactly 0 would turn a masked token's 0/0 into NaN, which argmax would pick.
    return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(-1)
