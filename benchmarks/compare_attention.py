"""Interleaved exaone_ext vs SDPA timings for attention: the two implementations alternate call by
call and the best of N is kept for each, so that load from other processes on a shared machine
hits both alike (pytest-benchmark runs all rounds of one implementation, then the other).

    python benchmarks/compare_attention.py [--seq 2048] [--repeats 4]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from exaone_ext import ops

MODELS = [("2.4b", 32, 8, 80), ("7.8b", 32, 8, 128)]


def _best_pair(fa, fb, repeats):
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, t in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return min(ta), min(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    s = args.seq
    print(f"threads {torch.get_num_threads()}, causal, batch 1, seq {s}; TFLOP/s as flash-attention counts them")
    for name, hq, hk, d in MODELS:
        fl = 4 * s * s * hq * d / 2
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(1, s, h, d, dtype=dtype) for h in (hq, hk, hk))
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            with torch.no_grad():
                a, b = _best_pair(lambda: ops.flash_attn(q, k, v, causal=True),
                                  lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                                  args.repeats)
            print(f"fwd {name} {str(dtype)[6:]:9s} exaone_ext {a * 1e3:8.1f} ms {fl / a / 1e12:.3f} TF/s | "
                  f"sdpa {b * 1e3:8.1f} ms {fl / b / 1e12:.3f} TF/s | x{b / a:.2f}", flush=True)
            lq = [x.clone().requires_grad_() for x in (q, k, v)]
            lt = [x.clone().requires_grad_() for x in (qt, kt, vt)]
            o = ops.flash_attn(*lq, causal=True)
            ot = F.scaled_dot_product_attention(*lt, is_causal=True, enable_gqa=True)
            do = torch.randn_like(o)
            dot = do.transpose(1, 2).contiguous()
            a, b = _best_pair(lambda: torch.autograd.grad(o, lq, do, retain_graph=True),
                              lambda: torch.autograd.grad(ot, lt, dot, retain_graph=True), max(2, args.repeats - 1))
            print(f"bwd {name} {str(dtype)[6:]:9s} exaone_ext {a * 1e3:8.1f} ms {2.5 * fl / a / 1e12:.3f} TF/s | "
                  f"sdpa {b * 1e3:8.1f} ms {2.5 * fl / b / 1e12:.3f} TF/s | x{b / a:.2f}", flush=True)
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
