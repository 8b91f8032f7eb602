"""Flash attention on a CUDA device: forward and backward TFLOP/s at EXAONE 3.5 shapes against
torch.nn.functional.scaled_dot_product_attention (enable_gqa=True), and KV-cache decode as a
fraction of the copy bandwidth. FLOPs as flash-attention counts them: forward 4 * b * sq * sk * h * d,
halved when causal; backward 2.5x the forward. Skipped without a CUDA device.

    pytest benchmarks/bench_attention_cuda.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from exaone_ext import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
MODELS = {"2.4b": (32, 8, 80), "7.8b": (32, 8, 128)}  # q heads, kv heads, head dim
SEQS = [512, 2048, 8192]
TOKENS = 16384  # batch = TOKENS // seq


def _sdpa(q, k, v, causal):
    # SDPA wants [b, h, s, d]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2)


IMPLS = {"exaone_ext": lambda q, k, v, c: ops.flash_attn(q, k, v, causal=c), "sdpa": _sdpa}


def _inputs(model, seq, dtype, grad=False):
    hq, hk, d = MODELS[model]
    b = max(1, TOKENS // seq)
    mk = lambda h: torch.randn(b, seq, h, d, device=DEVICE, dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(hq), mk(hk), mk(hk)


def _flops(q, causal):
    b, s, h, d = q.shape
    return 4 * b * s * s * h * d / (2 if causal else 1)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("model", list(MODELS))
def test_attention_forward_cuda(measure, impl, causal, seq, model):
    q, k, v = _inputs(model, seq, torch.bfloat16)
    fn = IMPLS[impl]
    with torch.no_grad():
        measure(lambda: fn(q, k, v, causal), group=f"attn fwd cuda {model} s{seq} {'causal' if causal else 'full'}",
                impl=impl, flops=_flops(q, causal), device=DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("model", list(MODELS))
def test_attention_backward_cuda(measure, impl, seq, model):
    q, k, v = _inputs(model, seq, torch.bfloat16, grad=True)
    out = IMPLS[impl](q, k, v, True)
    dout = torch.randn_like(out)

    def step():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    measure(step, group=f"attn bwd cuda {model} s{seq} causal", impl=impl, flops=2.5 * _flops(q, True), device=DEVICE)


@pytest.mark.parametrize("impl", ["exaone_ext", "sdpa"])
@pytest.mark.parametrize("cache_len", [4096, 32768])
@pytest.mark.parametrize("model", list(MODELS))
def test_attention_decode_cuda(measure, impl, cache_len, model):
    """One token per sequence against a full cache: bytes = the K and V read (the rest is negligible)."""
    hq, hk, d = MODELS[model]
    b = 1 if cache_len >= 32768 else 8
    q = torch.randn(b, 1, hq, d, device=DEVICE, dtype=torch.bfloat16)
    k_cache = torch.randn(b, cache_len, hk, d, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((b,), cache_len, dtype=torch.int32, device=DEVICE)
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    if impl == "exaone_ext":
        fn = lambda: ops.flash_attn_with_kvcache(q, k_cache, v_cache, lens)  # noqa: E731
    else:
        fn = lambda: _sdpa(q, k_cache, v_cache, False)  # noqa: E731
    with torch.no_grad():
        measure(fn, group=f"attn decode cuda {model} cache{cache_len} b{b}", impl=impl, nbytes=nbytes, device=DEVICE)
