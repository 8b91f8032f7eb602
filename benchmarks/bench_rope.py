"""RoPE (fused q/k rotation) forward and backward against PyTorch eager and torch.compile of the
reference, at EXAONE shapes, with llama3 tables and positions spread over the 32K context.

    pytest benchmarks/bench_rope.py --benchmark-only
"""
import pytest
import torch

from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import compiled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
MAX_POS = 32768
# (model, q heads, kv heads, head dim) x (batch, tokens)
SHAPES = [("2.4b", 32, 8, 80), ("7.8b", 32, 8, 128)]
TOKENS = [(1, 2048), (8, 512)]
IMPLS = {"exaone_ext": ops.apply_rope, "eager": reference.apply_rope, "compile": compiled(reference.apply_rope)}


def _inputs(b, s, hq, hk, d, dtype, grad=False):
    q = torch.randn(b, s, hq, d, device=DEVICE).to(dtype).requires_grad_(grad)
    k = torch.randn(b, s, hk, d, device=DEVICE).to(dtype).requires_grad_(grad)
    cos, sin = ops.rope_cos_sin(d, MAX_POS, 1e6, LLAMA3, device=DEVICE)
    pos = (torch.randint(0, MAX_POS - s, (b, 1)) + torch.arange(s)).to(DEVICE)  # a run at a random offset
    return q, k, cos, sin, pos


def _bytes(q, k, d):
    # q and k read and written, plus the two float32 table rows of each token
    tokens = q.shape[0] * q.shape[1]
    return 2 * (q.numel() + k.numel()) * q.element_size() + tokens * d * 4


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,s", TOKENS)
@pytest.mark.parametrize("model,hq,hk,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_rope_forward(measure, impl, b, s, model, hq, hk, d, dtype):
    fn = IMPLS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    q, k, cos, sin, pos = _inputs(b, s, hq, hk, d, dtype)
    with torch.no_grad():
        measure(lambda: fn(q, k, cos, sin, pos), group=f"rope fwd {model} {b}x{s} {dtype}", impl=impl,
                nbytes=_bytes(q, k, d), device=DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,s", TOKENS)
@pytest.mark.parametrize("model,hq,hk,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_rope_backward(measure, impl, b, s, model, hq, hk, d, dtype):
    fn = IMPLS[impl]
    if fn is None:
        pytest.skip("torch.compile unavailable")
    q, k, cos, sin, pos = _inputs(b, s, hq, hk, d, dtype, grad=True)
    q_out, k_out = fn(q, k, cos, sin, pos)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)

    def step():
        return torch.autograd.grad((q_out, k_out), (q, k), (dq, dk), retain_graph=True)

    measure(step, group=f"rope bwd {model} {b}x{s} {dtype}", impl=impl, nbytes=_bytes(q, k, d), device=DEVICE)
