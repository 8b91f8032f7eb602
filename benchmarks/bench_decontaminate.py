"""Decontamination throughput: the compiled pool against plain Python, same pool, same run.

    python benchmarks/bench_decontaminate.py                    # 100,000 test examples, 32 MB of training text
    python benchmarks/bench_decontaminate.py --tests 20000 --mb 8 --python-mb 1   # a quick run

Test examples are synthetic benchmark questions (English, a fifth Korean); training documents are
synthetic paragraphs of 0.3-3 KB (the same mix) of which 1% embed a test example with its case and
spacing changed. Rates are MB of training text (UTF-8 bytes) per second on one thread (per core),
and on all threads. The plain-Python baseline implements the same method the fast way Python
offers: regex normalisation, a set of window strings, windows drawn with random.Random seeded from
a blake2b digest of the normalised text; it runs on a slice of the corpus (its rate is per MB).
Both must agree on which documents are contaminated in exhaustive mode.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import time

from exaone_ext.data import DecontaminationPool


def _vocab(rng: random.Random, n: int, alphabet: str, lo: int, hi: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def make_data(n_tests: int, mb: float, seed: int = 0):
    rng = random.Random(seed)
    en = _vocab(rng, 20000, "abcdefghijklmnopqrstuvwxyz", 2, 9)
    ko = _vocab(rng, 8000, "".join(chr(c) for c in range(0xAC00, 0xAC00 + 2000, 7)), 1, 4)

    def sentence(k: int, korean: bool) -> str:
        words = rng.choices(ko if korean else en, k=k)
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", "?", ",", ";"])

    tests = [" ".join(sentence(rng.randint(4, 10), rng.random() < 0.2) for _ in range(rng.randint(1, 3)))
             for _ in range(n_tests)]
    docs, size = [], 0
    while size < mb * 1e6:
        korean = rng.random() < 0.2
        doc = " ".join(sentence(rng.randint(5, 25), korean) for _ in range(rng.randint(3, 25)))
        if rng.random() < 0.01:
            t = rng.choice(tests)
            doc = doc[:len(doc) // 2] + " " + t.upper().replace(" ", "  ") + " " + doc[len(doc) // 2:]
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return tests, docs


# ---------------------------------------------------------------------------- plain Python
_NON_ALNUM = re.compile(r"[\W_]+")


def py_normalize(text: str) -> str:
    return _NON_ALNUM.sub("", text).lower()


def py_pool(tests: list[str], window: int) -> tuple[set, set]:
    windows, short = set(), set()
    for t in tests:
        n = py_normalize(t)
        if len(n) < window:
            short.add(n)
        else:
            windows.update(n[i:i + window] for i in range(len(n) - window + 1))
    return windows, short


def py_check(docs: list[str], pool: tuple[set, set], window: int, mode: str, samples: int) -> list[bool]:
    windows, short = pool
    out = []
    for d in docs:
        n = py_normalize(d)
        if len(n) < window:
            out.append(bool(n) and n in short)
            continue
        count = len(n) - window + 1
        if mode == "exhaustive" or count <= samples:
            offsets = range(count)
        else:
            rng = random.Random(int.from_bytes(hashlib.blake2b(n.encode()).digest()[:8], "little"))
            offsets = [rng.randrange(count) for _ in range(samples)]
        out.append(any(n[i:i + window] in windows for i in offsets))
    return out


def timed(fn, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=100_000, help="test examples in the pool")
    ap.add_argument("--mb", type=float, default=32.0, help="MB of training text for the compiled pool")
    ap.add_argument("--python-mb", type=float, default=2.0, help="MB of it for the plain-Python baseline")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    tests, docs = make_data(args.tests, args.mb)
    nbytes = [len(d.encode("utf-8")) for d in docs]
    total = sum(nbytes)
    k, acc = 0, 0
    while k < len(docs) and acc < args.python_mb * 1e6:
        acc, k = acc + nbytes[k], k + 1
    py_docs, py_bytes = docs[:k], acc

    t0 = time.perf_counter()
    pool = DecontaminationPool({"bench": tests}, window=args.window)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppool = py_pool(tests, args.window)
    py_build = time.perf_counter() - t0
    print(f"pool: {args.tests:,} test examples -> {pool.num_windows:,} windows, {pool.table_bytes / 2**20:.0f} MiB "
          f"table; built in {build:.2f} s (plain Python set: {py_build:.2f} s)")
    print(f"training text: {total / 1e6:.1f} MB in {len(docs):,} documents (plain Python on the first "
          f"{py_bytes / 1e6:.1f} MB); threads available: {args.threads}")

    rows = []
    for mode in ("exhaustive", "sampled"):
        t1, hits1 = timed(lambda: pool.check(docs, mode, args.samples, threads=1), repeat=2)
        tn, hitsn = timed(lambda: pool.check(docs, mode, args.samples, threads=args.threads), repeat=2)
        assert hits1 == hitsn, "results differ between thread counts"
        tp, py_flags = timed(lambda: py_check(py_docs, ppool, args.window, mode, args.samples), repeat=1)
        ours = [bool(h) for h in hits1[:k]]
        if mode == "exhaustive":
            assert ours == py_flags, "compiled and plain-Python exhaustive results differ"
        per_core, all_threads, py_rate = total / t1 / 1e6, total / tn / 1e6, py_bytes / tp / 1e6
        rows.append((mode, per_core, all_threads, py_rate, per_core / py_rate, sum(bool(h) for h in hits1),
                     sum(ours), sum(py_flags)))
    print(f"\n| mode | exaone_ext MB/s per core | MB/s, {args.threads} threads | plain Python MB/s | per core vs Python "
          f"| flagged (all) | flagged in Python's slice: ours / Python |")
    print("|---|---|---|---|---|---|---|")
    for mode, pc, at, py, ratio, flagged, o, p in rows:
        print(f"| {mode} | {pc:,.1f} | {at:,.1f} | {py:.2f} | {ratio:,.0f}x | {flagged:,} | {o} / {p} |")


if __name__ == "__main__":
    main()
