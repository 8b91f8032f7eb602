"""The `make demo` showcase: what this build contains, and each fused op beside PyTorch eager at
an EXAONE 3.5 2.4B shape (correctness against float64, then speed).

    python -m exaone_ext.demo [--tokens 2048] [--repeats 20]
"""
from __future__ import annotations

import argparse
import time

import torch

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM = 2560, 7168, 32, 8, 80  # EXAONE 3.5 2.4B


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cases(tokens: int, dtype: torch.dtype):
    """(name, exaone_ext call, eager call, float64 reference call) on fresh random inputs."""
    g, u = (torch.randn(tokens, INTER, dtype=dtype) for _ in range(2))
    yield ("swiglu", lambda: ops.swiglu(g, u), lambda: reference.swiglu(g, u),
           lambda: reference.swiglu(g.double(), u.double()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    info = exaone_ext.build_info()
    print(f"exaone_ext {info['version']} | torch {info['torch_version']} | CUDA kernels: "
          f"{'sm ' + ','.join(info['cuda_archs']) if info['cuda'] else 'not built'} | CPU kernels: "
          f"{info['cpu_isa']} ({', '.join(info['cpu_features']) or 'no vector extensions'}) | threads {info['threads']}")
    print(f"\nEXAONE 3.5 2.4B shapes, {args.tokens} tokens, bfloat16 on CPU; error = max |op - float64 reference|")
    print(f"{'op':<14}{'exaone_ext':>12}{'eager':>12}{'speed-up':>10}{'err ours':>11}{'err eager':>11}")
    for name, ours, eager, exact in _cases(args.tokens, torch.bfloat16):
        with torch.no_grad():
            ref = exact()
            err_ours = (ours().double() - ref).abs().max().item()
            err_eager = (eager().double() - ref).abs().max().item()
            t_ours, t_eager = _time(ours, args.repeats), _time(eager, args.repeats)
        print(f"{name:<14}{t_ours * 1e3:>10.2f}ms{t_eager * 1e3:>10.2f}ms{t_eager / t_ours:>9.2f}x"
              f"{err_ours:>11.2e}{err_eager:>11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
