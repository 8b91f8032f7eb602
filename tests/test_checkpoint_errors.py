"""Checkpoint paths test_checkpoint.py does not reach: a checkpoint written by transformers' own
save_pretrained, from_pretrained(device=...), and the remaining load, save and convert errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from exaone_ext.model import CheckpointError, ExaoneConfig, ExaoneForCausalLM, convert_checkpoint
from test_checkpoint import SMALL, make_model, same_weights, shards


@pytest.fixture
def saved(tmp_path):
    make_model(False).save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    make_model(True).save_pretrained(tmp_path / "single")
    return tmp_path


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@torch.no_grad()
def test_checkpoint_saved_by_transformers_loads_and_matches(tmp_path):
    """LlamaForCausalLM.save_pretrained (transformers' own writer, config and file layout) loads into
    our model with the same weights and the same logits."""
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=160, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=80, intermediate_size=96,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(config).eval()
    for p in hf.parameters():
        p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    ours = ExaoneForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert ours.loaded_naming == "llama" and ours.config.num_layers == 2 and ours.config.head_dim == 80
    ids = torch.randint(0, 384, (2, 19))
    ref = hf(ids).logits
    err = ((ours(ids) - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err


def test_from_pretrained_device_and_dtype(saved):
    model = ExaoneForCausalLM.from_pretrained(saved / "single", device="cpu", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.rope_cos.device.type == "cpu"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = ExaoneForCausalLM.from_pretrained(saved / "single", dtype=torch.float32).to(torch.bfloat16)
    assert same_weights(model, ref)
    meta = ExaoneForCausalLM.from_pretrained(saved / "single", device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    with pytest.raises((ValueError, RuntimeError, TypeError), match="device"):
        ExaoneForCausalLM.from_pretrained(saved / "single", device="no-such-device")


def test_error_mixed_namings(saved):
    _rewrite(saved / "single" / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(160)}))
    with pytest.raises(CheckpointError, match=r"mixes EXAONE \('transformer\.\*'\) and Llama \('model\.\*'\)"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


@pytest.mark.parametrize("index_text", ["{not json", '{"metadata": {}}', '{"weight_map": 3}', '{"weight_map": {"a": 1}}'],
                         ids=["json", "no_weight_map", "weight_map_not_a_dict", "file_not_a_string"])
def test_error_malformed_index(saved, index_text):
    (saved / "sharded" / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        ExaoneForCausalLM.from_pretrained(saved / "sharded")


def test_error_tensor_in_another_shard_than_the_index_says(saved):
    d = saved / "sharded"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first, second = shards(d)[:2]
    name = next(k for k, f in index["weight_map"].items() if f == first)
    moved = load_file(d / first)[name]
    _rewrite(d / first, lambda t: t.pop(name))
    _rewrite(d / second, lambda t: t.update({name: moved}))
    with pytest.raises(CheckpointError, match=f"{second}: tensor '{name}' is not where .* says \\('{first}'\\)"):
        ExaoneForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_error_non_float_tensor(saved, dtype):
    name = "transformer.h.0.ln_1.weight"
    _rewrite(saved / "single" / "model.safetensors", lambda t: t.update({name: torch.ones(160, dtype=dtype)}))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has (dtype torch.{str(dtype)[6:]}, expected a float "
                                              f"type|unsupported dtype)"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_error_unsupported_stored_dtype(saved):
    """A dtype safetensors stores but torch has no dtype for here (float8 variants are mapped; U16 not
    everywhere): a CheckpointError naming the tensor, never a crash."""
    name = "transformer.h.0.ln_1.weight"
    _rewrite(saved / "single" / "model.safetensors", lambda t: t.update({name: torch.ones(160, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has (dtype torch.int8|unsupported dtype)"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_save_target_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        make_model().save_pretrained(target)
    assert target.read_text() == "not a directory"


def test_save_and_convert_argument_errors(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="save_pretrained: naming must be 'exaone' or 'llama', got 'gpt'"):
        model.save_pretrained(tmp_path / "x", naming="gpt")
    meta = ExaoneForCausalLM(ExaoneConfig(**SMALL, tie_word_embeddings=True), use_kernels=False).to("meta")
    with pytest.raises(ValueError, match="save_pretrained: tensor .* is on the meta device"):
        meta.save_pretrained(tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "config.json").exists()
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="convert_checkpoint: 'to' must be 'exaone' or 'llama', got 'gpt'"):
        convert_checkpoint(tmp_path / "ok", tmp_path / "z", to="gpt")
    with pytest.raises(ValueError, match="convert_checkpoint: src and dst must be different directories"):
        convert_checkpoint(tmp_path / "ok", tmp_path / "ok" / ".." / "ok", to="llama")
