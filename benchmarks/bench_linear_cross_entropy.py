"""Fused linear + cross-entropy (forward + backward) against the unfused
F.cross_entropy(F.linear(hidden, weight).float(), targets), in the same process.

Speed (pytest-benchmark; tokens/s of forward + backward):

    pytest benchmarks/bench_linear_cross_entropy.py --benchmark-only --benchmark-max-time=1

Peak memory of the loss at the training shape (seq 8192, vocab 102400; bf16):

    python benchmarks/bench_linear_cross_entropy.py --tokens 8192 --vocab 102400 --hidden 512

Each implementation runs once in a fresh process. Peak memory is the process's resident-set
high-water mark (VmHWM in /proc/self/status), reset after the inputs are made (writing 5 to
/proc/self/clear_refs) and read after forward + backward; the figure is that peak minus the
resident set just before the loss, i.e. everything the loss and its gradients allocated (the
gradients of hidden and weight included, for both). On CUDA, torch.cuda.max_memory_allocated is
used the same way. tracemalloc would not see torch's allocations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from exaone_ext import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


IMPLS = {"exaone_ext": ops.linear_cross_entropy, "unfused": unfused}


def _inputs(n, v, d, dtype, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) * d ** -0.5).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::50] = -100
    return h, w, t


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,v,d", [(512, 32000, 256), (2048, 32000, 512), (2048, 102400, 512)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_cross_entropy_fwd_bwd(measure, impl, n, v, d, dtype):
    h, w, t = _inputs(n, v, d, dtype)
    fn = IMPLS[impl]

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    measure(step, group=f"linear_cross_entropy fwd+bwd {n}x{d} -> {v} {dtype}", impl=impl,
            flops=3 * 2 * n * v * d, tokens=n, device=DEVICE)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _one_run(impl: str, n: int, v: int, d: int, dtype: torch.dtype) -> dict:
    """Forward + backward once in this process; the loss's peak memory and time."""
    h, w, t = _inputs(n, v, d, dtype)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _rss_bytes()
    start = time.perf_counter()
    loss = IMPLS[impl](h, w, t)
    loss.backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if DEVICE == "cuda" else _hwm_bytes()) - before
    return {"impl": impl, "peak_bytes": peak, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=102400)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--child", choices=list(IMPLS), help=argparse.SUPPRESS)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.child:
        print(json.dumps(_one_run(a.child, a.tokens, a.vocab, a.hidden, dtype)))
        return
    rows = {}
    for impl in IMPLS:
        cmd = [sys.executable, __file__, "--child", impl, "--tokens", str(a.tokens), "--vocab", str(a.vocab),
               "--hidden", str(a.hidden), "--dtype", a.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[impl] = json.loads(out.strip().splitlines()[-1])
    print(f"linear_cross_entropy fwd+bwd, {a.tokens} tokens x {a.hidden} -> vocab {a.vocab}, {a.dtype}, {DEVICE}, "
          f"{torch.get_num_threads()} threads")
    for impl, r in rows.items():
        print(f"  {impl:<11} peak {r['peak_bytes'] / 2**20:9.1f} MiB  {r['seconds']:7.2f} s  loss {r['loss']:.6f}")
    f, u = rows["exaone_ext"], rows["unfused"]
    print(f"  peak memory exaone_ext / unfused = {f['peak_bytes'] / u['peak_bytes']:.3f} "
          f"(target <= 0.25); time unfused / exaone_ext = {u['seconds'] / f['seconds']:.2f}x")
    print(f"  logits alone ([tokens, vocab] float32): {a.tokens * a.vocab * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
