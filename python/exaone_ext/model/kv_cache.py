"""A preallocated key/value cache: one LayerKVCache (k, v) per layer, written in place at each
row's current length."""
from __future__ import annotations

import torch

from .config import ExaoneConfig


class LayerKVCache:
    """One layer's keys and values: k, v [batch_size, max_seq_len, num_key_value_heads, head_dim].
    Unpacks as `k, v = layer`. The lengths live in the KVCache that owns it."""

    __slots__ = ("k", "v")

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def __iter__(self):
        return iter((self.k, self.v))

    def append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor,
               cache_seqlens_max: int, attend) -> torch.Tensor:
        """Writes k, v [b, s, hk, hd] after the seqlens[b] tokens of each row and returns the
        attention of q [b, s, hq, hd] over everything the row then holds (causal):
        `attend` is flash_attn_with_kvcache (kernel or reference), which does both in one pass.
        cache_seqlens_max: the host bound on seqlens (no device read). The caller advances the lengths."""
        return attend(q, self.k, self.v, seqlens, k, v, causal=True, cache_seqlens_max=cache_seqlens_max)

    def write_packed(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Packed tokens k, v [total, hk, hd]: token t goes to row rows[t] at position positions[t]."""
        self.k.index_put_((rows, positions), k)
        self.v.index_put_((rows, positions), v)


class KVCache:
    """layers[i]: LayerKVCache of layer i (k, v [batch_size, max_seq_len, num_key_value_heads, head_dim]);
    seqlens int32 [batch_size]: tokens already cached in each row (the model advances it after a forward).
    host_seqlens: the same lengths in CPU memory (the very same tensor for a CPU cache), so that
    bounds are checked without reading GPU memory back; change lengths through advance() and
    reset(), which keep the two together.

        cache = KVCache(config, batch_size=1, max_seq_len=4096, dtype=torch.bfloat16, device="cpu")
        logits = model(prompt_ids, kv_cache=cache)      # prefill
        logits = model(next_ids, kv_cache=cache)        # decode, one token per row
    """

    def __init__(self, config: ExaoneConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"KVCache: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"KVCache: max_seq_len must be a positive integer, got {max_seq_len!r}")
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(f"KVCache: max_seq_len {max_seq_len} exceeds the model's context "
                             f"(max_position_embeddings {config.max_position_embeddings})")
        shape = (batch_size, max_seq_len, config.num_key_value_heads, config.head_dim)
        self.layers: list[LayerKVCache] = [
            LayerKVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_seqlens = self.seqlens if self.seqlens.is_cpu else torch.zeros(batch_size, dtype=torch.int32)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size

    @classmethod
    def _view(cls, layers, seqlens, host_seqlens, max_seq_len) -> "KVCache":
        cache = cls.__new__(cls)
        cache.layers, cache.seqlens, cache.host_seqlens = layers, seqlens, host_seqlens
        cache.max_seq_len, cache.batch_size = max_seq_len, seqlens.shape[0]
        return cache

    def row(self, b: int) -> "KVCache":
        """A one-row cache sharing storage with row `b` of this one (its writes and its length
        updates land here)."""
        if not -self.batch_size <= b < self.batch_size:
            raise IndexError(f"KVCache.row: row {b} out of range for batch_size {self.batch_size}")
        b = b % self.batch_size
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache of rows start..stop-1 sharing storage with this one."""
        if not 0 <= start < stop <= self.batch_size:
            raise IndexError(f"KVCache.rows: rows {start}..{stop - 1} out of range for batch_size {self.batch_size}")
        lens = self.seqlens[start:stop]
        host = lens if self.host_seqlens is self.seqlens else self.host_seqlens[start:stop]
        return KVCache._view([LayerKVCache(layer.k[start:stop], layer.v[start:stop]) for layer in self.layers],
                             lens, host, self.max_seq_len)

    def keep_rows(self, keep: list[int]) -> "KVCache":
        """A cache holding only rows `keep` (in that order) of this one, moved to the front of the
        same storage (this cache's other rows are overwritten)."""
        n = len(keep)
        if not n or any(not 0 <= r < self.batch_size for r in keep) or len(set(keep)) != n:
            raise ValueError(f"KVCache.keep_rows: expected distinct rows in [0, {self.batch_size}), got {keep}")
        if keep != list(range(n)):
            longest = max((int(self.host_seqlens[r]) for r in keep), default=0)
            idx = torch.tensor(keep, device=self.seqlens.device)
            for layer in self.layers:
                layer.k[:n, :longest] = layer.k[idx, :longest]                    # [n, longest, kv_heads, hd]
                layer.v[:n, :longest] = layer.v[idx, :longest]
            self.seqlens[:n] = self.seqlens[idx]
            if self.host_seqlens is not self.seqlens:
                self.host_seqlens[:n] = self.host_seqlens[torch.tensor(keep)]
        return self.rows(0, n)

    def reset(self) -> None:
        """Forget every cached token (the storage is kept and overwritten by later writes)."""
        self.seqlens.zero_()
        if self.host_seqlens is not self.seqlens:
            self.host_seqlens.zero_()

    def longest(self) -> int:
        """Tokens in the fullest row (from host memory: no device synchronisation)."""
        return int(self.host_seqlens.max()) if self.batch_size else 0

    def check_room(self, new_tokens: int) -> int:
        """Raise ValueError if appending `new_tokens` to any row would pass max_seq_len; returns
        longest() (the tokens in the fullest row before the append: the host bound the attention
        op is given)."""
        longest = self.longest()
        if longest + new_tokens > self.max_seq_len:
            raise ValueError(f"KVCache: appending {new_tokens} token(s) to a row holding {longest} would exceed "
                             f"max_seq_len {self.max_seq_len}")
        return longest

    def advance(self, new_tokens) -> None:
        """Record that `new_tokens` were appended to every row (an int), or new_tokens[b] to row b
        (a list of ints)."""
        if isinstance(new_tokens, int):
            self.seqlens += new_tokens
            if self.host_seqlens is not self.seqlens:
                self.host_seqlens += new_tokens
            return
        host = torch.tensor(new_tokens, dtype=torch.int32)
        if host.shape != (self.batch_size,):
            raise ValueError(f"KVCache.advance: expected {self.batch_size} lengths, got {list(new_tokens)}")
        self.seqlens += host.to(self.seqlens.device)
        if self.host_seqlens is not self.seqlens:
            self.host_seqlens += host

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    @property
    def device(self) -> torch.device:
        return self.seqlens.device

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        k = self.layers[0].k if self.layers else None
        return (f"KVCache(layers={len(self.layers)}, batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"kv_heads={k.shape[2] if k is not None else '?'}, head_dim={k.shape[3] if k is not None else '?'}, "
                f"dtype={self.dtype if k is not None else '?'}, seqlens={self.seqlens.tolist()})")
