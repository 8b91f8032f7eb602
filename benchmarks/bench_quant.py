"""Decode-time linear layers with bf16, int8 and int4 weights in one run, at the EXAONE 3.5 2.4B
shapes: time per call, weight bytes read per second counted in the bytes as stored (quantized
bytes plus scales and zero points), and that rate as a fraction of the read bandwidth sampled
(sum of a 1 GiB tensor) before and after each shape, held against the higher sample.

    python benchmarks/bench_quant.py                       # all shapes, rows 1 4 8
    python benchmarks/bench_quant.py --shapes lm_head --rows 1
    python benchmarks/bench_quant.py --rows 1 --formats bf16 int8 int8-blocks int4 int4-blocks

Each weight is replicated into enough copies (at least --rotate-mb in all) that the calls rotate
through them and every call reads its weight from memory, not from the last-level cache. A
standalone script (not part of the test run)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import exaone_ext
from exaone_ext import _C, ops
from exaone_ext.ops import reference

SHAPES = {"c_fc": (2560, 7168), "c_proj": (7168, 2560), "lm_head": (2560, 102400)}  # (in, out)


def read_bandwidth(device, gib: float = 1.0) -> float:
    """Bytes/s of summing a `gib` GiB float32 tensor (best of 5), as bench_model.py samples it."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def make_weights(fmt: str, k: int, n: int):
    """(args after x, bytes read per call) of one copy of the weight in format fmt."""
    w = torch.randn(n, k) / k**0.5
    if fmt == "bf16":
        t = (w.to(torch.bfloat16),)
    elif fmt.startswith("int8"):  # int8, int8-novnni
        q, s = reference.quantize_int8(w)
        t = (q, s.to(torch.bfloat16))
    else:  # int4, int4-widened, int4-novnni
        q, s, z = reference.quantize_int4(w, 128)
        t = (q, s.to(torch.bfloat16), z)
    return t, sum(a.nbytes for a in t)


def linear_int4_widened(x, *args):
    """linear_int4 with the integer path of 16-bit x turned off (weights widened to float32)."""
    before = _C._set_quant_int_dot(False)
    try:
        return ops.linear_int4(x, *args)
    finally:
        _C._set_quant_int_dot(before)


def _switched_off(fn, switch):
    """fn with one of _C's switches off for the call: _set_cpu_avx512vnni (the avx512 code's
    multiply-adds in place of the AVX512-VNNI variant's), _set_quant_row_stream (one row of x through
    blocks of 8 weight rows side by side, the route of several rows, in place of the one-row stream)."""
    def run(x, *args):
        before = switch(False)
        try:
            return fn(x, *args)
        finally:
            switch(before)
    return run


FNS = {"bf16": ops.linear, "int8": ops.linear_int8, "int4": ops.linear_int4, "int4-widened": linear_int4_widened,
       "int8-blocks": _switched_off(ops.linear_int8, _C._set_quant_row_stream),
       "int4-blocks": _switched_off(ops.linear_int4, _C._set_quant_row_stream)}
if exaone_ext.build_info()["cpu_avx512vnni_active"]:  # this CPU runs the VNNI variant: also time it off
    FNS.update({"int8-novnni": _switched_off(ops.linear_int8, _C._set_cpu_avx512vnni),
                "int4-novnni": _switched_off(ops.linear_int4, _C._set_cpu_avx512vnni)})


def time_calls(fn, x, copies, calls: int) -> float:
    """Median seconds per call over `calls` calls rotating through the copies (after one warm-up round)."""
    for c in copies:
        fn(x, *c)
    times = []
    for i in range(calls):
        args = copies[i % len(copies)]
        t = time.perf_counter()
        fn(x, *args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--formats", nargs="+", default=list(FNS), choices=list(FNS))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rotate-mb", type=float, default=256.0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    results = []
    for name in args.shapes:
        k, n = SHAPES[name]
        weights = {}
        for fmt in args.formats:
            one, nbytes = make_weights(fmt, k, n)
            count = max(1, int(args.rotate_mb * 2**20 // nbytes) + 1) if nbytes < args.rotate_mb * 2**20 else 1
            weights[fmt] = ([one] + [tuple(a.clone() for a in one) for _ in range(count - 1)], nbytes)
        with torch.no_grad():
            for m in args.rows:
                x = torch.randn(m, k).to(torch.bfloat16)
                before = read_bandwidth(device)
                rows = {fmt: time_calls(FNS[fmt], x, weights[fmt][0], args.calls) for fmt in args.formats}
                bw = max(before, read_bandwidth(device))
                for fmt, dt in rows.items():
                    nbytes = weights[fmt][1]
                    results.append({"shape": name, "in": k, "out": n, "rows": m, "format": fmt, "ms": dt * 1e3,
                                    "bytes": nbytes, "GBps": nbytes / dt / 1e9, "fraction": nbytes / dt / bw,
                                    "bandwidth_GBps": bw / 1e9, "speedup_vs_bf16": rows["bf16"] / dt
                                    if "bf16" in rows else float("nan")})
        del weights
    print(f"{'shape':22s}{'rows':>5s}{'format':>13s}{'ms':>9s}{'MB read':>9s}{'GB/s':>8s}{'of bw':>8s}"
          f"{'bw GB/s':>9s}{'vs bf16':>9s}")
    for r in results:
        print(f"{r['shape'] + ' ' + str(r['in']) + '->' + str(r['out']):22s}{r['rows']:5d}{r['format']:>13s}"
              f"{r['ms']:9.3f}{r['bytes'] / 1e6:9.1f}{r['GBps']:8.1f}{r['fraction']:8.1%}{r['bandwidth_GBps']:9.1f}"
              f"{r['speedup_vs_bf16']:8.2f}x")
    print("of bw: bytes as stored (weights + scales + zero points) per second over the higher of the two "
          "bandwidth samples taken around each row count; threads:", torch.get_num_threads())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
