"""Needle in a haystack: can the model find one planted fact in a long context?

    from exaone_ext.eval import NiahConfig, run_niah
    results = run_niah(model, tokenizer, NiahConfig(lengths=[1024, 4096], depths=[0, 50, 100]), "out/niah")

A cell is (language, length, depth). What it plants and asks is a NiahTask. The default task
("code") is one user turn in the model's chat format: an instruction, the haystack (filler sentences
from exaone_ext.eval.filler with the needle sentence inserted at the sentence boundary nearest to
`depth` percent of the haystack), and a question; the needle states a random 7-digit code, and the
answer is right when it contains that code (exact match after dropping spaces and commas between
digits; no judge model). Other tasks change the needle, question, keys, filler and whether the
prompt goes through the chat format (raw text for base models): "secret-colour" is the demo
model's (exaone_ext.demo_model), and a JSON file of NiahTask's fields makes any other.

Lengths are context lengths: prompt tokens + max_new_tokens == length exactly, so a cell of the
model's full context (e.g. 32768) fits. The haystack is built in token ids (each sentence encoded
on its own, so sentence boundaries are token boundaries; the last filler sentence is cut short to
make the count exact, and the needle always goes before it) and spliced into the encoded prompt.

Results go to out_dir after every cell (results.json and results.csv, written atomically), so an
interrupted run started again with the same settings skips the cells already done; the heat map
(depth x length, one panel per language) is drawn to heatmap.png at the end.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from ..generation import GenerationConfig, generate
from ..tokenizer import ExaoneTokenizer
from .filler import LANGUAGES, filler_sentences

__all__ = ["NiahConfig", "NiahTask", "CODE_TASK", "get_task", "file_filler", "split_sentences", "Haystack",
           "make_needle", "build_haystack", "score_answer", "run_niah", "draw_heatmap", "summary_table"]

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
DEFAULT_DEPTHS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]

_CITIES = {
    "en": ["Busan", "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Tbilisi", "Perth", "Cusco"],
    "ko": ["부산", "리스본", "오슬로", "나이로비", "리마", "하노이", "퀘벡", "트빌리시", "퍼스", "쿠스코"],
}
_PLACEHOLDER = "\x00HAYSTACK\x00"
MATCHES = ("contains", "prefix")


def _default_filler(language: str, seed: int) -> Iterator[str]:
    return filler_sentences(language, seed)


@dataclass(frozen=True)
class NiahTask:
    """What a cell plants and asks, per language (each mapping is keyed by language code).

    needle: the planted sentence, holding "{key}" (and "{topic}" when `topics` is given).
    question: the text after the haystack; instruction: the text before it ("{topic}" allowed in both).
    keys: the answers a cell draws from, per language; None: a random 7-digit code per cell.
    topics: words a cell draws from (named in the needle and the question, e.g. whose code it is).
    chat: the prompt is one user turn in the model's chat format; False: raw text that a base model
      continues (instruction + haystack + question).
    match: "contains" (the answer holds the key anywhere) or "prefix" (the answer starts with it).
    filler: (language, seed) -> an endless iterator of filler sentences; None: exaone_ext.eval.filler
      (English and Korean). filler_name names it in the saved settings (default: that module, or
      the filler's qualified name).
    """
    name: str
    needle: Mapping[str, str]
    question: Mapping[str, str]
    instruction: Mapping[str, str] = field(default_factory=dict)
    keys: Mapping[str, Sequence[str]] | None = None
    topics: Mapping[str, Sequence[str]] | None = None
    chat: bool = True
    match: str = "contains"
    filler: Callable[[str, int], Iterator[str]] | None = None
    filler_name: str | None = None

    def __post_init__(self):
        where = f"NiahTask {self.name!r}"
        if not isinstance(self.needle, Mapping) or not self.needle:
            raise ValueError(f"{where}: needle: expected {{language: sentence with '{{key}}'}}, got {self.needle!r}")
        langs = set(self.needle)
        if self.match not in MATCHES:
            raise ValueError(f"{where}: match: expected one of {MATCHES}, got {self.match!r}")
        for what in ("question", "instruction", "keys", "topics"):
            value = getattr(self, what)
            if value is None or (what == "instruction" and not value):
                continue
            if not isinstance(value, Mapping) or set(value) != langs:
                raise ValueError(f"{where}: {what}: expected one entry per language of the needle "
                                 f"({', '.join(sorted(langs))}), got {value!r}")
        for what in ("keys", "topics"):
            value = getattr(self, what)
            for lang, items in (value or {}).items():
                if isinstance(items, str) or not isinstance(items, Sequence) or not items or \
                        not all(isinstance(k, str) and k.strip() for k in items):
                    raise ValueError(f"{where}: {what}[{lang!r}]: expected a non-empty list of non-empty strings, "
                                     f"got {items!r}")
        for lang in langs:
            texts = {"needle": self.needle[lang], "question": self.question[lang],
                     "instruction": (self.instruction or {}).get(lang, "")}
            for what, text in texts.items():
                if not isinstance(text, str):
                    raise ValueError(f"{where}: {what}[{lang!r}]: expected a string, got {type(text).__name__}")
                try:
                    text.format(key="K", topic="T")
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"{where}: {what}[{lang!r}]: only {{key}} and {{topic}} may be filled in "
                                     f"({e!r} in {text!r}); write {{{{ and }}}} for literal braces") from None
            if "{key}" not in self.needle[lang]:
                raise ValueError(f"{where}: needle[{lang!r}]: must hold '{{key}}', got {self.needle[lang]!r}")
            if self.topics is None and any("{topic}" in t for t in (self.needle[lang], self.question[lang],
                                                                   (self.instruction or {}).get(lang, ""))):
                raise ValueError(f"{where}: '{{topic}}' is used but no topics are given")

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.needle)

    def filler_for(self, language: str, seed: int) -> Iterator[str]:
        if self.filler is None:
            return _default_filler(language, seed)
        return iter(self.filler(language, seed))

    def with_filler_files(self, files: Mapping[str, str | os.PathLike],
                          shown: Mapping[str, str] | None = None) -> "NiahTask":
        """This task with file_filler(files) as its filler, named by `shown` (default: files) in the
        saved settings."""
        label = "files: " + ", ".join(f"{k}={os.fspath(v)}" for k, v in sorted((shown or files).items()))
        return replace(self, filler=file_filler(files), filler_name=label)

    def describe(self) -> dict:
        """The task as JSON-able settings (what a resumed run must agree with)."""
        return {"name": self.name, "needle": dict(self.needle), "question": dict(self.question),
                "instruction": dict(self.instruction or {}),
                "keys": {k: list(v) for k, v in self.keys.items()} if self.keys else None,
                "topics": {k: list(v) for k, v in self.topics.items()} if self.topics else None,
                "chat": self.chat, "match": self.match, "filler": self.filler_label}

    @property
    def filler_label(self) -> str:
        if self.filler_name:
            return self.filler_name
        if self.filler is None:
            return "exaone_ext.eval.filler"
        return "custom: " + getattr(self.filler, "__qualname__", type(self.filler).__name__)


CODE_TASK = NiahTask(
    name="code",
    needle={"en": "The secret code of the {topic} vault is {key}.", "ko": "{topic} 금고의 비밀 번호는 {key}입니다."},
    instruction={"en": "Read the following text carefully. Somewhere in it there is a sentence about a secret code.\n\n",
                 "ko": "다음 글을 주의 깊게 읽으세요. 글 어딘가에 비밀 번호에 관한 문장이 있습니다.\n\n"},
    question={"en": "\n\nQuestion: What is the secret code of the {topic} vault? Answer with the code only.",
              "ko": "\n\n질문: {topic} 금고의 비밀 번호는 무엇입니까? 번호만 답하세요."},
    topics=_CITIES,
)


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: split after . ! ? 。 (and their fullwidth forms) and at line breaks."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+", line) if s.strip()]
    return out


def file_filler(paths: Mapping[str, str | os.PathLike], shuffle: bool = True) -> Callable[[str, int], Iterator[str]]:
    """A filler from text files ({language: path}): their sentences, cycled endlessly; in an order
    drawn from the seed when `shuffle` (each pass a new order), else as written."""
    sentences: dict[str, list[str]] = {}
    for lang, path in paths.items():
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                found = split_sentences(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"filler for {lang!r}: {path}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"filler for {lang!r}: {path}: not UTF-8 text ({e})") from None
        if not found:
            raise ValueError(f"filler for {lang!r}: {path}: holds no sentences")
        sentences[lang] = found

    def filler(language: str, seed: int) -> Iterator[str]:
        if language not in sentences:
            raise ValueError(f"filler: no file for language {language!r} (have {', '.join(sorted(sentences))})")
        rng = random.Random(f"filler-{language}-{seed}")
        pool = sentences[language]
        while True:
            order = list(pool)
            if shuffle:
                rng.shuffle(order)
            yield from order

    return filler


def _task_from_dict(d: Mapping, name: str, base_dir: str) -> NiahTask:
    known = {"name", "needle", "question", "instruction", "keys", "topics", "chat", "match", "filler"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"NiahTask {name!r}: unknown fields {unknown} (known: {sorted(known)})")
    filler = d.get("filler")
    if filler is not None and (not isinstance(filler, Mapping) or not filler):
        raise ValueError(f"NiahTask {name!r}: filler: expected {{language: text file}}, got {filler!r}")
    kwargs = {k: d[k] for k in ("needle", "question", "instruction", "keys", "topics", "chat", "match") if k in d}
    if "chat" in kwargs and not isinstance(kwargs["chat"], bool):
        raise ValueError(f"NiahTask {name!r}: chat: expected true or false, got {kwargs['chat']!r}")
    task = NiahTask(name=str(d.get("name", name)), **kwargs)
    if filler is None:
        return task
    return task.with_filler_files({lang: os.path.join(base_dir, p) for lang, p in filler.items()}, shown=filler)


def get_task(spec: str | os.PathLike | NiahTask) -> NiahTask:
    """A task by name ("code": the 7-digit vault code, through the chat format; "secret-colour": the
    demo model's raw-text task, see exaone_ext.demo_model), or from a JSON file holding NiahTask's
    fields (filler: {language: text file}, paths relative to the JSON file)."""
    if isinstance(spec, NiahTask):
        return spec
    spec = os.fspath(spec)
    if spec == "code":
        return CODE_TASK
    if spec in ("secret-colour", "secret-color"):
        from ..demo_model.world import niah_task
        return niah_task()
    if spec.endswith(".json") or os.path.exists(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"niah task: {spec}: no such file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"niah task: {spec}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"niah task: {spec}: expected a JSON object of NiahTask fields, got {type(d).__name__}")
        return _task_from_dict(d, os.path.splitext(os.path.basename(spec))[0], os.path.dirname(os.path.abspath(spec)))
    raise ValueError(f"niah task: expected 'code', 'secret-colour' or a JSON file, got {spec!r}")


@dataclass
class NiahConfig:
    """The grid and the decoding of a needle-in-a-haystack run (task: a NiahTask, or a name or
    JSON file for get_task; languages default to the task's)."""
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    languages: list[str] | None = None
    max_new_tokens: int = 32
    prefill_chunk_size: int | None = 2048
    seed: int = 0
    task: NiahTask | str = "code"

    def __post_init__(self):
        self.task = get_task(self.task)
        if self.languages is None:
            self.languages = list(self.task.languages)
        for name in ("lengths", "depths", "languages"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"NiahConfig.{name}: expected a non-empty list, got {value!r}")
            setattr(self, name, list(value))
        for n in self.lengths:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"NiahConfig.lengths: expected positive integers, got {n!r}")
        for d in self.depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 100:
                raise ValueError(f"NiahConfig.depths: expected percentages in [0, 100], got {d!r}")
        for lang in self.languages:
            if lang not in self.task.languages or (self.task.filler is None and lang not in LANGUAGES):
                have = [x for x in self.task.languages if self.task.filler is not None or x in LANGUAGES]
                raise ValueError(f"NiahConfig.languages: task {self.task.name!r} has {have}, got {lang!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"NiahConfig.max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if self.prefill_chunk_size is not None and (not isinstance(self.prefill_chunk_size, int)
                                                    or self.prefill_chunk_size < 1):
            raise ValueError(f"NiahConfig.prefill_chunk_size: expected a positive integer or None, "
                             f"got {self.prefill_chunk_size!r}")

    def settings(self) -> dict:
        """What a resumed run must agree with (the prefill chunk changes memory, not results)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("task", "prefill_chunk_size")}
        out["task"] = self.task.describe()
        return out


@dataclass
class Haystack:
    """One cell's prompt. prompt_ids: the whole prompt; haystack = prompt_ids[start:end];
    the needle occupies prompt_ids[needle_start:needle_end]."""
    prompt_ids: list[int]
    start: int
    end: int
    needle_start: int
    needle_end: int
    key: str

    @property
    def haystack_tokens(self) -> int:
        return self.end - self.start

    @property
    def depth(self) -> float:
        """Where the needle starts, in percent of the filler around it."""
        filler = self.haystack_tokens - (self.needle_end - self.needle_start)
        return 100.0 * (self.needle_start - self.start) / filler if filler else 0.0


def make_needle(language: str, seed: int, length: int, depth: float,
                task: NiahTask | str = "code") -> tuple[str, str | None, str]:
    """(needle sentence, topic, key) for one cell: drawn per cell from the seed, length and depth."""
    task = get_task(task)
    rng = random.Random(f"needle-{language}-{seed}-{length}-{depth}")
    topic = rng.choice(list(task.topics[language])) if task.topics else None
    key = rng.choice(list(task.keys[language])) if task.keys else str(rng.randrange(1_000_000, 10_000_000))
    return task.needle[language].format(key=key, topic=topic), topic, key


class _Filler:
    """Encoded filler of one (tokenizer, task filler, language, seed): every sentence encoded on
    its own after a space (so sentence boundaries are token boundaries), plus the first without it."""

    def __init__(self, tokenizer: ExaoneTokenizer, task: NiahTask, language: str, seed: int):
        self.tok, self.source, self.gen = tokenizer, task.filler, task.filler_for(language, seed)
        self.ids: list[int] = []      # " s0 s1 s2 ..." minus the first space
        self.starts: list[int] = []   # where each sentence starts in ids
        self.first_spaced: list[int] = []

    def grow(self, n_tokens: int) -> None:
        while len(self.ids) < n_tokens:
            try:
                sentence = next(self.gen)
            except StopIteration:
                raise ValueError(f"niah: the filler ran out after {len(self.ids)} tokens "
                                 f"(a filler must yield sentences without end)") from None
            if not isinstance(sentence, str) or not sentence.strip():
                raise ValueError(f"niah: the filler yielded {sentence!r}; expected non-empty sentences")
            sentence = sentence.strip()
            self.starts.append(len(self.ids))
            if not self.ids:
                self.first_spaced = self.tok.encode(" " + sentence)
                self.ids.extend(self.tok.encode(sentence))
            else:
                self.ids.extend(self.tok.encode(" " + sentence))


_filler_cache: dict[tuple, _Filler] = {}


def build_haystack(tokenizer: ExaoneTokenizer, language: str, length: int, depth: float, seed: int = 0,
                   max_new_tokens: int = 32, task: NiahTask | str = "code") -> Haystack:
    """The prompt of one cell: len(prompt_ids) + max_new_tokens == length. The needle goes in at
    the sentence boundary nearest to `depth` percent of the filler, one space from its neighbours
    (as the sentences are from each other); the last filler sentence is cut short to make the
    length exact, and the needle always goes before it."""
    task = get_task(task)
    if language not in task.languages:
        raise ValueError(f"build_haystack: language: task {task.name!r} has {list(task.languages)}, got {language!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
        raise ValueError(f"build_haystack: depth: expected a percentage in [0, 100], got {depth!r}")
    needle, topic, key = make_needle(language, seed, length, depth, task)
    before = (task.instruction or {}).get(language, "").format(topic=topic)
    after = task.question[language].format(topic=topic)
    if task.chat:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": before + _PLACEHOLDER + after}],
                                             add_generation_prompt=True)
        before, after = chat.split(_PLACEHOLDER)
    before_ids = tokenizer.encode(before) if before else []
    after_ids = tokenizer.encode(after) if after else []
    needle_spaced, needle_first = tokenizer.encode(" " + needle), tokenizer.encode(needle)
    budget = length - max_new_tokens - len(before_ids) - len(after_ids)  # haystack tokens, needle included
    n_filler = budget - len(needle_spaced)
    if n_filler < 1:
        raise ValueError(f"build_haystack: length {length} leaves no room for filler: the instruction, question, "
                         f"needle and answer take {length - n_filler + 1} tokens")
    # keyed by the filler itself (held by the entry, so its id is not reused): two tasks of one name
    # with different fillers never share encoded text
    cache_key = (id(tokenizer), id(task.filler), language, seed)
    filler = _filler_cache.get(cache_key)
    if filler is None or filler.tok is not tokenizer or filler.source is not task.filler:
        filler = _filler_cache[cache_key] = _Filler(tokenizer, task, language, seed)
    filler.grow(budget + 2 * len(needle_spaced) + 16)
    bounds = [s for s in filler.starts if s <= n_filler]
    target = depth / 100.0 * n_filler
    at = min(bounds, key=lambda b: (abs(b - target), b))
    if at == 0:  # the needle opens the haystack; the first sentence follows after a space
        rest = filler.starts[1] if len(filler.starts) > 1 else len(filler.ids)
        needle_ids = needle_first
        hay = needle_first + filler.first_spaced + filler.ids[rest:]
    else:
        needle_ids = needle_spaced
        hay = filler.ids[:at] + needle_spaced + filler.ids[at:]
    if len(hay) < budget or at + len(needle_ids) > budget:
        raise AssertionError(f"build_haystack: {len(hay)} haystack tokens for a budget of {budget}")
    ids = before_ids + hay[:budget] + after_ids
    start = len(before_ids)
    return Haystack(ids, start, start + budget, start + at, start + at + len(needle_ids), key)


def score_answer(answer: str, key: str, match: str = "contains") -> bool:
    """Whether the answer states the key. A key of digits: the digits together, spaces and commas
    between them dropped ('1,234,567' and '1 234 567' count; '12345678' for '1234567' does not). A
    key of words: case-insensitive, not inside a longer Latin word or number ('red' is not found in
    'reddish'; '빨강입니다' states '빨강'). match "prefix": the answer must start with it."""
    if match not in MATCHES:
        raise ValueError(f"score_answer: match: expected one of {MATCHES}, got {match!r}")
    if key.isdigit():
        text = re.sub(r"(?<=\d)[\s,]+(?=\d)", "", answer)
        pattern, flags = rf"(?<!\d){re.escape(key)}(?!\d)", 0
    else:
        text = answer
        pattern, flags = rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", re.IGNORECASE
    if match == "prefix":
        return re.match(r"\s*" + pattern, text, flags) is not None
    return re.search(pattern, text, flags) is not None


# ---------------------------------------------------------------------------- files
def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_CSV_FIELDS = ["language", "length", "depth", "correct", "key", "answer", "prompt_tokens", "haystack_tokens",
               "needle_depth", "seconds"]


def _save(out_dir: str, settings: dict, cells: list[dict]) -> None:
    _atomic_write(os.path.join(out_dir, "results.json"),
                  (json.dumps({"settings": settings, "cells": cells}, indent=2, ensure_ascii=False) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cells)
    _atomic_write(os.path.join(out_dir, "results.csv"), buf.getvalue().encode("utf-8"))


def _load(out_dir: str, settings: dict) -> list[dict]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        cells = saved["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a needle-in-a-haystack results file ({e}); remove it or use another "
                         "output directory") from None
    if isinstance(saved.get("settings"), dict) and "task" not in saved["settings"]:
        saved["settings"]["task"] = CODE_TASK.describe()  # written before tasks could be chosen
    if saved.get("settings") != settings:
        differ = sorted(k for k in set(settings) | set(saved.get("settings") or {})
                        if settings.get(k) != (saved.get("settings") or {}).get(k))
        raise ValueError(f"{path}: holds a run with other settings ({', '.join(differ)} differ); use another output "
                         "directory to start a new run")
    return cells


def _language_order(lang: str) -> tuple:
    return (LANGUAGES.index(lang), "") if lang in LANGUAGES else (len(LANGUAGES), lang)


def draw_heatmap(cells: list[dict], path: str, title: str = "") -> None:
    """depth (rows) x length (columns) of the fraction right, one panel per language, to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    languages = sorted({c["language"] for c in cells}, key=_language_order)
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    fig, axes = plt.subplots(1, len(languages), figsize=(2.0 + (1.0 + 0.6 * len(lengths)) * len(languages),
                                                         1.8 + 0.32 * len(depths)),
                             squeeze=False, constrained_layout=True)
    for k, (ax, lang) in enumerate(zip(axes[0], languages)):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in cells:
            if c["language"] == lang:
                grid[depths.index(c["depth"])][lengths.index(c["length"])] = 1.0 if c["correct"] else 0.0
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title({"en": "English", "ko": "Korean"}.get(lang, lang))
    fig.colorbar(im, ax=axes[0].tolist(), label="retrieved")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------- the grid
def run_niah(model, tokenizer: ExaoneTokenizer, config: NiahConfig | None = None, out_dir: str | os.PathLike = "niah",
             progress: bool = False, model_name: str = "") -> list[dict]:
    """Runs every cell not already in out_dir/results.json; returns all cells (dicts as in the CSV)."""
    config = config or NiahConfig()
    if not isinstance(config, NiahConfig):
        raise TypeError(f"run_niah: config: expected NiahConfig, got {type(config).__name__}")
    context = model.config.max_position_embeddings
    too_long = [n for n in config.lengths if n > context]
    if too_long:
        raise ValueError(f"run_niah: lengths {too_long} exceed the model's context of {context} tokens "
                         "(max_position_embeddings)")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = {**config.settings(), "model": model_name}
    cells = _load(out_dir, settings)
    done = {(c["language"], c["length"], c["depth"]) for c in cells}
    grid = [(lang, n, d) for lang in config.languages for n in config.lengths for d in config.depths]
    todo = [cell for cell in grid if cell not in done]
    gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens)
    start = time.monotonic()
    for i, (lang, length, depth) in enumerate(todo):
        hay = build_haystack(tokenizer, lang, length, depth, config.seed, config.max_new_tokens, config.task)
        t0 = time.monotonic()
        result = generate(model, tokenizer, hay.prompt_ids, gen_config, prefill_chunk_size=config.prefill_chunk_size)
        correct = score_answer(result.text, hay.key, config.task.match)
        cells.append({"language": lang, "length": length, "depth": depth, "correct": correct, "key": hay.key,
                      "answer": result.text, "prompt_tokens": len(hay.prompt_ids),
                      "haystack_tokens": hay.haystack_tokens, "needle_depth": round(hay.depth, 2),
                      "seconds": round(time.monotonic() - t0, 3)})
        _save(out_dir, settings, cells)
        if progress:
            frac = (len(grid) - len(todo) + i + 1) / len(grid)
            per = (time.monotonic() - start) / (i + 1)
            sys.stderr.write(f"\rniah [{'#' * int(30 * frac):<30}] {len(grid) - len(todo) + i + 1}/{len(grid)} cells "
                             f"({lang} {length} tokens, depth {depth:g}%: {'right' if correct else 'wrong'}), "
                             f"{per:.1f} s/cell, {per * (len(todo) - i - 1):.0f} s left   ")
            sys.stderr.flush()
    if progress and todo:
        sys.stderr.write("\n")
    order = {cell: k for k, cell in enumerate(grid)}
    cells.sort(key=lambda c: order.get((c["language"], c["length"], c["depth"]), len(order)))
    _save(out_dir, settings, cells)
    draw_heatmap(cells, os.path.join(out_dir, "heatmap.png"), title=model_name)
    return cells


def summary_table(cells: list[dict]) -> str:
    """Fraction right per language and length, as printed by the CLI."""
    lengths = sorted({c["length"] for c in cells})
    langs = sorted({c["language"] for c in cells}, key=_language_order)
    lines = ["lang  " + "".join(f"{n:>8}" for n in lengths) + "     all"]
    for lang in langs:
        row, right_all, n_all = [], 0, 0
        for n in lengths:
            these = [c for c in cells if c["language"] == lang and c["length"] == n]
            right = sum(bool(c["correct"]) for c in these)
            right_all, n_all = right_all + right, n_all + len(these)
            row.append(f"{right / len(these):>8.0%}" if these else f"{'-':>8}")
        lines.append(f"{lang:<6}" + "".join(row) + f"{right_all / max(n_all, 1):>8.0%}")
    return "\n".join(lines)
