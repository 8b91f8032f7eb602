"""Grouped-query flash attention against torch.nn.functional.scaled_dot_product_attention
(enable_gqa=True) in the same run, at EXAONE 3.5 shapes.

    pytest benchmarks/bench_attention.py --benchmark-only --benchmark-min-rounds=3 -q
    EXAONE_BENCH_LONG=1 pytest ...   # adds seq 8192 (slow on a small CPU)

TFLOP/s as flash-attention counts them: forward 4 * b * sq * sk * h * d, halved for causal;
backward 2.5x the forward. Decode (one new token against a 32K-token cache) reports the K/V read
rate in GB/s beside the copy bandwidth measured in the same run.
SDPA gets its preferred contiguous [batch, heads, seq, head_dim] layout.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from exaone_ext import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = [("2.4b", 32, 8, 80), ("7.8b", 32, 8, 128)]  # (name, q heads, kv heads, head dim)
SEQS = [512, 2048] + ([8192] if os.environ.get("EXAONE_BENCH_LONG") else [])
DTYPES = [torch.bfloat16, torch.float32]
IMPLS = ["exaone_ext", "sdpa"]


def _inputs(b, s, hq, hk, d, dtype, grad=False):
    q = torch.randn(b, s, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    ours = [x.requires_grad_(grad) for x in (q, k, v)]
    theirs = [x.detach().transpose(1, 2).contiguous().requires_grad_(grad) for x in (q, k, v)]
    return ours, theirs


def _flops(b, s, h, d, causal):
    return 4 * b * s * s * h * d / (2 if causal else 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("model,hq,hk,d", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_attention_forward(measure, impl, s, model, hq, hk, d, dtype):
    (q, k, v), (qt, kt, vt) = _inputs(1, s, hq, hk, d, dtype)
    if impl == "exaone_ext":
        fn = lambda: ops.flash_attn(q, k, v, causal=True)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
    with torch.no_grad():
        measure(fn, group=f"attn fwd causal {model} seq {s} {dtype}", impl=impl,
                flops=_flops(1, s, hq, d, True), device=DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("model,hq,hk,d", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_attention_backward(measure, impl, s, model, hq, hk, d, dtype):
    (q, k, v), (qt, kt, vt) = _inputs(1, s, hq, hk, d, dtype, grad=True)
    if impl == "exaone_ext":
        leaves, out = (q, k, v), ops.flash_attn(q, k, v, causal=True)
    else:
        leaves, out = (qt, kt, vt), F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    dout = torch.randn_like(out)
    measure(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
            group=f"attn bwd causal {model} seq {s} {dtype}", impl=impl,
            flops=2.5 * _flops(1, s, hq, d, True), device=DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,hq,hk,d", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_attention_decode(measure, impl, model, hq, hk, d, dtype):
    b, ctx = 1, 32768
    k_cache = torch.randn(b, ctx, hk, d, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(b, ctx, hk, d, dtype=dtype, device=DEVICE)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, 1, hq, d, dtype=dtype, device=DEVICE)
    nbytes = 2 * k_cache.numel() * k_cache.element_size()  # K and V read once
    if impl == "exaone_ext":
        fn = lambda: ops.flash_attn_with_kvcache(q, k_cache, v_cache, lens, causal=True)  # noqa: E731
    else:
        kt, vt = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
        qt = q.transpose(1, 2).contiguous()
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=False, enable_gqa=True)  # noqa: E731
    with torch.no_grad():
        measure(fn, group=f"attn decode {model} ctx {ctx} {dtype}", impl=impl, nbytes=nbytes,
                flops=_flops(b, 1, hq, d, False) * ctx, device=DEVICE)
