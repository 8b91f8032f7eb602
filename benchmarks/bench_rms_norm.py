"""RMSNorm and residual-add RMSNorm, forward and backward, against PyTorch eager and torch.compile
of the reference, at EXAONE hidden sizes.

    pytest benchmarks/bench_rms_norm.py --benchmark-only
    pytest benchmarks/bench_rms_norm.py --benchmark-only -k "bf16 and 1-2048"

GB/s counts the bytes the fused op must move: each [tokens, hidden] tensor read or written once
(rms_norm forward: x, y; add_rms_norm forward: x, residual, y, h; rms_norm backward: dy, x, dx;
add_rms_norm backward: dy, dh, h, dx) plus the weight and the per-row rstd. The scratch rows of the
weight-gradient sum (at most 64 x hidden float32 on CPU) are not counted.
"""
import pytest
import torch

from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import compiled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN = [("2.4b", 2560), ("7.8b", 4096)]
TOKENS = [(1, 2048), (8, 512)]
EPS = 1e-5

_compiled_rms = compiled(reference.rms_norm)
_compiled_add = compiled(reference.add_rms_norm)
RMS = {"exaone_ext": ops.rms_norm, "eager": reference.rms_norm, "compile": _compiled_rms}
ADD = {"exaone_ext": ops.add_rms_norm, "eager": reference.add_rms_norm, "compile": _compiled_add}


def _inputs(b, s, hidden, dtype, grad=False):
    x = torch.randn(b, s, hidden, dtype=dtype, device=DEVICE, requires_grad=grad)
    r = torch.randn(b, s, hidden, dtype=dtype, device=DEVICE, requires_grad=grad)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype).requires_grad_(grad)
    return x, r, w


def _nbytes(x, w, tensors):
    rows = x.numel() // x.shape[-1]
    return tensors * x.numel() * x.element_size() + w.numel() * w.element_size() + rows * 4


PARAMS = [
    pytest.mark.parametrize("impl", ["exaone_ext", "eager", "compile"]),
    pytest.mark.parametrize("b,s", TOKENS, ids=lambda v: str(v)),
    pytest.mark.parametrize("model,hidden", HIDDEN),
    pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"]),
]


def _params(f):
    for p in reversed(PARAMS):
        f = p(f)
    return f


@_params
def test_rms_norm_forward(measure, impl, b, s, model, hidden, dtype):
    fn = RMS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    x, _, w = _inputs(b, s, hidden, dtype)
    with torch.no_grad():
        measure(lambda: fn(x, w, EPS), group=f"rms_norm fwd {model} {b}x{s} {dtype}", impl=impl,
                nbytes=_nbytes(x, w, 2), device=DEVICE)


@_params
def test_add_rms_norm_forward(measure, impl, b, s, model, hidden, dtype):
    fn = ADD[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    x, r, w = _inputs(b, s, hidden, dtype)
    with torch.no_grad():
        measure(lambda: fn(x, r, w, EPS), group=f"add_rms_norm fwd {model} {b}x{s} {dtype}", impl=impl,
                nbytes=_nbytes(x, w, 4), device=DEVICE)


@_params
def test_rms_norm_backward(measure, impl, b, s, model, hidden, dtype):
    fn = RMS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    x, _, w = _inputs(b, s, hidden, dtype, grad=True)
    y = fn(x, w, EPS)
    dy = torch.randn_like(y)

    def step():
        return torch.autograd.grad(y, (x, w), dy, retain_graph=True)

    measure(step, group=f"rms_norm bwd {model} {b}x{s} {dtype}", impl=impl, nbytes=_nbytes(x, w, 3), device=DEVICE)


@_params
def test_add_rms_norm_backward(measure, impl, b, s, model, hidden, dtype):
    fn = ADD[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    x, r, w = _inputs(b, s, hidden, dtype, grad=True)
    y, h = fn(x, r, w, EPS)
    dy, dh = torch.randn_like(y), torch.randn_like(h)

    def step():
        return torch.autograd.grad((y, h), (x, r, w), (dy, dh), retain_graph=True)

    measure(step, group=f"add_rms_norm bwd {model} {b}x{s} {dtype}", impl=impl, nbytes=_nbytes(x, w, 4),
            device=DEVICE)
