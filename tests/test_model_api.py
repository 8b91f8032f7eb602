"""The model's module structure as other code builds on it: per-block forward (activation
checkpointing), hidden-state output, Linear modules that can be replaced, loading the tensors a
module declares, parameter shapes from the config, RoPE tables kept float32 across moves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from exaone_ext.model import (CheckpointError, ExaoneConfig, ExaoneForCausalLM, KVCache, LayerKVCache, Linear,
                              linear_group)

CONFIG = dict(vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False)


def make_model(use_kernels=True, **overrides) -> ExaoneForCausalLM:
    torch.manual_seed(0)
    model = ExaoneForCausalLM(ExaoneConfig(**{**CONFIG, **overrides}), use_kernels=use_kernels)
    model.reset_parameters(0.1)
    return model.eval()


class Int8Linear(nn.Module):
    """A stand-in for a quantized projection: int8 weight and per-row scale buffers, forward(x)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scale = weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x @ (self.qweight.to(x.dtype) * self.scale).T


@torch.no_grad()
def test_return_hidden_is_the_normed_state_before_the_head():
    model = make_model()
    ids = torch.randint(0, 256, (2, 9))
    hidden = model(ids, return_hidden=True)
    assert hidden.shape == (2, 9, 128) and hidden.dtype == model.lm_head.weight.dtype
    torch.testing.assert_close((hidden @ model.lm_head.weight.T).float(), model(ids), rtol=1e-5, atol=1e-5)
    last = model(ids, return_hidden=True, num_logits_to_keep=2)
    torch.testing.assert_close(last, hidden[:, -2:], rtol=0, atol=0)


def test_blocks_are_modules_activation_checkpointing_per_block():
    """Block.forward(h, ctx) reads only its own weights: checkpointing each block gives the same
    loss and gradients as the plain forward."""
    from torch.utils.checkpoint import checkpoint

    model = make_model()
    ids = torch.randint(0, 256, (2, 10))
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    for block in model.transformer.h:
        real = block.forward
        block.forward = (lambda real: lambda h, ctx: (calls.append(1), checkpoint(real, h, ctx, use_reentrant=False))[1])(real)
    loss2 = model(ids).logsumexp(-1).mean()
    loss2.backward()
    assert len(calls) == 2 and torch.equal(loss, loss2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_a_projection_can_be_replaced_by_another_module():
    model = make_model()
    ids = torch.randint(0, 256, (1, 7))
    attn = model.transformer.h[0].attn.attention
    q = Int8Linear(attn.q_proj.weight)
    deq = Linear(128, 128)          # the same model with the dequantized q weight in a plain Linear
    deq.weight.copy_(q.qweight.float() * q.scale)
    attn.q_proj = deq
    expected = model(ids)
    attn.q_proj = q                 # linear_group now calls each projection in turn
    out = model(ids)
    assert q.calls == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 128)
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    torch.testing.assert_close(linear_group(x, mods, model_ops(model)), torch.cat([m(x) for m in mods], -1))


def model_ops(model):
    from exaone_ext.model.modeling import ops_for
    return ops_for(model.use_kernels, model.config.head_dim)


def test_use_kernels_reaches_every_layer():
    model = make_model(use_kernels=False)
    layers = [m for m in model.modules() if hasattr(m, "use_kernels") and m is not model]
    assert layers and not any(m.use_kernels for m in layers)
    model.use_kernels = True
    assert all(m.use_kernels for m in layers)


def test_loader_fills_the_tensors_modules_declare(tmp_path):
    """A checkpoint holding a quantized projection (int8 + scale) loads into a model whose module
    declares those tensors; the plain model refuses the int8 tensor where it expects a float."""
    from safetensors.torch import save_file

    model = make_model()
    model.save_pretrained(tmp_path / "ck")
    name = "transformer.h.1.mlp.c_proj"
    q = Int8Linear(model.get_submodule(name).weight.detach())
    state = {k: v for k, v in model.state_dict().items() if k != name + ".weight"}
    state.update({name + ".qweight": q.qweight, name + ".scale": q.scale})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ck" / "model.safetensors"))

    with torch.device("meta"):
        quant = ExaoneForCausalLM(model.config)
    parent, _, attr = name.rpartition(".")
    with torch.device("meta"):
        setattr(quant.get_submodule(parent), attr, Int8Linear(torch.ones(128, 96)))
    from exaone_ext.model.checkpoint import load_model
    load_model(quant, tmp_path / "ck", dtype=torch.bfloat16)
    got = quant.get_submodule(name)
    assert got.qweight.dtype == torch.int8 and torch.equal(got.qweight, q.qweight)  # not cast to bfloat16
    assert got.scale.dtype == torch.bfloat16 and quant.transformer.wte.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(quant(ids)).all()

    bad = dict(model.state_dict())
    bad[name + ".weight"] = torch.zeros(128, 96, dtype=torch.int8)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}.weight' has dtype torch.int8, expected a float type"):
        ExaoneForCausalLM.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("preset", ["2.4b", "7.8b"])
def test_config_states_the_parameter_shapes(preset):
    config = ExaoneConfig.preset(preset, num_layers=2)
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    assert config.parameter_shapes() == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_rope_tables_stay_float32_where_the_model_goes():
    model = make_model()
    table = model.rope_cos.clone()
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, table)
    model.to_empty(device="cpu")  # fresh storage for everything: the tables are rebuilt, not garbage
    assert torch.equal(model.rope_cos, table)


@torch.no_grad()
def test_layer_cache_objects():
    model = make_model()
    cache = KVCache(model.config, 2, 16, torch.float32)
    assert all(isinstance(layer, LayerKVCache) for layer in cache.layers)
    layer = cache.layers[0]
    k, v = layer
    assert k is layer.k and v is layer.v and k.shape == (2, 16, 1, 64)
    rows, pos = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    new = torch.randn(3, 1, 64)
    layer.write_packed(new, -new, rows, pos)
    assert torch.equal(k[0, :2], new[:2]) and torch.equal(v[1, 0], -new[2])
    with pytest.raises(TypeError):
        layer[0]


@torch.no_grad()
def test_packed_max_seqlen_given_or_read():
    model = make_model()
    lengths = [5, 3, 8]
    ids = torch.randint(0, 256, (sum(lengths),))
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    ref = model(ids, cu_seqlens=cu)
    torch.testing.assert_close(model(ids, cu_seqlens=cu, max_seqlen=8), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seqlen = 4 is below the longest document"):
        model(ids, cu_seqlens=cu, max_seqlen=4)
    with pytest.raises(TypeError, match="max_seqlen must be"):
        model(ids, cu_seqlens=cu, max_seqlen=8.0)
