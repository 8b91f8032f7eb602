"""Generation as a step function over a batch whose rows come and go, and generate / stream on it.

    engine = Engine(model, tokenizer, max_batch=8)
    a = engine.add("Hello", GenerationConfig(max_new_tokens=64))
    b = engine.add([{"role": "user", "content": "안녕?"}], GenerationConfig(do_sample=True, seed=1))
    while engine.has_work:
        for event in engine.step():               # new requests may be added between steps
            print(event.request.id, event.text, end="", flush=True)

    results = generate(model, tokenizer, ["Hello", "안녕?"], GenerationConfig(max_new_tokens=64))
    for piece in stream(model, tokenizer, [{"role": "user", "content": "안녕?"}]):
        print(piece, end="", flush=True)

How a step runs: waiting requests take free rows of one KVCache (exact lengths, no padding) and
are prefilled, neighbouring prompts packed into one forward (documents attended separately, up to
_PACK_TOKENS tokens or prefill_chunk_size a pack; a prompt alone in its pack goes in chunks); then
every active row decodes one token, each attending to its own cache length. When rows are already
decoding, the newcomers of one pack ride in the decode pass itself (their prompts packed after the
running rows' next tokens), so a step that admits reads the weights once, not twice; a prompt longer
than a pack goes in one pack-sized chunk per step, each chunk in that step's decode pass (its row
continued after the running rows), so the running rows keep producing a token every step while it
fills. Rows of finished or
cancelled requests are dropped and the others moved up, so the active rows are always the first
rows of the cache and a step costs what its active rows cost. Sampling settings are per request;
rows with the same settings are sampled together. Token ids stay on the device between host
reads: every step when stop strings need the text, when a row reaches its length limit, or
every `sync_every` steps (1 on a CPU, where a read is free; 8 on a GPU, where it would stall the queue).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..tokenizer import ExaoneTokenizer, StreamDecoder
from .config import GenerationConfig
from .sampling import select_next_tokens

__all__ = ["Engine", "Event", "Request", "GenerationResult", "GenerationStats", "TextStream", "generate", "stream",
           "prepare_prompts"]

STOP_TOKEN, STOP_STRING, LENGTH, CANCELLED = "stop_token", "stop_string", "length", "cancelled"
# Most prompt tokens prefilled in one packed forward when no prefill_chunk_size is given (a longer
# single prompt still goes whole): bounds the activations of a pack.
_PACK_TOKENS = 8192
# Decode steps between host reads when nothing needs each token at once. On a CPU the read is
# free and lets finished rows drop out immediately; on a GPU it would stall the queue.
_SYNC_EVERY = {"cpu": 1, "cuda": 8}


@dataclass
class GenerationStats:
    """Throughput. Prefill covers the prompt tokens up to the first sampled token; decode covers
    the tokens sampled after it."""

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
    cut before a stop string. stop_reason: 'stop_token', 'stop_string', 'length' or 'cancelled'."""

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


def _check_prompt_ids(ids: list[int], where: str, model, max_seq_len: int | None = None) -> None:
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if not ids:
        raise ValueError(f"{where}: has no tokens (an empty prompt cannot be continued)")
    if len(ids) > context:
        raise ValueError(f"{where}: {len(ids)} tokens is longer than the model's context of {context} tokens "
                         f"(max_position_embeddings)")
    if max_seq_len is not None and len(ids) > max_seq_len:
        raise ValueError(f"{where}: {len(ids)} tokens is longer than the engine's max_seq_len of {max_seq_len}")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab})")


# ---------------------------------------------------------------------------- one sequence's text
class _Text:
    """Host-side state of one sequence: its tokens, its text and when it stops."""

    def __init__(self, budget: int, decoder: StreamDecoder, stop_ids: frozenset[int], stop_strings: list[str]):
        self.budget, self.decoder, self.stop_ids, self.stop_strings = budget, decoder, stop_ids, stop_strings
        self.longest_stop = max((len(s) for s in stop_strings), default=0)
        self.tokens: list[int] = []
        self.sampled = 0  # tokens drawn for this sequence, the stop token included
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


# ---------------------------------------------------------------------------- requests and events
_request_ids = itertools.count()


class Request:
    """One prompt's generation in an Engine. Read-only for callers: id, prompt_ids, config,
    tokens (generated so far), text (final so far), stop_reason (None while running: 'stop_token',
    'stop_string', 'length' or 'cancelled'), done, prompt_tokens, stats (this request's own)."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, text: _Text,
                 generator: torch.Generator | None):
        self.id = next(_request_ids)
        self.prompt_ids = prompt_ids
        self.config = config
        self.stats = GenerationStats(prefill_tokens=len(prompt_ids))
        self._text = text
        self._generator = generator
        self._drawn = 0           # tokens sampled on the device (some may not be read yet)
        self._cancelled = False

    @property
    def tokens(self) -> list[int]:
        return self._text.tokens

    @property
    def text(self) -> str:
        return self._text.text

    @property
    def stop_reason(self) -> str | None:
        return self._text.stop_reason

    @property
    def done(self) -> bool:
        return self._text.stop_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def result(self, stats: GenerationStats | None = None) -> GenerationResult:
        """The outcome as a GenerationResult (with `stats`, default this request's own)."""
        return GenerationResult(tokens=list(self.tokens), text=self.text, stop_reason=self.stop_reason,
                                prompt_tokens=self.prompt_tokens, stats=self.stats if stats is None else stats)

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt_tokens={self.prompt_tokens}, tokens={len(self.tokens)}, "
                f"stop_reason={self.stop_reason!r})")


@dataclass
class Event:
    """What one step did for one request: text (new final text: never a partial UTF-8 character
    nor part of a stop string), token_ids (tokens appended to request.tokens), finished."""

    request: Request
    text: str
    token_ids: list[int]
    finished: bool


# ---------------------------------------------------------------------------- the engine
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


def _check_model_tokenizer(model, tokenizer) -> None:
    if not isinstance(tokenizer, ExaoneTokenizer):
        raise TypeError(f"tokenizer: expected ExaoneTokenizer, got {type(tokenizer).__name__}")
    if not hasattr(model, "config") or not hasattr(model.config, "max_position_embeddings"):
        raise TypeError(f"model: expected an ExaoneForCausalLM, got {type(model).__name__}")


def _check_config(config) -> GenerationConfig:
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config: expected GenerationConfig, got {type(config).__name__}")
    return config


def _sampling_key(request: Request) -> tuple:
    """Rows with equal keys are sampled in one call. A seeded request draws from its own generator."""
    c = request.config
    if c.greedy:
        return ("greedy", c.repetition_penalty)
    return ("sample", c.temperature, c.top_k, c.top_p, c.min_p, c.repetition_penalty,
            None if request._generator is None else request.id)


class Engine:
    """A batch of generations that requests join (`add`) and leave (finished or `cancel`led)
    between steps. `step()` admits waiting requests into free rows (prefilled together), decodes
    one token for every active row and returns the Events of the tokens read back.

    max_batch: rows of the KV cache (requests decoded at once; others wait). max_seq_len: tokens a
    row holds, prompt and generated (default: the model's context); the cache, max_batch x
    max_seq_len, is allocated at the first step. prefill_chunk_size: as for `generate`.
    cuda_graphs: on a GPU, decode steps replay CUDA graphs of the forward (one per batch-size
    bucket, captured after a few eager steps of that size; see generation.cuda_graphs); ignored
    elsewhere (the attribute then reads False).
    sync_every (attribute): decode steps between host reads when nothing needs each token at once.
    mix_prefill (attribute, default True): newcomers join the running rows' decode pass rather than
    being prefilled in a pass of their own first (a prompt longer than a pack: one chunk per step,
    in the decode pass); off, they are prefilled whole before the decode pass.
    Not thread-safe: one caller drives add / cancel / step."""

    def __init__(self, model, tokenizer: ExaoneTokenizer, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk_size: int | None = None, cuda_graphs: bool = True):
        _check_model_tokenizer(model, tokenizer)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"Engine: cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        context = model.config.max_position_embeddings
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"Engine: max_batch must be a positive integer, got {max_batch!r}")
        if max_seq_len is not None and (not _is_int(max_seq_len) or not 1 <= max_seq_len <= context):
            raise ValueError(f"Engine: max_seq_len must be an integer in [1, {context}] (the model's context) or "
                             f"None, got {max_seq_len!r}")
        if prefill_chunk_size is not None and (not _is_int(prefill_chunk_size) or prefill_chunk_size < 1):
            raise ValueError(f"prefill_chunk_size: expected a positive integer or None, got {prefill_chunk_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_seq_len = max_batch, context if max_seq_len is None else max_seq_len
        self.prefill_chunk_size = prefill_chunk_size
        self.dtype, self.device = _model_dtype_device(model)
        self.sync_every = _SYNC_EVERY.get(self.device.type, 1)
        self.mix_prefill = True
        self.stats = GenerationStats()           # totals over every step
        self._cache = None                       # KVCache [max_batch, max_seq_len], made at the first admission
        self._view = None                        # its rows 0..num_active-1
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []         # request of each cache row, in row order
        self._next: torch.Tensor | None = None   # [num_active] the last sampled token of each row (not yet cached)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (first row, tokens) sampled, not yet read back
        self._unread_steps = 0
        self._seen: torch.Tensor | None = None   # bool [max_batch, V]: tokens in each row (repetition penalty)
        self._groups: list[tuple[torch.Tensor | None, Request]] | None = None  # rows sampled together
        self._to_cancel: list[Request] = []
        self._filling: Request | None = None     # a long prompt prefilled chunk by chunk, in row num_active
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs = None                      # DecodeGraphs over the cache, made with it on CUDA

    # ---- the public surface
    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        """Requests not decoding yet: queued, or a long prompt being prefilled chunk by chunk."""
        return len(self._waiting) + (self._filling is not None)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active or self._to_cancel or self._filling is not None)

    def add(self, prompt, config: GenerationConfig | None = None) -> Request:
        """Queue one prompt (a string, token ids or chat messages); it joins the batch at the next
        step() with a free row. Checked now: ValueError / TypeError for a prompt the model cannot take."""
        config = _check_config(config)
        ids, single = prepare_prompts(self.tokenizer, prompt)
        if not single:
            raise TypeError("Engine.add: takes one prompt (a string, token ids or chat messages); add a batch "
                            "one prompt at a time")
        ids = ids[0]
        _check_prompt_ids(ids, "prompt", self.model, self.max_seq_len)
        context = self.model.config.max_position_embeddings
        # the first token comes from the prefill logits; each later one needs its predecessor cached
        budget = min(config.max_new_tokens, context - len(ids) + 1, self.max_seq_len - len(ids) + 1)
        text = _Text(budget, self.tokenizer.stream_decoder(skip_special_tokens=True),
                     _stop_ids(self.tokenizer, self.model, config), config.stop_strings)
        generator = None
        if config.seed is not None and not config.greedy:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        request = Request(ids, config, text, generator)
        self._waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request`; its row is freed at the next step(), which reports it finished
        (stop_reason 'cancelled'). Nothing happens for a request already done."""
        if not isinstance(request, Request):
            raise TypeError(f"Engine.cancel: expected a Request, got {type(request).__name__}")
        if request.done or request._cancelled:
            return
        if request not in self._waiting and request not in self._active and request is not self._filling:
            raise ValueError(f"Engine.cancel: request {request.id} is not one of this engine's")
        request._cancelled = True
        self._to_cancel.append(request)

    @torch.inference_mode()
    def step(self, on_admitted: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """Admit waiting requests into free rows (prefilled), decode one token for every active row;
        returns the Events of the tokens read back to the host in this step.

        Newcomers that fit one pack join the running rows' decode pass (their prompts packed after
        the rows' next tokens: one pass over the weights); a prompt longer than a pack goes into the
        decode pass one chunk per step, the next waiting requests queued behind it; with no running
        rows, or `mix_prefill` off, newcomers are prefilled in a pass (or chunks) of their own first.

        on_admitted: when requests were admitted, called as soon as their first tokens are read
        back, with the Events read so far (those Events are then not returned): after a prefill
        pass of their own it comes before the decode pass, so a server hands first tokens to its
        clients one decode pass sooner."""
        if on_admitted is not None and not callable(on_admitted):
            raise TypeError(f"Engine.step: on_admitted must be callable or None, got {type(on_admitted).__name__}")
        events: list[Event] = []
        start = time.perf_counter()
        prefill_seconds = 0.0
        if self._to_cancel:
            self._read(events)
            self._cancel_now(events)
        decoding: list[Request] = []  # the rows this step decodes
        joined = False                # whether prompt tokens rode in the decode pass (which then has run)
        admitted = False
        if self._waiting and self._filling is None and len(self._active) < self.max_batch:
            self._read(events)
            joining = self._joining() if self.mix_prefill and self._active else 0
            if joining:
                decoding, joined = list(self._active), True
            if joining or not (self.mix_prefill and self._active):
                prefill_seconds, admitted = self._admit(joining), True
            else:
                self._start_filling()  # the first waiting prompt is longer than a pack
        if self._filling is not None and not joined:
            decoding, joined = list(self._active), True
            seconds, admitted = self._fill()
            prefill_seconds += seconds
        if admitted:
            if joined or on_admitted is not None:
                self._read(events)  # after the pass's own sync: no extra wait for the device
            if on_admitted is not None:
                t = time.perf_counter()
                on_admitted(events)
                events = []
                prefill_seconds += time.perf_counter() - t  # the caller's time, not decoding's
        elif joined and self._read_due():
            self._read(events)
        if not joined:
            if any(r._drawn >= r._text.budget for r in self._active):
                self._read(events)  # a new row whose first token was its last
            decoding = list(self._active)
            if decoding:
                logits = None if self._graphs is None else self._graphs.logits(self._next)       # [n, V]
                if logits is None:
                    logits = self.model(self._next[:, None], kv_cache=self._view, num_logits_to_keep=1)[:, -1]
                self._push(0, self._sample(logits, 0))
                self._unread_steps += 1
                if self._read_due():
                    self._read(events)
        decode_seconds = time.perf_counter() - start - prefill_seconds
        self.stats.decode_seconds += decode_seconds
        for r in decoding:
            r.stats.decode_seconds += decode_seconds
        return events

    def _read_due(self) -> bool:
        """After a decode pass: whether its tokens are read back now (sync_every passes unread, stop
        strings that need the text, or a row at its length limit)."""
        return (self._unread_steps >= self.sync_every or any(r.config.stop_strings for r in self._active)
                or any(r._drawn >= r._text.budget for r in self._active))

    # ---- admission and prefill
    def _joining(self) -> int:
        """How many waiting requests join the running rows' next decode pass: as many as the free
        rows and one pack (at most prefill_chunk_size, else _PACK_TOKENS, prompt tokens) take; 0 when
        the first waiting prompt alone is longer (it is prefilled in a pass, or chunks, of its own)."""
        budget = self.prefill_chunk_size or _PACK_TOKENS
        count, total = 0, 0
        for r in itertools.islice(self._waiting, self.max_batch - len(self._active)):
            if total + r.prompt_tokens > budget:
                break
            count, total = count + 1, total + r.prompt_tokens
        return count

    def _ensure_cache(self) -> None:
        from ..model import KVCache

        if self._cache is None:
            self._cache = KVCache(self.model.config, self.max_batch, self.max_seq_len, self.dtype, self.device)
            if self.cuda_graphs:
                from .cuda_graphs import DecodeGraphs
                self._graphs = DecodeGraphs(self.model, self._cache, self.max_batch)

    def _mark_seen(self, row: int, r: Request) -> None:
        """Row `row` of the repetition-penalty table holds r's prompt tokens (made when first needed)."""
        if r.config.repetition_penalty == 1.0:
            return
        if self._seen is None:
            self._seen = torch.zeros(self.max_batch, self.model.config.vocab_size, dtype=torch.bool,
                                     device=self.device)
        self._seen[row].zero_()
        self._seen[row, torch.tensor(r.prompt_ids, device=self.device)] = True

    def _admit(self, joining: int = 0) -> float:
        """Prefill waiting requests into the free rows; returns the seconds of prefill it took.

        joining > 0: that many waiting requests are prefilled in the running rows' decode pass
        (their prompts packed after the rows' next tokens: one read of the weights for both), which
        this then is; its time is shared between prefill and decode by their token counts."""
        _sync(self.device)
        t0 = time.perf_counter()
        self._ensure_cache()
        first_row = len(self._active)
        count = joining or min(self.max_batch - first_row, len(self._waiting))
        admitted = [self._waiting.popleft() for _ in range(count)]
        rows = self._cache.rows(first_row, first_row + len(admitted))
        rows.reset()
        if joining:
            logits = self._prefill_with_decode([r.prompt_ids for r in admitted])        # [first_row + k, V]
        else:
            logits = self._prefill(rows, [r.prompt_ids for r in admitted])               # [k, V]
        for i, r in enumerate(admitted):
            self._mark_seen(first_row + i, r)
        self._active.extend(admitted)
        self._rows_changed()
        if joining:
            self._push(0, self._sample(logits, 0))      # every row's next token, the newcomers' first
            self._unread_steps += 1
        else:
            self._push(first_row, self._sample(logits, first_row))                      # first tokens [k]
        _sync(self.device)
        seconds = time.perf_counter() - t0
        prompt_tokens = sum(r.prompt_tokens for r in admitted)
        share = prompt_tokens / (prompt_tokens + first_row) if joining else 1.0
        self.stats.prefill_tokens += prompt_tokens
        self.stats.prefill_seconds += seconds * share
        for r in admitted:
            r.stats.prefill_seconds = seconds
        return seconds * share

    def _start_filling(self) -> None:
        """The first waiting request (a prompt longer than a pack) takes the row after the running
        ones, to be prefilled one chunk per step by _fill."""
        self._ensure_cache()
        r = self._waiting.popleft()
        row = len(self._active)
        self._cache.rows(row, row + 1).reset()
        self._mark_seen(row, r)
        self._filling = r

    def _fill(self) -> tuple[float, bool]:
        """One pass: the running rows' next tokens and the next chunk (at most a pack) of the filling
        prompt, continuing its row. The running rows get their next tokens; after the last chunk the
        request becomes active with its first token. Returns (seconds of prefill, whether it did)."""
        r, n = self._filling, len(self._active)
        filled = int(self._cache.host_seqlens[n])  # its prompt tokens cached so far
        chunk = r.prompt_ids[filled:filled + (self.prefill_chunk_size or _PACK_TOKENS)]
        done = filled + len(chunk) == r.prompt_tokens
        _sync(self.device)
        t0 = time.perf_counter()
        x, cu = self._packed([chunk], head=self._next if n else None)
        logits = self.model(x, cu_seqlens=cu, kv_cache=self._cache.rows(0, n + 1), num_logits_to_keep=1)[:, -1]
        if done:
            self._filling = None
            self._active.append(r)
            self._rows_changed()
            self._push(0, self._sample(logits, 0))      # the running rows' next tokens and its first
        elif n:
            self._push(0, self._sample(logits[:n], 0))
        if done or n:
            self._unread_steps += 1
        _sync(self.device)
        seconds = time.perf_counter() - t0
        share = len(chunk) / (len(chunk) + n)
        self.stats.prefill_tokens += len(chunk)
        self.stats.prefill_seconds += seconds * share
        r.stats.prefill_seconds += seconds
        return seconds * share, done

    def _prefill_with_decode(self, prompts: list[list[int]]) -> torch.Tensor:
        """One forward: the n running rows' next tokens (one document each, continuing their rows),
        then the prompts packed into the empty rows after them. Returns every row's last logits
        [n + len(prompts), V]."""
        n = len(self._active)
        x, cu = self._packed(prompts, head=self._next)                                       # [n + total]
        out = self.model(x, cu_seqlens=cu, kv_cache=self._cache.rows(0, n + len(prompts)), num_logits_to_keep=1)
        return out[:, -1]

    def _packed(self, prompts: list[list[int]], head: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed input of `prompts` (ids [total], int32 cu_seqlens), after `head` (device token
        ids, one document each) when given."""
        n = 0 if head is None else head.shape[0]
        x = torch.tensor([t for ids in prompts for t in ids], dtype=torch.long, device=self.device)
        bounds = list(range(n)) + list(itertools.accumulate((len(ids) for ids in prompts), initial=n))
        return (x if head is None else torch.cat([head, x])), torch.tensor(bounds, dtype=torch.int32,
                                                                            device=self.device)

    def _prefill(self, cache, prompts: list[list[int]]) -> torch.Tensor:
        """Each prompt into its own (empty) row of `cache`; returns each one's last logits [n, V].
        Neighbouring prompts that fit one pack go through one forward (packed, cu_seqlens): one pass
        over the weights for all of them; a prompt alone in its pack goes in chunks."""
        n = len(prompts)
        chunk = self.prefill_chunk_size or max(len(ids) for ids in prompts)
        pack = self.prefill_chunk_size or max(_PACK_TOKENS, chunk)
        last = torch.empty(n, self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        first = 0
        while first < n:
            stop, total = first + 1, len(prompts[first])
            while stop < n and total + len(prompts[stop]) <= pack:
                total += len(prompts[stop])
                stop += 1
            if stop - first == 1:
                row = cache.row(first)
                x = torch.tensor(prompts[first], dtype=torch.long, device=self.device)[None]   # [1, s]
                for start in range(0, x.shape[1], chunk):
                    out = self.model(x[:, start:start + chunk], kv_cache=row, num_logits_to_keep=1)
                last[first] = out[0, -1]
            else:
                x, cu = self._packed(prompts[first:stop])
                out = self.model(x, cu_seqlens=cu, kv_cache=cache.rows(first, stop), num_logits_to_keep=1)  # [k, 1, V]
                last[first:stop] = out[:, -1]
            first = stop
        return last

    # ---- sampling
    def _groups_of(self, requests: list[Request]) -> list[tuple[torch.Tensor | None, Request]]:
        """Rows (positions in `requests`) sampled together: (index tensor, or None for all, a request
        with their settings)."""
        groups: dict[tuple, list[int]] = {}
        for row, r in enumerate(requests):
            groups.setdefault(_sampling_key(r), []).append(row)
        if len(groups) == 1:
            return [(None, requests[0])]
        return [(torch.tensor(rows, device=self.device), requests[rows[0]]) for rows in groups.values()]

    def _rows_changed(self) -> None:
        """After rows joined or left: the cache view and the sampling groups of the active rows,
        made once here rather than in every decode step (an index tensor is a host-to-device copy)."""
        n = len(self._active)
        self._view = self._cache.rows(0, n) if n else None
        self._groups = self._groups_of(self._active) if n else []

    def _sample(self, logits: torch.Tensor, first_row: int) -> torch.Tensor:
        """Next tokens [k] of rows first_row .. first_row + k - 1 from their logits [k, V]."""
        k = logits.shape[0]
        seen = None if self._seen is None else self._seen[first_row:first_row + k]
        groups = (self._groups if first_row == 0 and k == len(self._active)
                  else self._groups_of(self._active[first_row:first_row + k]))
        if len(groups) == 1:
            return self._select(logits, groups[0][1], seen)
        out = torch.empty(k, dtype=torch.long, device=self.device)
        for idx, r in groups:
            out.scatter_(0, idx, self._select(logits[idx], r, None if seen is None else seen[idx]))
        return out

    @staticmethod
    def _select(logits: torch.Tensor, r: Request, seen: torch.Tensor | None) -> torch.Tensor:
        penalty = r.config.repetition_penalty != 1.0
        return select_next_tokens(logits, r.config, seen if penalty else None, r._generator)

    def _push(self, first_row: int, tokens: torch.Tensor) -> None:
        """Record tokens sampled for rows first_row.. (on the device until the next read)."""
        k = tokens.shape[0]
        self._pending.append((first_row, tokens))
        self._next = tokens if first_row == 0 else torch.cat([self._next[:first_row], tokens])
        for r in self._active[first_row:first_row + k]:
            r._drawn += 1
        if self._seen is not None:
            self._seen[first_row:first_row + k].scatter_(1, tokens[:, None], True)

    # ---- host reads, finishing and freeing rows
    def _read(self, events: list[Event]) -> None:
        """Read the pending tokens back (one transfer), turn them into text and Events, and free
        the rows of finished requests."""
        if not self._pending:
            return
        flat = torch.cat([t for _, t in self._pending]).tolist()
        per_row: dict[int, list[int]] = {}
        offset = 0
        for first_row, t in self._pending:
            for i in range(t.shape[0]):
                per_row.setdefault(first_row + i, []).append(flat[offset + i])
            offset += t.shape[0]
        self._pending.clear()
        self._unread_steps = 0
        keep = []
        for row, r in enumerate(self._active):
            text, before = [], len(r.tokens)
            for token in per_row.get(row, ()):
                if r.done:
                    break
                text.append(r._text.push(token))
                if r._text.sampled > 1:
                    self.stats.decode_tokens += 1
                    r.stats.decode_tokens += 1
            if per_row.get(row):
                events.append(Event(r, "".join(text), r.tokens[before:], r.done))
            if not r.done:
                keep.append(row)
        self._keep(keep)

    def _cancel_now(self, events: list[Event]) -> None:
        cancelled = {id(r) for r in self._to_cancel}
        for r in self._to_cancel:
            if not r.done:
                r._text.stop_reason = CANCELLED
                events.append(Event(r, "", [], True))
        self._to_cancel.clear()
        self._waiting = deque(r for r in self._waiting if id(r) not in cancelled)
        if self._filling is not None and id(self._filling) in cancelled:
            self._filling = None  # its row, after the active ones, is simply free again
        self._keep([row for row, r in enumerate(self._active) if id(r) not in cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Keep only active rows `keep` (in order), moved to the front of the cache (the row of a
        prompt being filled moves up behind them)."""
        if len(keep) == len(self._active):
            return
        rows = keep + ([len(self._active)] if self._filling is not None else [])
        self._next = self._next[torch.tensor(keep, device=self.device)] if keep else None
        if rows:
            if self._seen is not None:
                self._seen[:len(rows)] = self._seen[torch.tensor(rows, device=self.device)]
            self._cache.keep_rows(rows)
        self._active = [self._active[row] for row in keep]
        self._rows_changed()


# ---------------------------------------------------------------------------- generate / stream
def generate(model, tokenizer: ExaoneTokenizer, prompts, config: GenerationConfig | None = None, *,
             callback: Callable[[int, str], None] | None = None,
             prefill_chunk_size: int | None = None) -> GenerationResult | list[GenerationResult]:
    """Generate continuations of one prompt or a batch of prompts of any lengths.

    prompts: a string (no chat template), a list of token ids, a chat (list of message dicts,
    formatted with EXAONE's chat template), or a list mixing these. Returns one GenerationResult
    for a single prompt, else a list in the same order; their stats cover the whole call.
    callback(row, text_piece): called as each row's text grows (UTF-8-safe pieces).
    prefill_chunk_size: prefill long prompts this many tokens at a time, and pack short prompts of a
    batch into forwards of at most this many tokens (bounds activation memory; default: whole
    prompts, packs of up to 8192 tokens). With a seed, row i samples with seed + i.
    """
    engine, requests, single = _start(model, tokenizer, prompts, config, prefill_chunk_size)
    if callback is not None:
        engine.sync_every = 1
    row_of = {r.id: i for i, r in enumerate(requests)}
    while engine.has_work:
        for event in engine.step():
            if callback is not None and event.text:
                callback(row_of[event.request.id], event.text)
    results = [r.result(engine.stats) for r in requests]
    return results[0] if single else results


def _start(model, tokenizer, prompts, config, prefill_chunk_size):
    """An Engine holding every prompt (a row for each, a cache just long enough), the requests and
    whether a single prompt was given."""
    _check_model_tokenizer(model, tokenizer)
    config = _check_config(config)
    prompt_ids, single = prepare_prompts(tokenizer, prompts)
    for i, ids in enumerate(prompt_ids):
        _check_prompt_ids(ids, "prompt" if single else f"prompts[{i}]", model)
    context = model.config.max_position_embeddings
    longest = max(len(ids) + min(config.max_new_tokens, context - len(ids) + 1) - 1 for ids in prompt_ids)
    engine = Engine(model, tokenizer, max_batch=len(prompt_ids), max_seq_len=longest,
                    prefill_chunk_size=prefill_chunk_size, cuda_graphs=config.cuda_graphs)
    seeded = config.seed is not None and not config.greedy
    requests = [engine.add(ids, config.replace(seed=config.seed + i) if seeded and i else config)
                for i, ids in enumerate(prompt_ids)]
    return engine, requests, single


class TextStream:
    """Iterates over text pieces as they are generated; `.result` holds the GenerationResult once
    the iteration has finished."""

    def __init__(self, engine: Engine, request: Request):
        self._engine, self._request = engine, request
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        while self._engine.has_work:
            for event in self._engine.step():
                if event.text:
                    yield event.text
        self.result = self._request.result(self._engine.stats)


def stream(model, tokenizer: ExaoneTokenizer, prompt, config: GenerationConfig | None = None, *,
           prefill_chunk_size: int | None = None) -> TextStream:
    """Generate for one prompt, yielding text pieces as they are decoded (never a partial UTF-8
    character, never text of a stop string). Arguments as for `generate`."""
    _check_model_tokenizer(model, tokenizer)
    _check_config(config)
    _, single = prepare_prompts(tokenizer, prompt)
    if not single:
        raise TypeError("stream: takes one prompt; for a batch use generate(..., callback=fn(row, piece))")
    engine, requests, _ = _start(model, tokenizer, prompt, config, prefill_chunk_size)
    engine.sync_every = 1
    return TextStream(engine, requests[0])
