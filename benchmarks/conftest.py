"""Shared benchmark machinery (pytest-benchmark).

Every benchmark runs an exaone_ext op beside its baselines in the same process; `measure` records
the median time of each implementation in a group, and the session ends with a table of rates
(GB/s for memory-bound ops, TFLOP/s for attention, tokens/s for generation), the fraction of the
copy bandwidth measured in the same run, and the speed-up of exaone_ext over each baseline.

    pytest benchmarks --benchmark-only            # all
    pytest benchmarks/bench_swiglu.py --benchmark-only -k 2048
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import pytest
import torch

_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)
_BANDWIDTH: dict[str, float] = {}
_READ_BANDWIDTH: dict[str, float] = {}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of dst.copy_(src) for a large buffer (bytes read + bytes written per second)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of summing a large buffer (bytes read per second): the limit of weight-bound decode."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Copy bandwidth (GB/s) per device, measured once per session: `copy_bandwidth("cpu")`."""
    def get(device: str = "cpu") -> float:
        if device not in _BANDWIDTH:
            _BANDWIDTH[device] = measure_copy_bandwidth(device)
        return _BANDWIDTH[device]
    return get


@pytest.fixture(scope="session")
def read_bandwidth():
    """Read bandwidth (GB/s) per device, measured once per session: `read_bandwidth("cpu")`."""
    def get(device: str = "cpu") -> float:
        if device not in _READ_BANDWIDTH:
            _READ_BANDWIDTH[device] = measure_read_bandwidth(device)
        return _READ_BANDWIDTH[device]
    return get


@pytest.fixture
def measure(benchmark, copy_bandwidth, read_bandwidth):
    """measure(fn, group=..., impl=..., nbytes=..., flops=..., tokens=..., device=...) benchmarks fn
    and records it for the summary table. The first impl named "exaone_ext" in a group is the one
    compared against every other impl of the group. nbytes_read (bytes only read, e.g. the weights of
    a decode step) is reported against the read bandwidth instead of the copy bandwidth."""
    def run(fn, *, group: str, impl: str, nbytes: int | None = None, flops: float | None = None,
            tokens: int | None = None, device: str = "cpu", nbytes_read: int | None = None):
        def timed():
            out = fn()
            _sync(device)
            return out
        timed()  # warm-up (compilation, allocation)
        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        result = benchmark(timed)
        median = benchmark.stats.stats.median
        row = {"median_s": median, "device": device}
        if nbytes:
            row["GB/s"] = nbytes / median / 1e9
            row["copy_GB/s"] = copy_bandwidth(device)
            row["of_copy"] = row["GB/s"] / row["copy_GB/s"]
        if nbytes_read:
            row["GB/s"] = nbytes_read / median / 1e9
            row["read_GB/s"] = read_bandwidth(device)
            row["of_read"] = row["GB/s"] / row["read_GB/s"]
        if flops:
            row["TFLOP/s"] = flops / median / 1e12
        if tokens:
            row["tokens/s"] = tokens / median
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "device"})
        _RESULTS[group][impl] = row
        return result
    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("exaone_ext: rates and speed-ups (same process)")
    for device, bw in _BANDWIDTH.items():
        tr.write_line(f"copy bandwidth {device}: {bw:.1f} GB/s")
    for device, bw in _READ_BANDWIDTH.items():
        tr.write_line(f"read bandwidth {device}: {bw:.1f} GB/s")
    for group, impls in _RESULTS.items():
        ours = impls.get("exaone_ext")
        for impl, row in impls.items():
            rate = "  ".join(f"{k} {row[k]:.3g}" for k in ("GB/s", "TFLOP/s", "tokens/s") if k in row)
            if "of_copy" in row:
                rate += f"  ({100 * row['of_copy']:.0f}% of copy)"
            if "of_read" in row:
                rate += f"  ({100 * row['of_read']:.0f}% of read)"
            speed = ""
            if ours is not None and impl != "exaone_ext":
                speed = f"  exaone_ext is {row['median_s'] / ours['median_s']:.2f}x faster"
            tr.write_line(f"{group:<48} {impl:<14} {row['median_s'] * 1e3:9.3f} ms  {rate}{speed}")
    path = os.environ.get("EXAONE_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"bandwidth": _BANDWIDTH, "read_bandwidth": _READ_BANDWIDTH, "results": _RESULTS}, f, indent=1)


def compiled(fn):
    """torch.compile of a reference function, or None where compile is unavailable here."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # pragma: no cover - platform without a compiler
        return None
