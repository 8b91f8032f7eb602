"""SwiGLU forward and backward against PyTorch eager and torch.compile of the reference.

    pytest benchmarks/bench_swiglu.py --benchmark-only
"""
import pytest
import torch

from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import compiled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (model, intermediate size) x (batch, tokens)
SHAPES = [("2.4b", 7168), ("7.8b", 14336)]
TOKENS = [(1, 2048), (8, 512)]
_compiled_fwd = compiled(reference.swiglu)


def _inputs(inter, b, s, dtype, grad=False):
    g = torch.randn(b, s, inter, dtype=dtype, device=DEVICE, requires_grad=grad)
    u = torch.randn(b, s, inter, dtype=dtype, device=DEVICE, requires_grad=grad)
    return g, u


IMPLS = {"exaone_ext": ops.swiglu, "eager": reference.swiglu, "compile": _compiled_fwd}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,s", TOKENS)
@pytest.mark.parametrize("model,inter", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_swiglu_forward(measure, impl, b, s, model, inter, dtype):
    fn = IMPLS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    g, u = _inputs(inter, b, s, dtype)
    nbytes = 3 * g.numel() * g.element_size()  # read gate, up; write out
    with torch.no_grad():
        measure(lambda: fn(g, u), group=f"swiglu fwd {model} {b}x{s} {dtype}", impl=impl, nbytes=nbytes, device=DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,s", TOKENS)
@pytest.mark.parametrize("model,inter", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_swiglu_backward(measure, impl, b, s, model, inter, dtype):
    fn = IMPLS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    g, u = _inputs(inter, b, s, dtype, grad=True)
    out = fn(g, u)
    dy = torch.randn_like(out)
    nbytes = 5 * g.numel() * g.element_size()  # read gate, up, dy; write dgate, dup

    def step():
        return torch.autograd.grad(out, (g, u), dy, retain_graph=True)

    measure(step, group=f"swiglu bwd {model} {b}x{s} {dtype}", impl=impl, nbytes=nbytes, device=DEVICE)
