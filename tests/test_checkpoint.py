"""Checkpoints: bit-exact sharded round trips, EXAONE and Llama names, conversion, the summary, every
load error, and saves that are interrupted."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import exaone_ext.model.checkpoint as ckpt
from exaone_ext.model import (CheckpointError, ConfigError, ExaoneConfig, ExaoneForCausalLM, KVCache,
                              checkpoint_info, convert_checkpoint, exaone_to_llama_name, llama_to_exaone_name,
                              parse_size)

SMALL = dict(vocab_size=384, hidden_size=160, num_layers=3, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=96)


def make_model(tied=True, dtype=torch.float32) -> ExaoneForCausalLM:
    model = ExaoneForCausalLM(ExaoneConfig(**SMALL, tie_word_embeddings=tied), use_kernels=False)
    model.reset_parameters(0.1)
    return model.to(dtype)


def same_weights(a: ExaoneForCausalLM, b: ExaoneForCausalLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def shards(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


# ---- round trips ----
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [True, False])
def test_sharded_round_trip_bit_exact(tmp_path, dtype, tied):
    model = make_model(tied, dtype)
    model.save_pretrained(tmp_path / "ck", max_shard_size="150KB")
    files = shards(tmp_path / "ck")
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in model.parameters())
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "exaone" and config["torch_dtype"] == str(dtype)[6:]
    assert json.loads((tmp_path / "ck" / "generation_config.json").read_text())["eos_token_id"] == 361
    loaded = ExaoneForCausalLM.from_pretrained(tmp_path / "ck", use_kernels=False)
    assert same_weights(model, loaded)
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied
    assert loaded.loaded_naming == "exaone" and dataclasses.replace(loaded.config, torch_dtype=None) == model.config
    assert not any(p.is_meta for p in loaded.parameters()) and not loaded.rope_cos.is_meta
    ids = torch.randint(0, 384, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # and again: saving the loaded model gives byte-identical tensors
    loaded.save_pretrained(tmp_path / "ck2", max_shard_size="150KB")
    for f in files:
        a, b = load_file(tmp_path / "ck" / f), load_file(tmp_path / "ck2" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_and_dtype_conversion(tmp_path):
    model = make_model(False, torch.float32)
    model.save_pretrained(tmp_path / "ck")
    assert shards(tmp_path / "ck") == ["model.safetensors"]
    assert not (tmp_path / "ck" / "model.safetensors.index.json").exists()
    bf = ExaoneForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert all(torch.equal(p, q.bfloat16()) for p, q in zip(bf.parameters(), model.parameters()))
    assert bf.rope_cos.dtype == torch.float32


def test_mixed_dtypes_read_from_the_file(tmp_path):
    model = make_model(True, torch.bfloat16)
    with torch.no_grad():
        model.transformer.ln_f.weight.data = model.transformer.ln_f.weight.data.float()
    model.save_pretrained(tmp_path / "ck")
    loaded = ExaoneForCausalLM.from_pretrained(tmp_path / "ck")
    assert loaded.transformer.ln_f.weight.dtype == torch.float32
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [True, False])
def test_llama_names_load_and_convert_back(tmp_path, tied):
    model = make_model(tied, torch.bfloat16)
    model.save_pretrained(tmp_path / "ex", max_shard_size="100KB")
    (tmp_path / "ex" / "tokenizer.json").write_text('{"t": 1}')
    assert convert_checkpoint(tmp_path / "ex", tmp_path / "ll", to="llama", max_shard_size="100KB") == "exaone"
    config = json.loads((tmp_path / "ll" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3 and "num_layers" not in config
    assert config["tie_word_embeddings"] is tied
    assert (tmp_path / "ll" / "tokenizer.json").read_text() == '{"t": 1}'
    names = set(json.loads((tmp_path / "ll" / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.2.self_attn.o_proj.weight" in names and "model.embed_tokens.weight" in names
    assert not any(n.startswith("transformer.") for n in names)
    loaded = ExaoneForCausalLM.from_pretrained(tmp_path / "ll")
    assert loaded.loaded_naming == "llama" and same_weights(model, loaded)
    # model saved with Llama names directly, and converted back to EXAONE names
    model.save_pretrained(tmp_path / "ll2", naming="llama")
    assert ExaoneForCausalLM.from_pretrained(tmp_path / "ll2").loaded_naming == "llama"
    assert convert_checkpoint(tmp_path / "ll2", tmp_path / "ex2", to="exaone") == "llama"
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "ex2")
    assert back.loaded_naming == "exaone" and same_weights(model, back)
    assert json.loads((tmp_path / "ex2" / "config.json").read_text())["model_type"] == "exaone"


def test_name_mapping_table():
    pairs = {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "transformer.h.0.ln_1.weight": "model.layers.0.input_layernorm.weight",
        "transformer.h.12.attn.attention.q_proj.weight": "model.layers.12.self_attn.q_proj.weight",
        "transformer.h.3.attn.attention.out_proj.weight": "model.layers.3.self_attn.o_proj.weight",
        "transformer.h.3.ln_2.weight": "model.layers.3.post_attention_layernorm.weight",
        "transformer.h.3.mlp.c_fc_0.weight": "model.layers.3.mlp.gate_proj.weight",
        "transformer.h.3.mlp.c_fc_1.weight": "model.layers.3.mlp.up_proj.weight",
        "transformer.h.3.mlp.c_proj.weight": "model.layers.3.mlp.down_proj.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for e, l in pairs.items():
        assert exaone_to_llama_name(e) == l and llama_to_exaone_name(l) == e
    with pytest.raises(KeyError):
        exaone_to_llama_name("transformer.h.0.attn.attention.q_proj.bias")
    with pytest.raises(KeyError):
        llama_to_exaone_name("model.layers.0.self_attn.q_norm.weight")


def test_checkpoint_info(tmp_path):
    model = make_model(True, torch.bfloat16)
    model.save_pretrained(tmp_path / "ck", max_shard_size="200KB")
    info = checkpoint_info(tmp_path / "ck")
    c = model.config
    assert info["naming"] == "exaone" and info["num_parameters"] == c.num_parameters == model.num_parameters
    assert info["dtypes"] == {"bfloat16": c.num_parameters}
    assert info["weight_bytes"] == 2 * c.num_parameters
    assert info["kv_cache_bytes_per_token"] == 2 * c.num_layers * c.num_key_value_heads * c.head_dim * 2
    assert info["kv_cache_bytes"] == info["kv_cache_bytes_per_token"] * c.max_position_embeddings
    cache = KVCache(c, 1, c.max_position_embeddings, torch.bfloat16, device="meta")
    assert info["kv_cache_bytes"] == cache.nbytes
    assert info["files"] == shards(tmp_path / "ck") and info["file_bytes"] > info["weight_bytes"]
    assert {t["name"] for t in info["tensors"]} == set(model.state_dict()) - {"lm_head.weight"}
    assert info["tensors"][0] == {"name": "transformer.wte.weight", "shape": [384, 160], "dtype": "bfloat16",
                                  "file": info["files"][0]}
    json.dumps(info)  # plain data


def test_progress_bar(tmp_path, capsys):
    make_model(False).save_pretrained(tmp_path / "ck", progress=True)
    ExaoneForCausalLM.from_pretrained(tmp_path / "ck", progress=True)
    err = capsys.readouterr().err
    assert "saving ck" in err and "loading ck" in err and "100.0%" in err


def test_progress_callback(tmp_path):
    model = make_model(False)
    calls = []
    model.save_pretrained(tmp_path / "ck", max_shard_size="100KB", progress=lambda d, t, n: calls.append((d, t, n)))
    total = sum(p.nbytes for p in model.parameters())
    assert calls and calls[-1][:2] == (total, total)
    calls.clear()
    ExaoneForCausalLM.from_pretrained(tmp_path / "ck", progress=lambda d, t, n: calls.append((d, t, n)))
    assert len(calls) == len(list(model.parameters())) and calls[-1][:2] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100kb") == 100_000
    assert parse_size(1234) == 1234
    for bad in ("five", "-3GB", 0, "1XB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# ---- load errors ----
@pytest.fixture
def saved(tmp_path):
    """A sharded untied checkpoint and a single-file tied one."""
    make_model(False).save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    make_model(True).save_pretrained(tmp_path / "single")
    return tmp_path


def test_error_truncated_file(saved):
    f = saved / "sharded" / shards(saved / "sharded")[1]
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{f.name}: .*corrupt or truncated"):
        ExaoneForCausalLM.from_pretrained(saved / "sharded")


def test_error_corrupt_header(saved):
    f = saved / "single" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage!#{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: .*corrupt or truncated"):
        ExaoneForCausalLM.from_pretrained(saved / "single")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint_info(saved / "single")


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_error_missing_tensor(saved):
    _rewrite(saved / "single" / "model.safetensors", lambda t: t.pop("transformer.h.1.mlp.c_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer.h.1.mlp.c_proj.weight' \(expected shape \[160, 96\]\)"):
        ExaoneForCausalLM.from_pretrained(saved / "single")
    # in a sharded checkpoint the index still names it
    index = json.loads((saved / "sharded" / "model.safetensors.index.json").read_text())
    name = "transformer.h.2.ln_1.weight"
    _rewrite(saved / "sharded" / index["weight_map"][name], lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"maps tensor '{name}' to .*which does not contain it"):
        ExaoneForCausalLM.from_pretrained(saved / "sharded")


def test_error_unexpected_tensor(saved):
    _rewrite(saved / "single" / "model.safetensors",
             lambda t: t.update({"transformer.h.0.attn.attention.q_proj.bias": torch.zeros(160)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'transformer.h.0.attn.attention.q_proj.bias'"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_error_extra_layer(saved):
    # a layer beyond num_layers: a known name, but not a parameter of this config's model
    _rewrite(saved / "single" / "model.safetensors",
             lambda t: t.update({"transformer.h.3.ln_1.weight": torch.ones(160)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer.h.3.ln_1.weight'.*num_layers=3"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_error_wrong_shape(saved):
    _rewrite(saved / "single" / "model.safetensors",
             lambda t: t.update({"transformer.h.0.attn.attention.k_proj.weight": torch.zeros(160, 160)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'transformer.h.0.attn.attention.k_proj.weight' "
                                              r"has shape \[160, 160\], the config needs \[80, 160\]"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_error_tied_head_that_differs(saved):
    _rewrite(saved / "single" / "model.safetensors",
             lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()}))
    ExaoneForCausalLM.from_pretrained(saved / "single")  # an equal copy is accepted
    _rewrite(saved / "single" / "model.safetensors", lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(CheckpointError, match="ties the embeddings but tensor 'lm_head.weight' differs"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


def test_error_config(saved):
    (saved / "single" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ExaoneForCausalLM.from_pretrained(saved / "single")
    cfg = json.loads((saved / "sharded" / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (saved / "sharded" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"sharded/config.json: .*'qwen2'.*not an EXAONE"):
        ExaoneForCausalLM.from_pretrained(saved / "sharded")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExaoneForCausalLM.from_pretrained(saved / "nowhere")


def test_error_missing_shard_and_weights(saved):
    f = saved / "sharded" / shards(saved / "sharded")[2]
    f.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{f.name}', which is missing"):
        ExaoneForCausalLM.from_pretrained(saved / "sharded")
    (saved / "single" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        ExaoneForCausalLM.from_pretrained(saved / "single")


# ---- interrupted saves ----
def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = make_model(False)
    old.save_pretrained(tmp_path / "ck", max_shard_size="150KB")
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    before = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")}
    real, calls = ckpt.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    new = make_model(False)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path / "ck", max_shard_size="150KB")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    assert {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(tmp_path / "ck")} == before
    assert same_weights(ExaoneForCausalLM.from_pretrained(tmp_path / "ck"), old)
    # a fresh target: nothing appears at all
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path / "fresh", max_shard_size="150KB")
    assert not (tmp_path / "fresh").exists() and sorted(os.listdir(tmp_path)) == ["ck"]
    # a complete save replaces the weights and keeps the non-checkpoint files
    monkeypatch.setattr(ckpt, "save_file", real)
    new.save_pretrained(tmp_path / "ck")  # one file now: the old shards and index must go
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json"]
    assert same_weights(ExaoneForCausalLM.from_pretrained(tmp_path / "ck"), new)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_killed_save_leaves_nothing_loadable(tmp_path):
    """A process killed in the middle of a save (no cleanup runs): the target keeps the previous
    checkpoint and the leftover temporary directory has no config.json or index."""
    make_model(True).save_pretrained(tmp_path / "ck")
    script = textwrap.dedent(f"""
        import os, torch
        import exaone_ext.model.checkpoint as ckpt
        from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM
        real, n = ckpt.save_file, [0]
        def dying(*a, **k):
            n[0] += 1
            if n[0] == 3:
                os._exit(17)
            return real(*a, **k)
        ckpt.save_file = dying
        m = ExaoneForCausalLM(ExaoneConfig(**{SMALL!r}, tie_word_embeddings=False))
        m.save_pretrained({str(tmp_path / "ck")!r}, max_shard_size="150KB")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    assert ExaoneForCausalLM.from_pretrained(tmp_path / "ck").config.tie_word_embeddings is True
    leftovers = [d for d in os.listdir(tmp_path) if d != "ck"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ck.tmp-")
    left = os.listdir(tmp_path / leftovers[0])
    assert "config.json" not in left and "model.safetensors.index.json" not in left and len(left) == 2
