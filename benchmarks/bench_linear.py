"""Linear layers of a decode step (a few rows against a large bf16 weight) against
torch.nn.functional.linear, at the EXAONE 3.5 2.4B shapes, reporting the weight bytes read per
second and their fraction of the read bandwidth measured in the same run.

    pytest benchmarks/bench_linear.py --benchmark-only
    pytest benchmarks/bench_linear.py --benchmark-only -k "102400 and rows1"

On the CPU a third implementation, "widen", is exaone_ext with the AVX2 pair-order tiles for several
rows of bf16 turned off (every weight widened one by one, the kernel they replaced): the speed-up
over it is what those tiles bring (none at one row, or where the CPU variant is not AVX2). A fourth,
"no-brgemm", is exaone_ext with oneDNN's brgemm off for 16-64 rows (the streaming kernel at 16,
at::matmul above): the speed-up over it is what brgemm brings where it runs (AVX512-BF16 or AMX).
"""
import pytest
import torch
import torch.nn.functional as F

from exaone_ext import _C, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (name, in_features, out_features) of the 2.4B model: MLP gate/up, MLP down, LM head
SHAPES = [("c_fc", 2560, 7168), ("c_proj", 7168, 2560), ("lm_head", 2560, 102400)]
ROWS = [1, 4, 8, 16, 32]  # decode batch: tokens per step


def linear_widen(x, w):
    """ops.linear with the AVX2 pair-order tiles off."""
    before = _C._set_linear_bf16_pairs(False)
    try:
        return ops.linear(x, w)
    finally:
        _C._set_linear_bf16_pairs(before)


def linear_no_brgemm(x, w):
    """ops.linear with oneDNN's brgemm off."""
    before = _C._set_linear_brgemm(0)
    try:
        return ops.linear(x, w)
    finally:
        _C._set_linear_brgemm(before)


IMPLS = {"exaone_ext": ops.linear, "torch": F.linear}
if DEVICE == "cpu":
    IMPLS["widen"] = linear_widen
    IMPLS["no-brgemm"] = linear_no_brgemm


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"rows{m}")
@pytest.mark.parametrize("name,k,n", SHAPES, ids=lambda v: str(v))
def test_linear_decode(measure, impl, m, name, k, n):
    fn = IMPLS[impl]
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        measure(lambda: fn(x, w), group=f"linear {name} {k}->{n} rows={m} bf16", impl=impl,
                nbytes_read=w.nbytes, device=DEVICE)
