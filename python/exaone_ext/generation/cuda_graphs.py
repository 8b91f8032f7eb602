"""CUDA graphs of the decode step: one captured forward per batch-size bucket, replayed by the Engine.

A decode step of a small model on a GPU is bound by kernel launches, not by the GPU: hundreds of
small kernels, each launched from Python. Captured once into a CUDA graph, the whole forward is
one launch. What makes the captured forward valid for every later step:

- Static tensors. The token ids are copied into a buffer the graph reads; the KV cache is the
  Engine's own (allocated once, rows kept at the front, so rows 0..B-1 of a bucket B are always
  the same memory); the logits come out in a buffer the graph writes (read before the next replay).
- No host values that change. A forward's host-side bounds (the fullest row's length, the largest
  position) are fixed at capture, so the graph is captured with the cache's largest length as the
  bound: the split-KV plan covers any length, and the kernels read each row's real length from the
  device (clamped, so nothing outside the cache is touched). The host lengths advance after each
  replay as the forward would have advanced them.
- Padded rows. n active rows replay the graph of the smallest bucket B >= n; rows n..B-1 are free
  rows: their lengths are zeroed first, so their (discarded) token lands at position 0 of a row
  that is reset before it is used again.

A bucket is captured after `capture_after` eager steps at that size (a short generation never
pays for a capture); sampling stays outside the graph, on the device. If a capture fails (an op
that cannot be captured, such as the plain-PyTorch reference ops' host reads), graphs are turned
off for this Engine with a warning and decoding goes on eagerly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = ["DecodeGraphs"]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    view: object          # the KVCache view of rows 0..B-1 the graph decodes
    ids: torch.Tensor     # [B, 1] int64: the tokens the graph reads
    logits: torch.Tensor  # [B, 1, V] float32: what it writes


def _buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    """Decode forwards of `model` over the first rows of `cache` (a CUDA KVCache), as CUDA graphs.

    logits(next_tokens) -> [n, V] float32 for the n = len(next_tokens) first rows (the cache's
    lengths advanced by one, as model(next_tokens[:, None], kv_cache=cache.rows(0, n)) would), or
    None when this step should run eagerly (a bucket not yet captured, or graphs off).
    buckets: the batch sizes captured (powers of two up to max_batch, and max_batch).
    disabled: why graphs were turned off, or None."""

    def __init__(self, model, cache, max_batch: int, capture_after: int = 4):
        if cache.device.type != "cuda":
            raise ValueError(f"DecodeGraphs: CUDA graphs need a CUDA KV cache, got one on {cache.device}")
        if not isinstance(max_batch, int) or not 1 <= max_batch <= cache.batch_size:
            raise ValueError(f"DecodeGraphs: max_batch must be in [1, {cache.batch_size}] (the cache's rows), "
                             f"got {max_batch!r}")
        self.model, self.cache, self.capture_after = model, cache, capture_after
        self.buckets = _buckets(max_batch)
        self.disabled: str | None = None
        self.replays = 0
        self._captured: dict[int, _Captured] = {}
        self._eager_steps: dict[int, int] = {}
        self._pool = None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def logits(self, next_tokens: torch.Tensor) -> torch.Tensor | None:
        n = next_tokens.shape[0]
        if self.disabled is not None or n == 0:
            return None
        b = self.bucket(n)
        captured = self._captured.get(b)
        if captured is None:
            self._eager_steps[b] = self._eager_steps.get(b, 0) + 1
            if self._eager_steps[b] <= self.capture_after:
                return None
            captured = self._capture(b)
            if captured is None:
                return None
        cache = self.cache
        if b > n:  # free rows decode too: at position 0 of rows reset before they are used again
            cache.seqlens[n:b].zero_()
            cache.host_seqlens[n:b].zero_()
        captured.view.check_room(1)  # what the forward checks on the host, which a replay skips
        captured.ids[:n, 0].copy_(next_tokens)
        captured.graph.replay()
        cache.host_seqlens[:b] += 1  # the graph advanced the device lengths of rows 0..b-1
        self.replays += 1
        return captured.logits[:n, -1]

    def _capture(self, b: int) -> _Captured | None:
        """Capture the decode forward of rows 0..b-1; None (and graphs off) if it cannot be captured."""
        cache, model = self.cache, self.model
        view = cache.rows(0, b)
        device_lens, host_lens = cache.seqlens[:b].clone(), cache.host_seqlens[:b].clone()
        ids = torch.zeros(b, 1, dtype=torch.long, device=cache.device)
        try:
            # the host bound the forward plans with: any length a later replay may meet
            cache.host_seqlens[:b] = cache.max_seq_len - 1
            side = torch.cuda.Stream(cache.device)
            side.wait_stream(torch.cuda.current_stream(cache.device))
            with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisations)
                for _ in range(2):
                    cache.seqlens[:b].copy_(device_lens)
                    model(ids, kv_cache=view, num_logits_to_keep=1)
                    cache.host_seqlens[:b] = cache.max_seq_len - 1
            torch.cuda.current_stream(cache.device).wait_stream(side)
            cache.seqlens[:b].copy_(device_lens)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: CUDA calls of other threads (a server's) are not caught by this capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = model(ids, kv_cache=view, num_logits_to_keep=1)
        except Exception as e:  # noqa: BLE001 (any op that cannot be captured: decode eagerly instead)
            self.disabled = f"capturing the decode step of {b} rows failed: {type(e).__name__}: {e}"
            warnings.warn(f"exaone_ext: CUDA graphs off for this engine ({self.disabled})", RuntimeWarning,
                          stacklevel=3)
            return None
        finally:
            # the warm-up advanced the device lengths and wrote past each row's end (overwritten by
            # the next real step); the capture advanced the host lengths: both as they were
            cache.seqlens[:b].copy_(device_lens)
            cache.host_seqlens[:b].copy_(host_lens)
        captured = _Captured(graph, view, ids, logits)
        self._captured[b] = captured
        return captured
