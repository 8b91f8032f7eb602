"""The decontamination method in plain Python: the oracle for the compiled pool in tests and the
baseline in benchmarks/bench_decontaminate.py. Same normalisation, same windows, same sampler
(positions drawn with splitmix64 seeded from the content), same results, one document at a time."""
from __future__ import annotations

from collections.abc import Sequence

_M = (1 << 64) - 1
HASH_BASE = 0xd6e8feb86659fd93
_GOLDEN = 0x9E3779B97F4A7C15


def normalize(text: str) -> str:
    """Alphanumeric characters only (str.isalnum), each lower-cased on its own (str.lower)."""
    return "".join(ch.lower() for ch in text if ch.isalnum())


def fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xff51afd7ed558ccd) & _M
    k ^= k >> 33
    k = (k * 0xc4ceb9fe1a85ec53) & _M
    return k ^ (k >> 33)


def whole_key(norm: str) -> int:
    """64-bit key of a whole normalised text (the sampler's seed): the polynomial hash of the code
    points in four interleaved lanes (character i in lane i % 4), folded together with fmix64."""
    lanes = [0, 0, 0, 0]
    for i, ch in enumerate(norm):
        lanes[i & 3] = (lanes[i & 3] * HASH_BASE + ord(ch) + 1) & _M
    x = (len(norm) * _GOLDEN) & _M
    for h in lanes:
        x = fmix64(x ^ h)
    return x | 1


def sample_offsets(norm: str, window: int, samples: int) -> list[int]:
    """Window starts checked in sampled mode: every one when there are at most `samples`, else
    `samples` draws (with replacement) from splitmix64 seeded by whole_key(norm)."""
    n = len(norm) - window + 1
    if n <= samples:
        return list(range(n))
    state, out = whole_key(norm), []
    for _ in range(samples):
        state = (state + _GOLDEN) & _M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
        out.append((z ^ (z >> 31)) % n)
    return out


class ReferencePool:
    """tests[i] belongs to benchmark groups[i]. check(doc) -> [(test, offset)], one per matched
    benchmark, in benchmark order: the first matching window (in checking order) and the first test
    example (in input order) of that benchmark that holds it."""

    def __init__(self, tests: Sequence[str], groups: Sequence[int], window: int = 50):
        self.window, self.groups = window, list(groups)
        self.windows: dict[str, dict[int, int]] = {}
        self.short: dict[str, dict[int, int]] = {}
        for t, text in enumerate(tests):
            norm, g = normalize(text), self.groups[t]
            if not norm:
                continue
            if len(norm) < window:
                self.short.setdefault(norm, {}).setdefault(g, t)
                continue
            for i in range(len(norm) - window + 1):
                self.windows.setdefault(norm[i:i + window], {}).setdefault(g, t)

    def check(self, doc: str, mode: str = "sampled", samples: int = 10) -> list[tuple[int, int]]:
        norm, w = normalize(doc), self.window
        found: dict[int, tuple[int, int]] = {}
        if not norm:
            return []
        if len(norm) < w:
            for g, t in self.short.get(norm, {}).items():
                found.setdefault(g, (t, 0))
        else:
            offsets = range(len(norm) - w + 1) if mode == "exhaustive" else sample_offsets(norm, w, samples)
            for i in offsets:
                for g, t in self.windows.get(norm[i:i + w], {}).items():
                    found.setdefault(g, (t, i))
        return [found[g] for g in sorted(found)]
