"""Needle in a haystack: can the model find one planted fact in a long context?

    from exaone_ext.eval import NiahConfig, run_niah
    results = run_niah(model, tokenizer, NiahConfig(lengths=[1024, 4096], depths=[0, 50, 100]), "out/niah")

A cell is (language, length, depth). Its prompt is one user turn in the model's chat format: an
instruction, the haystack (filler sentences from exaone_ext.eval.filler with the needle sentence
inserted at the sentence boundary nearest to `depth` percent of the haystack), and a question. The
needle states a random 7-digit code; the answer is right when it contains that code (exact match
after dropping spaces and commas between digits; no judge model).

Lengths are context lengths: prompt tokens + max_new_tokens == length exactly, so a cell of the
model's full context (e.g. 32768) fits. The haystack is built in token ids (each sentence encoded
on its own, so sentence boundaries are token boundaries; the last filler sentence is cut short to
make the count exact, and the needle always goes before it) and spliced into the encoded chat prompt.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..generation import GenerationConfig, generate
from ..tokenizer import ExaoneTokenizer
from .filler import LANGUAGES, filler_sentences

__all__ = ["NiahConfig", "Haystack", "make_needle", "build_haystack", "score_answer", "run_niah", "draw_heatmap"]

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
DEFAULT_DEPTHS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]

_CITIES = {
    "en": ["Busan", "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Tbilisi", "Perth", "Cusco"],
    "ko": ["부산", "리스본", "오슬로", "나이로비", "리마", "하노이", "퀘벡", "트빌리시", "퍼스", "쿠스코"],
}
_TEXT = {
    "en": {
        "needle": "The secret code of the {city} vault is {code}.",
        "before": "Read the following text carefully. Somewhere in it there is a sentence about a secret code.\n\n",
        "after": "\n\nQuestion: What is the secret code of the {city} vault? Answer with the code only.",
    },
    "ko": {
        "needle": "{city} 금고의 비밀 번호는 {code}입니다.",
        "before": "다음 글을 주의 깊게 읽으세요. 글 어딘가에 비밀 번호에 관한 문장이 있습니다.\n\n",
        "after": "\n\n질문: {city} 금고의 비밀 번호는 무엇입니까? 번호만 답하세요.",
    },
}
_PLACEHOLDER = "\x00HAYSTACK\x00"


@dataclass
class NiahConfig:
    """The grid and the decoding of a needle-in-a-haystack run."""
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))
    max_new_tokens: int = 32
    prefill_chunk_size: int | None = 2048
    seed: int = 0

    def __post_init__(self):
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
            if lang not in LANGUAGES:
                raise ValueError(f"NiahConfig.languages: expected some of {LANGUAGES}, got {lang!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"NiahConfig.max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if self.prefill_chunk_size is not None and (not isinstance(self.prefill_chunk_size, int)
                                                    or self.prefill_chunk_size < 1):
            raise ValueError(f"NiahConfig.prefill_chunk_size: expected a positive integer or None, "
                             f"got {self.prefill_chunk_size!r}")


@dataclass
class Haystack:
    """One cell's prompt. prompt_ids: the whole chat prompt; haystack = prompt_ids[start:end];
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


def make_needle(language: str, seed: int, length: int, depth: float) -> tuple[str, str, str]:
    """(needle sentence, question's city, key) for one cell: a 7-digit code, different per cell."""
    rng = random.Random(f"needle-{language}-{seed}-{length}-{depth}")
    city = rng.choice(_CITIES[language])
    key = str(rng.randrange(1_000_000, 10_000_000))
    return _TEXT[language]["needle"].format(city=city, code=key), city, key


_filler_cache: dict[tuple, tuple[list[int], list[int]]] = {}


def _filler_ids(tokenizer: ExaoneTokenizer, language: str, seed: int, n_tokens: int) -> tuple[list[int], list[int]]:
    """Filler token ids of at least n_tokens and the token offsets where sentences start."""
    key = (id(tokenizer), language, seed)
    ids, starts = _filler_cache.get(key, ([], []))
    if len(ids) < n_tokens:
        gen = filler_sentences(language, seed)
        for _ in range(len(starts)):  # the sentences already encoded
            next(gen)
        while len(ids) < n_tokens:
            sentence = next(gen)
            starts.append(len(ids))
            ids.extend(tokenizer.encode(sentence if not ids else " " + sentence))
        _filler_cache[key] = (ids, starts)
    return ids, starts


def build_haystack(tokenizer: ExaoneTokenizer, language: str, length: int, depth: float, seed: int = 0,
                   max_new_tokens: int = 32) -> Haystack:
    """The prompt of one cell: len(prompt_ids) + max_new_tokens == length."""
    if language not in LANGUAGES:
        raise ValueError(f"build_haystack: language: expected one of {LANGUAGES}, got {language!r}")
    if not 0 <= depth <= 100:
        raise ValueError(f"build_haystack: depth: expected a percentage in [0, 100], got {depth!r}")
    needle, city, key = make_needle(language, seed, length, depth)
    text = _TEXT[language]
    content = text["before"] + _PLACEHOLDER + text["after"].format(city=city)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    before, after = chat.split(_PLACEHOLDER)
    before_ids, after_ids = tokenizer.encode(before), tokenizer.encode(after)
    needle_ids = tokenizer.encode(" " + needle + " ")
    n_filler = length - max_new_tokens - len(before_ids) - len(after_ids) - len(needle_ids)
    if n_filler < 1:
        raise ValueError(f"build_haystack: length {length} leaves no room for filler: the instruction, question, "
                         f"needle and answer take {length - n_filler + 1} tokens")
    filler, starts = _filler_ids(tokenizer, language, seed, n_filler)
    filler = filler[:n_filler]
    # sentence starts inside the kept filler: the needle never splits a sentence (at depth 100 it
    # goes before the last one, which is cut short to make the length exact)
    bounds = [s for s in starts if s <= n_filler]
    target = depth / 100.0 * n_filler
    at = min(bounds, key=lambda b: (abs(b - target), b))
    ids = before_ids + filler[:at] + needle_ids + filler[at:] + after_ids
    start = len(before_ids)
    return Haystack(ids, start, start + n_filler + len(needle_ids), start + at, start + at + len(needle_ids), key)


def score_answer(answer: str, key: str) -> bool:
    """Whether the answer states the key: the digits appear together, spaces and commas between
    them dropped (e.g. '1,234,567' or '1 234 567' count; '12345678' for key '1234567' does not)."""
    squeezed = re.sub(r"(?<=\d)[\s,]+(?=\d)", "", answer)
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", squeezed) is not None


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
    if saved.get("settings") != settings:
        differ = sorted(k for k in set(settings) | set(saved.get("settings") or {})
                        if settings.get(k) != (saved.get("settings") or {}).get(k))
        raise ValueError(f"{path}: holds a run with other settings ({', '.join(differ)} differ); use another output "
                         "directory to start a new run")
    return cells


def draw_heatmap(cells: list[dict], path: str, title: str = "") -> None:
    """depth (rows) x length (columns) of the fraction right, one panel per language, to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    languages = sorted({c["language"] for c in cells}, key=lambda x: LANGUAGES.index(x))
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
        ax.set_title({"en": "English", "ko": "Korean"}[lang])
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
    settings = {**asdict(config), "model": model_name}
    settings.pop("prefill_chunk_size")  # changes memory, not results
    cells = _load(out_dir, settings)
    done = {(c["language"], c["length"], c["depth"]) for c in cells}
    grid = [(lang, n, d) for lang in config.languages for n in config.lengths for d in config.depths]
    todo = [cell for cell in grid if cell not in done]
    gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens)
    start = time.monotonic()
    for i, (lang, length, depth) in enumerate(todo):
        hay = build_haystack(tokenizer, lang, length, depth, config.seed, config.max_new_tokens)
        t0 = time.monotonic()
        result = generate(model, tokenizer, hay.prompt_ids, gen_config, prefill_chunk_size=config.prefill_chunk_size)
        correct = score_answer(result.text, hay.key)
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
    langs = sorted({c["language"] for c in cells}, key=lambda x: LANGUAGES.index(x))
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
