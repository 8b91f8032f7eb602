"""Next-token selection on a batch of logits, in plain torch on the logits' device.

On a GPU nothing here reads a value back to the host, so a decode step can be queued without
waiting for the previous one: the draw is the exponential race (argmax(p / E) with E ~ Exp(1) is a
draw from p; one fused pass, no host-side check). On a CPU, where reads are free, the draw is an
inverse-CDF lookup (one uniform number per row instead of one exponential per vocabulary entry)
and top_p first tries the few hundred best tokens instead of sorting the vocabulary. With top_k,
everything after the top-k selection works on the k candidates only.
"""
from __future__ import annotations

import torch

from .config import GenerationConfig

__all__ = ["apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p", "apply_min_p",
           "process_logits", "select_next_tokens", "draw", "draw_inverse_cdf", "draw_race"]


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
    """Keep the k largest logits of each row (exactly k: a tie at the k-th is broken as torch.topk
    breaks it), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, index = torch.topk(logits, k, dim=-1)                             # [b, k]
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def apply_top_p(logits: torch.Tensor, p: float, log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (the most
    likely token is always kept). log_norm [b, 1]: the log of the softmax denominator when `logits`
    is a subset of the vocabulary (default: softmax over `logits` itself)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)       # [b, V]
    probs = sorted_logits.softmax(-1) if log_norm is None else (sorted_logits - log_norm).exp()
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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of probs [b, n] (rows need not be normalised) -> int64 [b]."""
    if probs.device.type == "cpu":
        return draw_inverse_cdf(probs, generator)
    return draw_race(probs, generator)


def draw_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform number per row looked up in the cumulative distribution (cheapest on a CPU)."""
    cdf = probs.double().cumsum(-1)                                           # [b, n]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)              # first cdf > u: a p > 0 token
    # u * total can round up to total itself: fall back to the most likely token.
    return torch.where(index < probs.shape[-1], index, probs.argmax(-1, keepdim=True)).squeeze(-1)


def draw_race(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A draw of exactly 0 would turn a masked token's 0/0 into NaN, which argmax would pick.
    return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(-1)


_NUCLEUS_PROBE = 256  # candidates tried before a full sort for top_p on a CPU


def _filtered(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None):
    """The one pipeline behind process_logits and select_next_tokens: repetition penalty, then
    (sampling) temperature, top_k, top_p, min_p. Returns (logits [b, n] float32, candidates):
    candidates int64 [b, n] are the vocabulary ids of the n columns when the work was narrowed to
    a subset (top_k, or top_p's probe), else None (n = V)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits, None
    logits = apply_temperature(logits, config.temperature)
    candidates, log_norm = None, None
    if 0 < config.top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, config.top_k, dim=-1)          # [b, k] each
    elif config.top_p < 1.0 and logits.device.type == "cpu" and logits.shape[-1] > _NUCLEUS_PROBE:
        # Sorting the whole vocabulary is the slowest step on a CPU. The nucleus usually lies within
        # the few hundred best tokens: when their probability mass reaches top_p in every row, it
        # is exactly the nucleus of the full distribution, found without the sort.
        values, index = torch.topk(logits, _NUCLEUS_PROBE, dim=-1)            # [b, probe]
        full_norm = logits.logsumexp(-1, keepdim=True)                        # [b, 1]
        if bool(((values - full_norm).exp().sum(-1) >= config.top_p).all()):
            logits, candidates, log_norm = values, index, full_norm
    return apply_min_p(apply_top_p(logits, config.top_p, log_norm), config.min_p), candidates


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that the final draw (or argmax) sees: float32 [b, V] (-inf where filtered out)."""
    out, candidates = _filtered(logits, config, seen)
    if candidates is None:
        return out
    return torch.full(logits.shape, float("-inf"), device=logits.device).scatter(-1, candidates, out)


def select_next_tokens(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, V] -> next token ids int64 [b] (greedy or sampled per `config`): a draw from
    softmax(process_logits(...)), made on the candidates only when top_k narrowed them."""
    if logits.dim() != 2:
        raise ValueError(f"select_next_tokens: logits must be [batch, vocab], got {tuple(logits.shape)}")
    out, candidates = _filtered(logits, config, seen)
    if config.greedy:
        return out.argmax(-1)
    choice = draw(out.softmax(-1), generator)                                 # [b]
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)
