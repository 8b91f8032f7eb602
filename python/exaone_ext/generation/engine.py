"""Batched generation with a preallocated KV cache, and streaming.

    results = generate(model, tokenizer, ["Hello", [{"role": "user", "content": "안녕?"}]],
                       GenerationConfig(max_new_tokens=64))
    for piece in stream(model, tokenizer, [{"role": "user", "content": "안녕?"}]):
        print(piece, end="", flush=True)

How a batch runs: every prompt is prefilled into its own row of one KVCache (ragged lengths,
no padding; neighbouring prompts packed into one forward, documents attended separately, up to
_PACK_TOKENS tokens or prefill_chunk_size a pack), then all rows decode together, one token per
row per step, each row attending to its own cache length. A row that stops is dropped from the batch at the next check, its cache row
moved out of the way, so finished sequences cost nothing. Token ids stay on the device between
checks; the host reads them when streaming or stop strings need the text, when a row reaches its
length limit, or every few steps on a GPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..tokenizer import ExaoneTokenizer, StreamDecoder
from .config import GenerationConfig
from .sampling import select_next_tokens

__all__ = ["GenerationResult", "GenerationStats", "TextStream", "generate", "stream", "prepare_prompts"]

STOP_TOKEN, STOP_STRING, LENGTH = "stop_token", "stop_string", "length"
# Most prompt tokens prefilled in one packed forward when no prefill_chunk_size is given (a longer
# single prompt still goes whole): bounds the activations of a pack.
_PACK_TOKENS = 8192
# Decode steps between host reads when nothing needs each token at once. On a CPU the read is
# free and lets finished rows drop out immediately; on a GPU it would stall the queue.
_SYNC_EVERY = {"cpu": 1, "cuda": 8}


@dataclass
class GenerationStats:
    """Throughput of one generate() call. Prefill covers every prompt token up to the first
    sampled token; decode covers the tokens sampled after it."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"prefill {self.prefill_tokens} tok in {self.prefill_seconds:.3f}s "
                f"({self.prefill_tokens_per_s:.1f} tok/s), decode {self.decode_tokens} tok in "
                f"{self.decode_seconds:.3f}s ({self.decode_tokens_per_s:.1f} tok/s)")


@dataclass
class GenerationResult:
    """One sequence's output. tokens: the generated ids (a stop token is not included; for a stop
    string, up to the token that completed it). text: their decoded text without special tokens,
    cut before a stop string. stop_reason: 'stop_token', 'stop_string' or 'length'."""

    tokens: list[int]
    text: str
    stop_reason: str
    prompt_tokens: int
    stats: GenerationStats = field(repr=False)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.stats.prefill_tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.stats.decode_tokens_per_s


# ---------------------------------------------------------------------------- prompts
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, Mapping) for m in x)


def _is_token_list(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_int(t) for t in x)


def prepare_prompts(tokenizer: ExaoneTokenizer, prompts) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt and whether a single prompt was given.

    A prompt is a string (used as is: no chat template), a list of token ids, or a chat (a list of
    {"role", "content"} dicts, formatted with the tokenizer's chat template). `prompts` is one
    prompt or a list of them."""
    def one(p, where: str) -> list[int]:
        if isinstance(p, str):
            return tokenizer.encode(p)
        if _is_messages(p):
            return tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
        if _is_token_list(p):
            return [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        raise TypeError(f"{where}: expected a string, a list of token ids or a list of chat messages, "
                        f"got {type(p).__name__}" + (" (empty)" if hasattr(p, "__len__") and not len(p) else ""))

    if isinstance(prompts, str) or _is_messages(prompts) or _is_token_list(prompts):
        return [one(prompts, "prompt")], True
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2 and not prompts.is_floating_point():
        return [[int(t) for t in row] for row in prompts.tolist()], False
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts: expected a prompt or a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list (nothing to generate from)")
    return [one(p, f"prompts[{i}]") for i, p in enumerate(prompts)], False


# ---------------------------------------------------------------------------- one sequence
class _Row:
    """Host-side state of one sequence: its tokens, its text and when it stops."""

    def __init__(self, prompt_len: int, budget: int, decoder: StreamDecoder, stop_ids: frozenset[int],
                 stop_strings: list[str]):
        self.prompt_len, self.budget = prompt_len, budget
        self.decoder, self.stop_ids, self.stop_strings = decoder, stop_ids, stop_strings
        self.longest_stop = max((len(s) for s in stop_strings), default=0)
        self.tokens: list[int] = []
        self.sampled = 0  # tokens drawn for this row, the stop token included
        self.text = ""
        self.emitted = 0  # characters of text already handed out
        self.stop_reason: str | None = None

    def push(self, token: int) -> str:
        """Take the next sampled token; returns the text that may be shown now."""
        self.sampled += 1
        if token in self.stop_ids:
            self.stop_reason = STOP_TOKEN
            return self._finish()
        self.tokens.append(token)
        start = len(self.text)
        self.text += self.decoder.add(token)
        if self.stop_strings and self._cut_at_stop_string(start):
            return self._finish(flush=False)
        if len(self.tokens) >= self.budget:
            self.stop_reason = LENGTH
            return self._finish()
        end = len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def _finish(self, flush: bool = True) -> str:
        if flush:
            start = len(self.text)
            self.text += self.decoder.flush()
            if self.stop_strings:
                self._cut_at_stop_string(start)
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece

    def _cut_at_stop_string(self, new_from: int) -> bool:
        """Look for a stop string overlapping the text added from `new_from`; cut the text before it."""
        lo = max(0, new_from - self.longest_stop + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop_strings) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.emitted = min(self.emitted, len(self.text))
        self.stop_reason = STOP_STRING
        return True

    def _held_back(self) -> int:
        """Characters at the end of the text that might be the start of a stop string."""
        for k in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0


# ---------------------------------------------------------------------------- the loop
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError("model: has no floating-point parameters")


def _stop_ids(tokenizer: ExaoneTokenizer, model, config: GenerationConfig) -> frozenset[int]:
    if config.stop_token_ids is not None:
        return frozenset(config.stop_token_ids)
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return frozenset(ids)


@torch.inference_mode()
def _generate_iter(model, tokenizer: ExaoneTokenizer, prompt_ids: list[list[int]], config: GenerationConfig,
                   prefill_chunk_size: int | None, stream_text: bool) -> Iterator[tuple[int, str]]:
    """Yields (row, text piece) as text becomes final; returns the list of GenerationResult."""
    from ..model import KVCache

    mconf = model.config
    context, vocab = mconf.max_position_embeddings, mconf.vocab_size
    for i, ids in enumerate(prompt_ids):
        where = f"prompts[{i}]" if len(prompt_ids) > 1 else "prompt"
        if not ids:
            raise ValueError(f"{where}: has no tokens (an empty prompt cannot be continued)")
        if len(ids) > context:
            raise ValueError(f"{where}: {len(ids)} tokens is longer than the model's context of {context} tokens "
                             f"(max_position_embeddings)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab})")
    if prefill_chunk_size is not None and (not _is_int(prefill_chunk_size) or prefill_chunk_size < 1):
        raise ValueError(f"prefill_chunk_size: expected a positive integer or None, got {prefill_chunk_size!r}")

    dtype, device = _model_dtype_device(model)
    batch = len(prompt_ids)
    # The first token comes from the prefill logits; each later one needs its predecessor in the cache.
    budgets = [min(config.max_new_tokens, context - len(ids) + 1) for ids in prompt_ids]
    cache = KVCache(mconf, batch, max(len(ids) + b - 1 for ids, b in zip(prompt_ids, budgets)),
                    dtype=dtype, device=device)
    stop_ids = _stop_ids(tokenizer, model, config)
    generator = None
    if config.seed is not None and not config.greedy:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    chunk = prefill_chunk_size or max(len(ids) for ids in prompt_ids)

    # ---- prefill: each prompt into its own cache row, exact lengths. Neighbouring prompts that fit
    # one pack together go through one forward (packed, cu_seqlens): one pass over the weights
    # for all of them; a prompt alone in its pack goes in chunks of `chunk` tokens.
    _sync(device)
    t0 = time.perf_counter()
    last_logits = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)          # [b, V]
    pack = prefill_chunk_size or max(_PACK_TOKENS, chunk)
    first = 0
    while first < batch:
        stop, total = first + 1, len(prompt_ids[first])
        while stop < batch and total + len(prompt_ids[stop]) <= pack:
            total += len(prompt_ids[stop])
            stop += 1
        if stop - first == 1:
            row_cache = cache.row(first)
            x = torch.tensor(prompt_ids[first], dtype=torch.long, device=device)[None]  # [1, s]
            for start in range(0, x.shape[1], chunk):
                out = model(x[:, start:start + chunk], kv_cache=row_cache, num_logits_to_keep=1)
            last_logits[first] = out[0, -1]
        else:
            group = prompt_ids[first:stop]
            x = torch.tensor([t for ids in group for t in ids], dtype=torch.long, device=device)  # [total]
            bounds = [0]
            for ids in group:
                bounds.append(bounds[-1] + len(ids))
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            out = model(x, cu_seqlens=cu, kv_cache=cache.rows(first, stop), num_logits_to_keep=1)  # [n, 1, V]
            last_logits[first:stop] = out[:, -1]
        if seen is not None:
            for b in range(first, stop):
                seen[b, torch.tensor(prompt_ids[b], device=device)] = True
        first = stop
    next_tokens = select_next_tokens(last_logits, config, seen, generator)       # [b]
    _sync(device)
    t1 = time.perf_counter()

    # ---- decode: all unfinished rows together, one token per row per step
    rows = [_Row(len(ids), budget, tokenizer.stream_decoder(skip_special_tokens=True), stop_ids,
                 config.stop_strings) for ids, budget in zip(prompt_ids, budgets)]
    active = list(range(batch))                  # original index of each cache row in use
    sync_every = 1 if (stream_text or config.stop_strings) else _SYNC_EVERY.get(device.type, 1)
    pending: list[torch.Tensor] = []
    step, paused = 0, 0.0
    while True:
        pending.append(next_tokens)
        step += 1
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        if step % sync_every == 0 or any(rows[r].budget == step for r in active):
            host = torch.stack(pending, 1).tolist()                                # [n, steps since last read]
            pending.clear()
            keep = []
            for pos, r in enumerate(active):
                row = rows[r]
                for token in host[pos]:
                    if row.stop_reason is not None:
                        break
                    piece = row.push(token)
                    if piece and stream_text:
                        paused_from = time.perf_counter()
                        yield r, piece
                        paused += time.perf_counter() - paused_from  # the consumer's time is not decode time
                if row.stop_reason is None:
                    keep.append(pos)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                next_tokens = next_tokens[idx]
                seen = seen[idx] if seen is not None else None
                cache = cache.keep_rows(keep)
                active = [active[p] for p in keep]
        logits = model(next_tokens[:, None], kv_cache=cache, num_logits_to_keep=1)  # [n, 1, V]
        next_tokens = select_next_tokens(logits[:, -1], config, seen, generator)
    _sync(device)
    t2 = time.perf_counter()

    sampled = sum(r.sampled for r in rows)
    stats = GenerationStats(prefill_tokens=sum(len(p) for p in prompt_ids), prefill_seconds=t1 - t0,
                            decode_tokens=sampled - batch, decode_seconds=t2 - t1 - paused)
    return [GenerationResult(tokens=r.tokens, text=r.text, stop_reason=r.stop_reason, prompt_tokens=r.prompt_len,
                             stats=stats) for r in rows]


def _check_args(model, tokenizer, config) -> GenerationConfig:
    if not isinstance(tokenizer, ExaoneTokenizer):
        raise TypeError(f"tokenizer: expected ExaoneTokenizer, got {type(tokenizer).__name__}")
    if not hasattr(model, "config") or not hasattr(model.config, "max_position_embeddings"):
        raise TypeError(f"model: expected an ExaoneForCausalLM, got {type(model).__name__}")
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config: expected GenerationConfig, got {type(config).__name__}")
    return config


def generate(model, tokenizer: ExaoneTokenizer, prompts, config: GenerationConfig | None = None, *,
             callback: Callable[[int, str], None] | None = None,
             prefill_chunk_size: int | None = None) -> GenerationResult | list[GenerationResult]:
    """Generate continuations of one prompt or a batch of prompts of any lengths.

    prompts: a string (no chat template), a list of token ids, a chat (list of message dicts,
    formatted with EXAONE's chat template), or a list mixing these. Returns one GenerationResult
    for a single prompt, else a list in the same order.
    callback(row, text_piece): called as each row's text grows (UTF-8-safe pieces).
    prefill_chunk_size: prefill long prompts this many tokens at a time, and pack short prompts of a
    batch into forwards of at most this many tokens (bounds activation memory; default: whole
    prompts, packs of up to 8192 tokens).
    """
    config = _check_args(model, tokenizer, config)
    prompt_ids, single = prepare_prompts(tokenizer, prompts)
    it = _generate_iter(model, tokenizer, prompt_ids, config, prefill_chunk_size, stream_text=callback is not None)
    while True:
        try:
            row, piece = next(it)
        except StopIteration as done:
            results = done.value
            break
        callback(row, piece)
    return results[0] if single else results


class TextStream:
    """Iterates over text pieces as they are generated; `.result` holds the GenerationResult once
    the iteration has finished."""

    def __init__(self, it: Iterator[tuple[int, str]]):
        self._it = it
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                _, piece = next(self._it)
            except StopIteration as done:
                self.result = done.value[0]
                return
            yield piece


def stream(model, tokenizer: ExaoneTokenizer, prompt, config: GenerationConfig | None = None, *,
           prefill_chunk_size: int | None = None) -> TextStream:
    """Generate for one prompt, yielding text pieces as they are decoded (never a partial UTF-8
    character, never text of a stop string). Arguments as for `generate`."""
    config = _check_args(model, tokenizer, config)
    prompt_ids, single = prepare_prompts(tokenizer, prompt)
    if not single:
        raise TypeError("stream: takes one prompt; for a batch use generate(..., callback=fn(row, piece))")
    return TextStream(_generate_iter(model, tokenizer, prompt_ids, config, prefill_chunk_size, stream_text=True))
