"""Server counters, rendered in the Prometheus text exposition format (version 0.0.4).

Written by the engine thread (steps, batch sizes, tokens) and the event loop (requests, time to
first token); each value is a plain int/float updated under one lock.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

PREFIX = "exaone"
# Tokens/s is the rate over this many recent seconds.
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()   # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_steps = 0
        self.batch_size_sum = 0
        self.batch_size = 0        # rows that got a token in the last step
        self.batch_size_max = 0
        self.running = 0
        self.waiting = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._recent: deque[tuple[float, int]] = deque()      # (time, tokens) of recent steps

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def step(self, batch: int, tokens: int, running: int, waiting: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.running, self.waiting = running, waiting
            if batch:
                self.decode_steps += 1
                self.batch_size_sum += batch
                self.batch_size_max = max(self.batch_size_max, batch)
            self.batch_size = batch
            self.generation_tokens += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        span = now - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

    def render(self) -> str:
        rate = self.tokens_per_s()
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {PREFIX}_{name} {help_}")
                lines.append(f"# TYPE {PREFIX}_{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{PREFIX}_{name}{labels} {value:g}" if isinstance(value, float)
                                 else f"{PREFIX}_{name}{labels} {value}")

            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())]
                   or [("", 0)])
            metric("prompt_tokens_total", "counter", "Prompt tokens admitted to the engine.",
                   [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("requests_running", "gauge", "Requests holding a KV-cache row.", [("", self.running)])
            metric("requests_waiting", "gauge", "Requests queued for a free row.", [("", self.waiting)])
            metric("batch_size", "gauge", "Sequences that advanced in the last engine step.",
                   [("", self.batch_size)])
            metric("batch_size_max", "gauge", "Largest number of sequences advanced in one step.",
                   [("", self.batch_size_max)])
            metric("decode_steps_total", "counter", "Engine steps that advanced at least one sequence.",
                   [("", self.decode_steps)])
            metric("batch_size_sum", "counter", "Sequences advanced, summed over steps (mean batch = "
                   "batch_size_sum / decode_steps_total).", [("", self.batch_size_sum)])
            metric("generation_tokens_per_second", "gauge",
                   f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [("", float(rate))])
            metric("time_to_first_token_seconds", "summary", "From request admission to its first token.",
                   [("_sum", float(self.ttft_sum)), ("_count", self.ttft_count)])
        return "\n".join(lines) + "\n"
