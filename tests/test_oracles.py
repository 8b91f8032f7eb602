"""The ops and the model held against oracles that are not this package's own code: PyTorch's
building blocks (F.rms_norm, F.silu, the math backend of F.scaled_dot_product_attention, all in
float64), transformers' llama3 RoPE frequencies and transformers' LlamaForCausalLM. The other op
tests use exaone_ext.ops.reference as the float64 oracle, which is also the runtime fallback; here
the reference itself is checked against them too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from exaone_ext import ops
from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM, convert_checkpoint
from exaone_ext.ops import reference
from conftest import DTYPES, assert_error_within

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [80, 2560])
def test_rms_norm_against_torch(dtype, hidden):
    x = (2 * torch.randn(33, hidden)).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden)).to(dtype)
    oracle = F.rms_norm(x.double(), (hidden,), w.double(), eps=1e-5)
    torch.testing.assert_close(reference.rms_norm(x.double(), w.double()), oracle, rtol=1e-13, atol=1e-13)
    # bfloat16 / float16: the definition rounds the normalised value to the dtype before the weight
    rounds = 1 if dtype == torch.float32 else 2
    assert_error_within(ops.rms_norm(x, w), oracle, name="rms_norm", k=hidden, roundings=rounds)
    r = torch.randn(33, hidden).to(dtype)
    y, h = ops.add_rms_norm(x, r, w)
    assert torch.equal(h, x + r)
    assert_error_within(y, F.rms_norm(h.double(), (hidden,), w.double(), eps=1e-5), name="add_rms_norm", k=hidden,
                        roundings=rounds)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_against_torch(dtype):
    g, u = (3 * torch.randn(17, 300)).to(dtype), torch.randn(17, 300).to(dtype)
    oracle = F.silu(g.double()) * u.double()
    torch.testing.assert_close(reference.swiglu(g.double(), u.double()), oracle, rtol=1e-14, atol=1e-14)
    assert_error_within(ops.swiglu(g, u), oracle, name="swiglu")
    assert_error_within(ops.swiglu(torch.cat([g, u], -1)), oracle, name="swiglu fused")


def _sdpa64(q, k, v, causal):
    """F.scaled_dot_product_attention's math backend in float64 on [b, s, h, d] tensors (kv heads
    repeated for GQA). Causal is aligned to the end of the keys, as flash attention has it."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = None
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,hq,hk,d,causal", [(37, 37, 8, 2, 80, True), (17, 97, 4, 1, 128, True),
                                                  (64, 64, 4, 4, 64, False)])
def test_attention_against_torch_sdpa(dtype, sq, sk, hq, hk, d, causal):
    q, k, v = (torch.randn(2, s, h, d).to(dtype) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    oracle = _sdpa64(q, k, v, causal)
    torch.testing.assert_close(reference.flash_attn(q.double(), k.double(), v.double(), causal=causal), oracle,
                               rtol=1e-12, atol=1e-12)
    assert_error_within(ops.flash_attn(q, k, v, causal=causal), oracle, name="flash_attn", k=sk)
    # the same keys in a cache: the decode / chunked prefill kernel
    cache_k, cache_v = torch.zeros(2, sk + 3, hk, d, dtype=dtype), torch.zeros(2, sk + 3, hk, d, dtype=dtype)
    cache_k[:, :sk - sq], cache_v[:, :sk - sq] = k[:, :sk - sq], v[:, :sk - sq]
    lens = torch.full((2,), sk - sq, dtype=torch.int32)
    out = ops.flash_attn_with_kvcache(q, cache_k, cache_v, lens, k[:, sk - sq:], v[:, sk - sq:], causal=causal)
    assert_error_within(out, oracle, name="flash_attn_with_kvcache", k=sk)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_rope_frequencies_against_transformers(head_dim, scaling):
    """Our float64 inverse frequencies against transformers' (computed in float32), and our cos/sin
    tables against cos/sin of the positions times transformers' frequencies."""
    theta = 1e6
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=32768, rope_parameters=params)
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        init = LlamaRotaryEmbedding.compute_default_rope_parameters
    else:
        init = ROPE_INIT_FUNCTIONS["llama3"]
    inv_hf, attention_factor = init(config, device="cpu")
    assert attention_factor == 1.0
    ours = reference.rope_inv_freq(head_dim, theta, scaling)
    assert ours.dtype == torch.float64 and ours.shape == inv_hf.shape
    torch.testing.assert_close(ours, inv_hf.double(), rtol=1e-6, atol=0)  # a few float32 roundings in theirs
    positions = 700
    cos, sin = ops.rope_cos_sin(head_dim, positions, theta, scaling)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_hf.double()
    # their float32 frequencies move the angle by at most position * 1e-6 * freq
    tol = positions * 1e-6 + 1e-6
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=tol)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=tol)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Our model (kernels on) and transformers' LlamaForCausalLM with the same weights, the Llama side
    loaded from our checkpoint renamed by our converter."""
    config = ExaoneConfig(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=320, tie_word_embeddings=False, rope_scaling=LLAMA3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ours = ExaoneForCausalLM(config, use_kernels=True)
        ours.reset_parameters(0.1)
    d = tmp_path_factory.mktemp("oracle")
    ours.save_pretrained(d / "exaone")
    convert_checkpoint(d / "exaone", d / "llama", to="llama")
    return ours.eval(), d / "llama"


@torch.no_grad()
def test_kernel_model_in_bf16_against_transformers(llama_pair):
    """bf16 logits of our kernel path and of transformers' Llama in bf16, both against transformers'
    Llama in float64: ours within 2x theirs (both dominated by the rounding of bf16 activations and
    weights, which is the same on every machine)."""
    ours, llama_dir = llama_pair
    hf64 = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    hf16 = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 29))
    oracle = hf64(ids).logits
    theirs = (hf16(ids).logits.double() - oracle).abs().max().item()
    model = ExaoneForCausalLM(ours.config, use_kernels=True)
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16).eval()
    logits = model(ids)
    err = (logits.double() - oracle).abs().max().item()
    assert err <= 2 * theirs + 1e-3 * oracle.abs().max().item(), (err, theirs)
    # and in float32, ours (kernels) within float32 accumulation of transformers in float64
    err32 = (ours(ids).double() - oracle).abs().max().item()
    assert err32 <= 1e-4 * oracle.abs().max().item(), err32
