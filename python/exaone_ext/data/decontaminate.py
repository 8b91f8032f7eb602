"""Substring-overlap decontamination of training data against benchmark test sets.

    from exaone_ext.data import DecontaminationPool, decontaminate
    pool = DecontaminationPool({"mmlu": mmlu_texts, "kmmlu": kmmlu_texts}, window=50)
    pool.check(["a training document", ...], mode="sampled", samples=10)   # [[Match, ...], ...]
    report = decontaminate(["train.jsonl"], ["mmlu.jsonl"], "out/", train_field="text",
                           test_fields=["question", "answer"])

The method (EXAONE 3.5 report, after GPT-4): text is normalised by keeping the characters for
which str.isalnum() is true, each lower-cased with str.lower() (so Korean, CJK and accented Latin
count; spacing, punctuation and case do not). Every window of `window` code points of every
normalised test example goes into the pool. A training example is contaminated when one of its
windows is in the pool: in "sampled" mode `samples` windows are checked, drawn with a generator
seeded from the example's normalised text (the same example always gets the same windows,
whatever the run or the thread count; an example with at most `samples` windows has all checked);
in "exhaustive" mode every window is. Examples shorter than `window` after normalisation are
compared whole: such a training example is contaminated when it equals a whole normalised test
example (which is then shorter than the window too); a short test example matches nothing else.
Empty examples never match. Test examples' fields are joined before normalising, so a window can
span them.

The pool lives in C++ (csrc/text/decontaminate.cpp) as 64-bit hashes in an open-addressing table;
every hash hit is compared with the stored normalised test text, so a collision cannot remove a
clean example. Training data is streamed in chunks: memory is the pool plus one chunk.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .decontaminate_reference import normalize

__all__ = ["DecontaminationPool", "Match", "decontaminate", "normalize", "read_test_set", "normalization_tables"]

MODES = ("sampled", "exhaustive")
_CHUNK_BYTES = 8 << 20  # training text per call into C++: large enough to spread over threads


@lru_cache(maxsize=1)
def normalization_tables() -> tuple[bytes, list[int]]:
    """(table, extra) for the compiled normaliser, built from str.isalnum and str.lower so that
    it agrees with `normalize` by construction: table[cp] = 0 (dropped), the lower-case code point,
    or 0x80000000 | offset << 8 | length into `extra` when the lower case is several code points."""
    import numpy as np

    table = np.zeros(0x110000, dtype="<u4")
    extra: list[int] = []
    for cp in range(0x110000):
        ch = chr(cp)
        if ch.isalnum():
            low = ch.lower()
            if len(low) == 1:
                table[cp] = ord(low)
            else:
                table[cp] = 0x80000000 | (len(extra) << 8) | len(low)
                extra.extend(ord(c) for c in low)
    return table.tobytes(), extra


@lru_cache(maxsize=1)
def _normalizer():
    from .. import _C

    table, extra = normalization_tables()
    return _C._TextNormalizer(table, extra)


def normalize_native(text: str | bytes) -> str:
    """`normalize` computed by the compiled normaliser (str or UTF-8 bytes)."""
    return _normalizer().normalize(text)


@dataclass(frozen=True)
class Match:
    """One benchmark a training example matched: the test example (index within its benchmark)
    holding the window, and where the window starts in the example's normalised text."""
    benchmark: str
    test_index: int
    offset: int


def _threads(threads: int | None) -> int:
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"decontaminate: threads: expected an integer >= 1 or None, got {threads!r}")
    return threads


class DecontaminationPool:
    """The hashed windows of the normalised test examples of one or more benchmarks.

    tests: {benchmark name: [test example text, ...]}. window: S, the window in code points."""

    def __init__(self, tests: Mapping[str, Sequence[str]], window: int = 50):
        from .. import _C

        if not isinstance(tests, Mapping) or not tests:
            raise ValueError(f"DecontaminationPool: tests: expected a non-empty dict {{benchmark: [texts]}}, "
                             f"got {type(tests).__name__ if not isinstance(tests, Mapping) else 'an empty dict'}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"DecontaminationPool: window: expected an integer >= 1, got {window!r}")
        self.window = window
        self.benchmarks = list(tests)
        texts: list[str] = []
        groups: list[int] = []
        self._first: list[int] = []  # global index of each benchmark's first test example
        for g, name in enumerate(self.benchmarks):
            items = tests[name]
            if isinstance(items, (str, bytes)):
                raise TypeError(f"DecontaminationPool: tests[{name!r}]: expected a list of strings, got a single string")
            self._first.append(len(texts))
            for i, t in enumerate(items):
                if not isinstance(t, str):
                    raise TypeError(f"DecontaminationPool: tests[{name!r}][{i}]: expected str, got {type(t).__name__}")
                texts.append(t)
                groups.append(g)
        self._groups = groups
        self._pool = _C._DecontaminationPool(_normalizer(), window, texts, groups)

    @property
    def num_windows(self) -> int:
        """Distinct (window text, benchmark) pairs held."""
        return self._pool.num_windows

    @property
    def table_bytes(self) -> int:
        return self._pool.table_bytes

    def check_raw(self, docs: list, mode: str = "sampled", samples: int = 10, threads: int | None = None):
        """([(doc, global test index, offset)], [docs that are not valid UTF-8]) for str / bytes docs."""
        if mode not in MODES:
            raise ValueError(f"DecontaminationPool.check: mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"DecontaminationPool.check: samples: expected an integer >= 1, got {samples!r}")
        if not isinstance(docs, list):
            docs = list(docs)
        return self._pool.check(docs, mode, samples, _threads(threads))

    def check(self, docs: Sequence[str], mode: str = "sampled", samples: int = 10,
              threads: int | None = None) -> list[list[Match]]:
        """For each document, the benchmarks it matched (empty list: clean)."""
        hits, invalid = self.check_raw(list(docs), mode, samples, threads)
        if invalid:
            raise ValueError(f"DecontaminationPool.check: docs[{invalid[0]}] is not valid UTF-8")
        out: list[list[Match]] = [[] for _ in docs]
        for d, t, off in hits:
            out[d].append(self._match(t, off))
        return out

    def _match(self, test: int, offset: int) -> Match:
        g = self._groups[test]
        return Match(self.benchmarks[g], test - self._first[g], offset)


# ---------------------------------------------------------------------------- reading files
def _field_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return " ".join(str(v) for v in value)
    raise ValueError(f"{where}: expected a string, a number or a list of them, got {type(value).__name__}")


def _jsonl_records(path: str, with_raw: bool = False) -> Iterator[tuple]:
    """(line number, object) for every non-blank line of a JSONL file (plus the raw bytes with_raw)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield (lineno, record, raw) if with_raw else (lineno, record)


def read_test_set(path: str | os.PathLike, fields: Sequence[str]) -> list[str]:
    """The test examples of a JSONL benchmark file: for each line, its `fields` joined by spaces
    (a list value is joined too). Errors name the file and line."""
    path = os.fspath(path)
    if isinstance(fields, str) or not fields:
        raise ValueError(f"read_test_set: fields: expected a non-empty list of field names, got {fields!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: test set not found")
    texts = []
    for lineno, record in _jsonl_records(path):
        parts = []
        for name in fields:
            if name not in record:
                raise ValueError(f"{path}:{lineno}: missing field {name!r} (the line has {sorted(record)})")
            parts.append(_field_text(record[name], f"{path}:{lineno}: field {name!r}"))
        texts.append(" ".join(parts))
    if not texts:
        raise ValueError(f"{path}: empty test set (no JSON lines)")
    return texts


@dataclass
class _Example:
    line: int           # first line of the example in its file (1-based)
    raw: bytes          # exactly as written back to the clean file
    text: str | bytes   # what is checked


def _text_examples(path: str, unit: str) -> Iterator[list[_Example]]:
    """Chunks of examples of a text file: one per line, or one per paragraph (blank-line separated)."""
    with open(path, "rb") as f:
        lineno, rest, para, para_line = 0, b"", [], 0
        while True:
            block = f.read(_CHUNK_BYTES)
            if block:  # whole lines only; the tail waits for the next block
                data = rest + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut:]
            else:
                data, rest = rest, b""
            lines = data.split(b"\n") if data else []
            if lines and lines[-1] == b"":
                lines.pop()
            chunk: list[_Example] = []
            for line in lines:
                lineno += 1
                if unit == "line":
                    chunk.append(_Example(lineno, line, line))
                elif line.strip():
                    if not para:
                        para_line = lineno
                    para.append(line)
                elif para:
                    text = b"\n".join(para)
                    chunk.append(_Example(para_line, text, text))
                    para = []
            if not block and para:
                text = b"\n".join(para)
                chunk.append(_Example(para_line, text, text))
                para = []
            yield chunk
            if not block:
                break


def _jsonl_examples(path: str, field: str) -> Iterator[list[_Example]]:
    chunk, size = [], 0
    for lineno, record, raw in _jsonl_records(path, with_raw=True):
        if field not in record:
            raise ValueError(f"{path}:{lineno}: missing field {field!r} (the line has {sorted(record)})")
        text = _field_text(record[field], f"{path}:{lineno}: field {field!r}")
        chunk.append(_Example(lineno, raw.rstrip(b"\r\n"), text))
        size += len(raw)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _train_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.lower().endswith((".jsonl", ".json", ".ndjson")) else "text"


class _Bar:
    """Bytes of training text done, with MB/s, on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int, removed: int, final: bool = False) -> None:
        self.done = self.total if final else min(self.done + nbytes, self.total)
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 0.2):
            return
        self.last = now
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        sys.stderr.write(f"\rdecontaminate [{'#' * int(30 * frac):<30}] {frac:6.1%} {self.done / 1e6:,.1f}/"
                         f"{self.total / 1e6:,.1f} MB {rate:,.1f} MB/s, {removed:,} removed")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


class _AtomicFile:
    """A file written beside its target and renamed over it on success (removed on failure)."""

    def __init__(self, path: str):
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                        dir=os.path.dirname(path) or ".")
        self.f = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def decontaminate(train_files: Sequence[str | os.PathLike], test_files: Sequence[str | os.PathLike] | Mapping,
                  out_dir: str | os.PathLike, *, test_fields: Sequence[str] = ("text",), train_field: str = "text",
                  train_format: str = "auto", text_unit: str = "line", window: int = 50, samples: int = 10,
                  mode: str = "sampled", threads: int | None = None, progress: bool = False) -> dict:
    """Writes into out_dir: each training file cleaned (same name, format and order), removed.jsonl
    (one record per removed example: file, line, benchmarks, text) and report.json; returns the report.

    train_format: "auto" (.jsonl / .json / .ndjson -> JSONL, else text), "jsonl" or "text".
    text_unit (text files): "line" (one example per line) or "paragraph" (blank-line separated;
    written back separated by one blank line). test_files: JSONL paths (benchmark = file stem) or
    {benchmark: path}."""
    if mode not in MODES:
        raise ValueError(f"decontaminate: mode: expected one of {MODES}, got {mode!r}")
    if text_unit not in ("line", "paragraph"):
        raise ValueError(f"decontaminate: text_unit: expected 'line' or 'paragraph', got {text_unit!r}")
    if train_format not in ("auto", "jsonl", "text"):
        raise ValueError(f"decontaminate: train_format: expected 'auto', 'jsonl' or 'text', got {train_format!r}")
    train_files = [os.fspath(p) for p in train_files]
    if not train_files:
        raise ValueError("decontaminate: train_files: expected at least one file")
    if not isinstance(test_files, Mapping):
        test_files = {Path(p).stem: p for p in test_files}
    if not test_files:
        raise ValueError("decontaminate: test_files: expected at least one file")
    names = [os.path.basename(p) for p in train_files]
    if len(set(names)) != len(names):
        raise ValueError(f"decontaminate: train_files: two files share a name ({names}); the clean copies would collide")
    for p in train_files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: training file not found")
        if os.path.getsize(p) == 0:
            raise ValueError(f"{p}: empty training file")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for p in train_files:
        if os.path.abspath(os.path.join(out_dir, os.path.basename(p))) == os.path.abspath(p):
            raise ValueError(f"decontaminate: out_dir {out_dir!r} holds the training file {p!r}; choose another")

    start = time.monotonic()
    pool = DecontaminationPool({name: read_test_set(path, test_fields) for name, path in test_files.items()}, window)
    pool_seconds = time.monotonic() - start
    per_bench = {name: {"file": os.fspath(test_files[name]), "test_examples": 0, "matched_train_examples": 0,
                        "example": None} for name in pool.benchmarks}
    for g, name in enumerate(pool.benchmarks):
        end = pool._first[g + 1] if g + 1 < len(pool._first) else len(pool._groups)
        per_bench[name]["test_examples"] = end - pool._first[g]
    bar = _Bar(sum(os.path.getsize(p) for p in train_files), progress)
    files_report, removed_total = [], 0
    removed = _AtomicFile(os.path.join(out_dir, "removed.jsonl"))
    outputs: list[_AtomicFile] = [removed]
    check_seconds = 0.0
    try:
        for path in train_files:
            fmt = _train_format(path, train_format)
            out = _AtomicFile(os.path.join(out_dir, os.path.basename(path)))
            outputs.append(out)
            n_examples = n_removed = 0
            chunks = _jsonl_examples(path, train_field) if fmt == "jsonl" else _text_examples(path, text_unit)
            first = True
            for chunk in chunks:
                t0 = time.monotonic()
                hits, invalid = pool.check_raw([e.text for e in chunk], mode, samples, threads)
                check_seconds += time.monotonic() - t0
                if invalid:
                    raise ValueError(f"{path}:{chunk[invalid[0]].line}: not valid UTF-8")
                matched: dict[int, list[Match]] = {}
                for d, t, off in hits:
                    matched.setdefault(d, []).append(pool._match(t, off))
                kept = []
                for i, ex in enumerate(chunk):
                    if i not in matched:
                        kept.append(ex.raw)
                        continue
                    text = ex.text if isinstance(ex.text, str) else ex.text.decode("utf-8")
                    record = {"file": path, "line": ex.line, "benchmarks": [m.benchmark for m in matched[i]],
                              "text": text}
                    removed.f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                    for m in matched[i]:
                        b = per_bench[m.benchmark]
                        b["matched_train_examples"] += 1
                        if b["example"] is None:
                            norm = normalize(text)
                            b["example"] = {"train_file": path, "train_line": ex.line, "test_index": m.test_index,
                                            "matched_text": norm[m.offset:m.offset + window],
                                            "train_text": text[:300]}
                sep = b"\n\n" if fmt == "text" and text_unit == "paragraph" else b"\n"
                if kept:
                    out.f.write((b"" if first else sep) + sep.join(kept))
                    first = False
                n_examples += len(chunk)
                n_removed += len(matched)
                bar.update(sum(len(e.raw) + 1 for e in chunk), removed_total + n_removed)
            if not first:
                out.f.write(b"\n")
            if n_examples == 0:
                raise ValueError(f"{path}: no training examples" + (" (no JSON lines)" if fmt == "jsonl" else ""))
            removed_total += n_removed
            files_report.append({"file": path, "format": fmt, "examples": n_examples, "removed": n_removed,
                                 "kept": n_examples - n_removed, "bytes": os.path.getsize(path),
                                 "clean_file": out.path})
        bar.update(0, removed_total, final=True)
        seconds = time.monotonic() - start
        total_bytes = sum(f["bytes"] for f in files_report)
        report = {"method": {"window": window, "mode": mode, "samples": samples if mode == "sampled" else None,
                             "text_unit": text_unit, "test_fields": list(test_fields), "train_field": train_field},
                  "pool": {"windows": pool.num_windows, "table_bytes": pool.table_bytes, "seconds": pool_seconds},
                  "train_files": files_report, "benchmarks": per_bench,
                  "examples": sum(f["examples"] for f in files_report), "removed": removed_total,
                  "seconds": seconds, "check_mb_per_s": total_bytes / 1e6 / check_seconds if check_seconds else None}
        rep = _AtomicFile(os.path.join(out_dir, "report.json"))
        outputs.append(rep)
        rep.f.write(json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
        for o in outputs:
            o.commit()
    except BaseException:
        for o in outputs:
            o.abort()
        raise
    return report


def format_report(report: dict) -> str:
    """The report as a table: per benchmark, the training examples it matched and one of them."""
    rows = [("benchmark", "test examples", "matched train examples", "example match")]
    for name, b in report["benchmarks"].items():
        ex = b["example"]
        where = f"{ex['train_file']}:{ex['train_line']} ~ test #{ex['test_index']}: {ex['matched_text'][:40]!r}" if ex else "-"
        rows.append((name, f"{b['test_examples']:,}", f"{b['matched_train_examples']:,}", where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{report['removed']:,} of {report['examples']:,} training examples removed "
                 f"({report['method']['mode']}, window {report['method']['window']}) in {report['seconds']:.1f} s")
    return "\n".join(lines)
