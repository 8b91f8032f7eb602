"""ops.decode_layers (every decoder layer against a KV cache in one call, CPU) against its reference,
and the model's one-call path against its Python blocks: bit for bit, taken when it may be and only then."""
import copy

import pytest
import torch
from torch import nn

from exaone_ext import ops
from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM, KVCache
from exaone_ext.model import modeling
from exaone_ext.model.layers import Linear
from exaone_ext.model.quant import QuantLinear
from exaone_ext.ops import reference

HQ, HK, HD, D, FF = 4, 2, 64, 128, 256


def _layer_weights(kind, dtype, gen):
    """ln_1, ln_2 and the four projection groups of one layer in `kind` (dense / int8 / int4), with
    their layout entries."""
    def w(n, k):
        return torch.randn(n, k, generator=gen) / k ** 0.5
    groups = ([w(HQ * HD, D), w(HK * HD, D), w(HK * HD, D)], [w(D, HQ * HD)], [w(FF, D), w(FF, D)], [w(D, FF)])
    tensors = [1 + 0.1 * torch.randn(D, generator=gen, dtype=torch.float32).to(dtype),
               1 + 0.1 * torch.randn(D, generator=gen, dtype=torch.float32).to(dtype)]
    layout = []
    for ws in groups:
        if kind == "dense":
            tensors += [x.to(dtype) for x in ws]
            layout += [0, len(ws), 0]
        elif kind == "int8":
            qs = [reference.quantize_int8(x) for x in ws]
            tensors += [q for q, _ in qs] + [s.to(dtype) for _, s in qs]
            layout += [8, len(ws), 0]
        else:
            qs = [reference.quantize_int4(x, 64) for x in ws]
            tensors += [q for q, _, _ in qs] + [s.to(dtype) for _, s, _ in qs] + [z for _, _, z in qs]
            layout += [4, len(ws), 64]
    return tensors, layout


def _call(fn, h, weights, layout, caches, seqlens, cos, sin, pos_max=None):
    b, s = h.shape[:2]
    positions = seqlens[:, None].long() + torch.arange(s)
    return fn(h, weights, layout, [1e-5, 1e-6] * len(caches[0]), caches[0], caches[1], seqlens, int(seqlens.max()),
              cos, sin, positions, pos_max, HQ, HK, HD ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [1, 3])
def test_op_matches_reference(dtype, s):
    """Three layers (dense, int8, int4 projections), two rows holding different numbers of tokens:
    the op against the reference ops composed, in the output and in every cache written."""
    gen = torch.Generator().manual_seed(0)
    weights, layout = [], []
    for kind in ("dense", "int8", "int4"):
        t, lay = _layer_weights(kind, dtype, gen)
        weights += t
        layout += lay
    b, max_seq = 2, 40
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    k_caches = [torch.randn(b, max_seq, HK, HD, generator=gen).to(dtype) for _ in range(3)]
    v_caches = [torch.randn(b, max_seq, HK, HD, generator=gen).to(dtype) for _ in range(3)]
    cos, sin = ops.rope_cos_sin(HD, 64, 1e6)
    h = torch.randn(b, s, D, generator=gen).to(dtype)
    kc, vc = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    got = _call(ops.decode_layers, h, weights, layout, (kc, vc), seqlens, cos, sin, pos_max=int(seqlens.max()) + s - 1)
    # the reference composes the reference ops in float64 (weights and caches widened)
    wd = [x.double() if x.is_floating_point() else x for x in weights]
    rk, rv = [c.double() for c in k_caches], [c.double() for c in v_caches]
    want = _call(reference.decode_layers, h.double(), wd, layout, (rk, rv), seqlens, cos, sin)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert got.shape == h.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double(), **tol)
    for a, r, before in zip(kc + vc, rk + rv, k_caches + v_caches):
        torch.testing.assert_close(a.double(), r.double(), **tol)
        assert not torch.equal(a, before)            # the new keys / values were written


@pytest.mark.parametrize("case", ["last-dim stride 2", "seq stride 2", "weight view at an offset", "no new tokens",
                                  "nan"])
def test_op_odd_but_legal_inputs_match_reference(case):
    """Strided h, a weight that is a view into a larger tensor, zero new tokens, NaN: as the reference."""
    gen = torch.Generator().manual_seed(2)
    weights, layout = _layer_weights("int8", torch.float32, gen)
    h = torch.randn(2, 2, D, generator=gen)
    if case == "last-dim stride 2":
        h = torch.randn(2, 2, 2 * D, generator=gen)[..., ::2]
    elif case == "seq stride 2":
        h = torch.randn(2, 4, D, generator=gen)[:, ::2]
    elif case == "weight view at an offset":
        big = torch.randn(3, *weights[0].shape, generator=gen)
        big[1] = weights[0]
        weights[0] = big[1]                                    # ln_1's weight at a storage offset
        bigq = torch.zeros(weights[2].shape[0] + 5, weights[2].shape[1], dtype=weights[2].dtype)
        bigq[5:] = weights[2]
        weights[2] = bigq[5:]                                  # q_proj's int8 rows at an offset
    elif case == "no new tokens":
        h = torch.randn(2, 0, D, generator=gen)
    else:
        h[1, 0, 7] = float("nan")
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    caches = [[torch.randn(2, 16, HK, HD, generator=gen)], [torch.randn(2, 16, HK, HD, generator=gen)]]
    cos, sin = ops.rope_cos_sin(HD, 64, 1e6)
    got_caches = [[c.clone() for c in cs] for cs in caches]
    got = _call(ops.decode_layers, h, weights, layout, got_caches, seqlens, cos, sin)
    want_caches = [[c.clone() for c in cs] for cs in caches]
    want = _call(reference.decode_layers, h, weights, layout, want_caches, seqlens, cos, sin)
    assert got.shape == h.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4, equal_nan=True)
    if case == "nan":
        assert got[1].isnan().all() and not got[0].isnan().any()   # the NaN row's own tokens only
    for a, b in zip(got_caches[0] + got_caches[1], want_caches[0] + want_caches[1]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, equal_nan=True)


def test_op_rejects_bad_layout_before_writing():
    gen = torch.Generator().manual_seed(1)
    weights, layout = _layer_weights("dense", torch.float32, gen)
    kc, vc = [torch.zeros(1, 8, HK, HD)], [torch.zeros(1, 8, HK, HD)]
    cos, sin = ops.rope_cos_sin(HD, 16, 1e6)
    h = torch.randn(1, 1, D)
    seqlens = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="'layout' must hold 12 ints per layer"):
        _call(ops.decode_layers, h, weights, layout[:-3], (kc, vc), seqlens, cos, sin)
    with pytest.raises(ValueError, match="'layout' describes 9 weight tensors, 'weights' holds 8"):
        _call(ops.decode_layers, h, weights[:-1], layout, (kc, vc), seqlens, cos, sin)
    bad = list(layout)
    bad[3] = 5
    with pytest.raises(ValueError, match="kind must be 0 \\(dense\\), 8 \\(int8\\) or 4 \\(int4\\), got 5"):
        _call(ops.decode_layers, h, weights, bad, (kc, vc), seqlens, cos, sin)
    with pytest.raises(ValueError, match="'h' must be \\[batch, seq, hidden\\]"):
        _call(ops.decode_layers, h[0], weights, layout, (kc, vc), seqlens, cos, sin)
    with pytest.raises(ValueError, match="linear"):   # a weight of the wrong width: the projection's own check
        w2 = list(weights)
        w2[2] = w2[2][:, :-1]
        _call(ops.decode_layers, h, w2, layout, (kc, vc), seqlens, cos, sin)
    assert not kc[0].any() and not vc[0].any()


# ---- the model's one-call path ----------------------------------------------------------------------

CFG = ExaoneConfig(vocab_size=300, hidden_size=128, num_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, intermediate_size=256, max_position_embeddings=256)


def _model(fmt="bf16", seed=0):
    torch.manual_seed(seed)
    m = ExaoneForCausalLM(copy.deepcopy(CFG)).to(torch.bfloat16).eval()   # quantize() writes into the config
    if fmt != "bf16":
        m.quantize(fmt, group_size=64)
    return m


@pytest.fixture
def calls(monkeypatch):
    """How many forwards went through ops.decode_layers."""
    n = [0]
    real = modeling._KERNEL_OPS.decode_layers

    def counting(*args):
        n[0] += 1
        return real(*args)
    monkeypatch.setattr(modeling._KERNEL_OPS, "decode_layers", counting)
    return n


def _decode(model, steps=4, batch=2, chunk=1):
    """Prefill, `steps` forwards of `chunk` tokens per row; (logits of each, the caches)."""
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(CFG, batch, 64, torch.bfloat16)
    with torch.inference_mode():
        model(torch.randint(0, 300, (batch, 7), generator=gen), kv_cache=cache)
        outs = [model(torch.randint(0, 300, (batch, chunk), generator=gen), kv_cache=cache) for _ in range(steps)]
    return torch.stack(outs), cache


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_model_one_call_is_bitwise_the_python_blocks(fmt, chunk, calls):
    model = _model(fmt)
    fused, fused_cache = _decode(model, chunk=chunk)
    assert calls[0] == 5                          # the prefill too: a forward against a cache
    model.cpu_fused_layers = False
    plain, plain_cache = _decode(model, chunk=chunk)
    assert calls[0] == 5
    assert torch.equal(fused, plain)
    for a, b in zip(fused_cache.layers, plain_cache.layers):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert torch.equal(fused_cache.seqlens, plain_cache.seqlens)


def test_model_takes_python_blocks_when_asked_to(calls):
    """A hook, a replaced or patched module, gradients, the references, autocast: the Python blocks,
    whose behaviour is what each of those asks for."""
    model = _model()
    want, _ = _decode(model)
    assert calls[0] == 5
    seen = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    got, _ = _decode(model)
    assert calls[0] == 5 and len(seen) == 5 and torch.equal(got, want)
    handle.remove()
    _decode(model)
    assert calls[0] == 10                         # the hook gone: one call again

    class Scaled(nn.Module):                      # a replaced projection (an adapter, say)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)
    attn = model.transformer.h[0].attn.attention
    original = attn.v_proj
    attn.v_proj = Scaled(original)
    changed, _ = _decode(model)
    assert calls[0] == 10 and not torch.equal(changed, want)
    attn.v_proj = original
    assert torch.equal(_decode(model)[0], want) and calls[0] == 15

    attn.forward = lambda *a, **k: modeling.Attention.forward(attn, *a, **k)   # an instance's forward patched
    _decode(model)
    assert calls[0] == 15
    del attn.forward
    _decode(model)
    assert calls[0] == 20

    model.use_kernels = False                     # the references
    _decode(model)
    assert calls[0] == 20
    model.use_kernels = True

    cache = KVCache(CFG, 1, 16, torch.bfloat16)   # gradients recorded
    model(torch.randint(0, 300, (1, 3)), kv_cache=cache)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 300, (1, 1)), kv_cache=cache)
    assert calls[0] == 20


def test_model_plans_again_after_a_change(calls):
    """quantize() replaces every projection, and a copy is another model: each is planned anew."""
    model = _model()
    _decode(model)
    model.quantize("int8")
    got, _ = _decode(model)
    assert calls[0] == 10
    model.cpu_fused_layers = False
    want, _ = _decode(model)
    assert torch.equal(got, want)
    twin = copy.deepcopy(model)
    twin.cpu_fused_layers = True
    twin.transformer.h[2].mlp.c_proj = Linear(CFG.intermediate_size, CFG.hidden_size, dtype=torch.bfloat16)
    assert isinstance(model.transformer.h[2].mlp.c_proj, QuantLinear)
    out, _ = _decode(twin)
    assert calls[0] == 15 and not torch.equal(out, want)
