"""Interleaved exaone_ext vs SDPA timings for attention: the two implementations alternate call by
call and the best of N is kept for each, so that load from other processes on a shared machine
hits both alike (pytest-benchmark runs all rounds of one implementation, then the other).

    python benchmarks/compare_attention.py [--seq 2048] [--repeats 4]

bfloat16 rows also time the other engine of the CPU tile products where both run here (the kernels'
own AVX512-BF16 products and oneDNN's brgemm, AMX tiles where the CPU has them): "other engine",
alternated with the rest; build_info()["cpu_attention_bf16_products"] names the default.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import exaone_ext
from exaone_ext import _C, ops

MODELS = [("2.4b", 32, 8, 80), ("7.8b", 32, 8, 128)]


def _best(fns, repeats):
    """Best time of each function, the functions alternating call by call."""
    for f in fns:
        f()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def _best_pair(fa, fb, repeats):
    return tuple(_best([fa, fb], repeats))


def _engines():
    """Per direction, forward then backward: (the other engine's mode, its name) of the CPU bf16 tile
    products, or None when one engine runs here. The default may differ by direction ("oneDNN brgemm
    (AVX-512) forward, avx512bf16 backward" on Zen 5)."""
    default = exaone_ext.build_info()["cpu_attention_bf16_products"]
    if default == "float32":
        return None
    before = _C._set_attn_brgemm(1)
    brgemm = exaone_ext.build_info()["cpu_attention_bf16_products"]
    _C._set_attn_brgemm(before)
    if not brgemm.startswith("oneDNN"):
        return None
    fwd_on = default.startswith("oneDNN")
    bwd_on = fwd_on and "backward" not in default
    other = lambda on: (0, "avx512bf16") if on else (1, brgemm)  # noqa: E731
    return other(fwd_on), other(bwd_on)


def _with_mode(mode, f):
    def run():
        before = _C._set_attn_brgemm(mode)
        try:
            return f()
        finally:
            _C._set_attn_brgemm(before)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    s = args.seq
    engines = _engines()
    print(f"threads {torch.get_num_threads()}, causal, batch 1, seq {s}; TFLOP/s as flash-attention counts them; "
          f"bf16 tile products: {exaone_ext.build_info()['cpu_attention_bf16_products']}"
          + (f" (other engine: forward {engines[0][1]}, backward {engines[1][1]})" if engines else ""))
    for name, hq, hk, d in MODELS:
        fl = 4 * s * s * hq * d / 2
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(1, s, h, d, dtype=dtype) for h in (hq, hk, hk))
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            other = engines if dtype == torch.bfloat16 else None
            fwd = lambda: ops.flash_attn(q, k, v, causal=True)  # noqa: E731
            fns = [_with_mode(-1, fwd), lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                               enable_gqa=True)]
            with torch.no_grad():
                a, b, *c = _best(fns + ([_with_mode(other[0][0], fwd)] if other else []), args.repeats)
            extra = f" | other engine {fl / c[0] / 1e12:.3f} TF/s (x{a / c[0]:.2f} the default's rate)" if c else ""
            print(f"fwd {name} {str(dtype)[6:]:9s} exaone_ext {a * 1e3:8.1f} ms {fl / a / 1e12:.3f} TF/s | "
                  f"sdpa {b * 1e3:8.1f} ms {fl / b / 1e12:.3f} TF/s | x{b / a:.2f}{extra}", flush=True)
            lq = [x.clone().requires_grad_() for x in (q, k, v)]
            lt = [x.clone().requires_grad_() for x in (qt, kt, vt)]
            o = ops.flash_attn(*lq, causal=True)
            ot = F.scaled_dot_product_attention(*lt, is_causal=True, enable_gqa=True)
            do = torch.randn_like(o)
            dot = do.transpose(1, 2).contiguous()
            bwd = lambda: torch.autograd.grad(o, lq, do, retain_graph=True)  # noqa: E731
            fns = [_with_mode(-1, bwd), lambda: torch.autograd.grad(ot, lt, dot, retain_graph=True)]
            a, b, *c = _best(fns + ([_with_mode(other[1][0], bwd)] if other else []), max(2, args.repeats - 1))
            extra = f" | other engine {2.5 * fl / c[0] / 1e12:.3f} TF/s (x{a / c[0]:.2f} the default's rate)" if c else ""
            print(f"bwd {name} {str(dtype)[6:]:9s} exaone_ext {a * 1e3:8.1f} ms {2.5 * fl / a / 1e12:.3f} TF/s | "
                  f"sdpa {b * 1e3:8.1f} ms {2.5 * fl / b / 1e12:.3f} TF/s | x{b / a:.2f}{extra}", flush=True)
    # decode: one token against a full cache, K/V read rate beside the copy bandwidth
    src = torch.ones(1 << 28, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy = min(_best_pair(lambda: dst.copy_(src), lambda: None, 5)[0], 1e9)
    copy_gbs = 2 * src.numel() / copy / 1e9
    for name, hq, hk, d in MODELS:
        kc, vc = (torch.randn(1, args.ctx, hk, d, dtype=torch.bfloat16) for _ in range(2))
        lens = torch.full((1,), args.ctx, dtype=torch.int32)
        q = torch.randn(1, 1, hq, d, dtype=torch.bfloat16)
        kt, vt, qt = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous(), q.transpose(1, 2).contiguous()
        with torch.no_grad():
            a, b = _best_pair(lambda: ops.flash_attn_with_kvcache(q, kc, vc, lens),
                              lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), args.repeats)
        nbytes = 2 * kc.numel() * kc.element_size()
        print(f"decode {name} ctx {args.ctx} bf16: exaone_ext {a * 1e3:.1f} ms {nbytes / a / 1e9:.1f} GB/s "
              f"({100 * nbytes / a / 1e9 / copy_gbs:.0f}% of copy {copy_gbs:.1f} GB/s) | sdpa {b * 1e3:.1f} ms | "
              f"x{b / a:.2f}", flush=True)


if __name__ == "__main__":
    main()
