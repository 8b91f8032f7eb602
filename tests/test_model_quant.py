"""Quantized models: ExaoneForCausalLM.quantize, quantized checkpoints, AWQ checkpoints, quality."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from exaone_ext import ExaoneForCausalLM, ExaoneTokenizer, GenerationConfig, generate
from exaone_ext.model.checkpoint import exaone_to_llama_name
from exaone_ext.model.quant import QuantEmbedding, QuantLinear
from exaone_ext.testing import write_tiny_checkpoint

# hidden 128 / intermediate 256, so that every projection's inputs split into groups of 128
TINY = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=256)
TEXT = ("The quick brown fox jumps over the lazy dog. 서울은 한국의 수도이다. Language models predict the next "
        "token from the previous ones, one step at a time, and quantized weights make each step cheaper.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint after a short training run on TEXT, so that its predictions are confident
    (as a real model's are) rather than the near-ties of random weights, saved back in place."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), init_std=0.02, **TINY)
    model = ExaoneForCausalLM.from_pretrained(path, use_kernels=False)   # plain PyTorch: fastest at this size
    ids = _ids(path)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(40):
            loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    return path


def _ids(path):
    tok = ExaoneTokenizer.from_pretrained(path)
    return torch.tensor([tok.encode(TEXT)])


def _perplexity(model, ids):
    logits = model(ids)[0, :-1]
    return torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])).item()


def _greedy(model, path, n=32):
    tok = ExaoneTokenizer.from_pretrained(path)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, stop_strings=[])
    out = generate(model, tok, "Language models", cfg)
    return out.token_ids if hasattr(out, "token_ids") else out.text


@pytest.mark.slow
def test_int8_logits_and_greedy_text_match(trained):
    tiny = trained
    ref = ExaoneForCausalLM.from_pretrained(tiny)
    q = ExaoneForCausalLM.from_pretrained(tiny).quantize("int8")
    assert isinstance(q.transformer.h[0].mlp.c_proj, QuantLinear)
    ids = _ids(tiny)
    lr, lq = ref(ids), q(ids)
    rel = ((lq - lr).norm() / lr.norm()).item()
    assert rel < 0.01, rel
    assert _greedy(q, tiny) == _greedy(ref, tiny)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["int8", "int4", None])
def test_int4_perplexity_within_5_percent(trained, head):
    tiny = trained
    ref = ExaoneForCausalLM.from_pretrained(tiny)
    q = ExaoneForCausalLM.from_pretrained(tiny).quantize("int4", head=head)
    ids = _ids(tiny)
    p_ref, p_q = _perplexity(ref, ids), _perplexity(q, ids)
    assert abs(p_q / p_ref - 1) < 0.05, (p_ref, p_q)
    q.use_kernels = False   # the reference path computes the same thing
    torch.testing.assert_close(q(ids), ExaoneForCausalLM.from_pretrained(tiny).quantize("int4", head=head)(ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_head(tmp_path, tied):
    """The head is quantized like a projection (int8 by default). Tied: the embedding is the head, so
    the token lookup reads the quantized head's rows and no float [vocab, hidden] matrix is left;
    untied: the embedding stays float. Saved once, loaded back bit for bit, with the same logits."""
    path = write_tiny_checkpoint(tmp_path / "f", tie_word_embeddings=tied, **TINY)
    ref = ExaoneForCausalLM.from_pretrained(path)
    head_w = ref.lm_head.weight.detach().clone()
    model = ExaoneForCausalLM.from_pretrained(path).quantize("int4")
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    w = model.lm_head.dequantized_weight()      # int8 per row: within half a step of each row's scale
    step = head_w.float().abs().amax(1, keepdim=True) / 127
    assert ((w - head_w.float()).abs() <= step / 2 * (1 + 1e-2) + 1e-6).all()
    ids = _ids(path)
    if tied:
        assert isinstance(model.transformer.wte, QuantEmbedding)
        assert not any(p.shape == head_w.shape for p in model.parameters())
        torch.testing.assert_close(model.transformer.wte(ids), w.to(head_w.dtype)[ids], rtol=0, atol=0)
        for bad in (-1, head_w.shape[0]):            # as nn.Embedding: no wrap-around, no read past the end
            with pytest.raises(IndexError, match="index out of range"):
                model(torch.tensor([[1, bad]]))
    else:
        torch.testing.assert_close(model.transformer.wte.weight, ref.transformer.wte.weight, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["head_bits"] == 8 and config["tie_word_embeddings"] == tied
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.qweight", "lm_head.scales"} <= keys and "lm_head.weight" not in keys
    assert ("transformer.wte.weight" in keys) == (not tied)
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(back.lm_head, QuantLinear) and back.lm_head.bits == 8
    assert isinstance(back.transformer.wte, QuantEmbedding) == tied
    if tied:
        assert back.transformer.wte.head is back.lm_head
    assert back.state_dict().keys() == model.state_dict().keys()
    for n, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[n], t), n
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    # a copy or a move keeps the lookup on the copy's own head
    dup = copy.deepcopy(back)
    assert not tied or dup.transformer.wte.head is dup.lm_head
    # against the same projections with a float head (and embedding): the int8 head adds under 1% to
    # the logits; tied, the embedding's rows carry int8's error into every layer too (random weights
    # amplify it layer by layer; the trained model's figures are in the quality tests above)
    lr = ExaoneForCausalLM.from_pretrained(path).quantize("int4", head=None)(ids)
    lq = model(ids)
    assert ((lq - lr).norm() / lr.norm()).item() < (0.03 if tied else 0.01)


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_quant_embedding_views_and_empty(tiny, head):
    """The tied lookup on odd-but-legal ids: a strided view, zero ids, a whole forward of none; each
    row the head's dequantised row, in the model's dtype."""
    model = ExaoneForCausalLM.from_pretrained(tiny).quantize("int8", head=head)
    wte = model.transformer.wte
    rows = model.lm_head.dequantized_weight(model.lm_head.scales.dtype)        # [vocab, hidden]
    ids = torch.randint(0, rows.shape[0], (3, 10))
    view = ids[:, 1::3]                                                       # offset and step
    assert not view.is_contiguous()
    out = wte(view)
    assert out.dtype == model.transformer.ln_f.weight.dtype and out.shape == (3, 3, rows.shape[1])
    torch.testing.assert_close(out, rows[view], rtol=0, atol=0)
    assert wte(torch.empty(2, 0, dtype=torch.long)).shape == (2, 0, rows.shape[1])
    assert model(torch.empty(1, 0, dtype=torch.long)).shape == (1, 0, rows.shape[0])


def test_quantize_head_choices_and_errors(tiny, tmp_path):
    m = ExaoneForCausalLM.from_pretrained(tiny).quantize("int8", head="int4")
    assert m.lm_head.bits == 4 and m.lm_head.group_size == 128
    assert m.config.extra["quantization_config"] == {"quant_method": "exaone_ext", "bits": 8, "group_size": 128,
                                                     "zero_point": True, "head_bits": 4}
    m.save_pretrained(tmp_path / "q84")
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q84")
    assert back.lm_head.bits == 4 and back.transformer.h[0].mlp.c_proj.bits == 8
    # head=None: the head as it was (tied to the embedding), a checkpoint without head_bits
    kept = ExaoneForCausalLM.from_pretrained(tiny).quantize("int4", head=None)
    assert kept.lm_head.weight is kept.transformer.wte.weight
    assert "head_bits" not in kept.config.extra["quantization_config"]
    kept.save_pretrained(tmp_path / "q4")
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q4")
    assert back.lm_head.weight is back.transformer.wte.weight
    ids = _ids(tiny)
    torch.testing.assert_close(back(ids), kept(ids), rtol=0, atol=0)
    # the head of that checkpoint quantized afterwards, in int4 with the checkpoint's groups
    kept.quantize_head("int4")
    assert kept.lm_head.bits == 4 and kept.lm_head.group_size == 128
    assert kept.config.extra["quantization_config"]["head_bits"] == 4
    # bad arguments: a clear error and the model untouched
    fresh = ExaoneForCausalLM.from_pretrained(tiny)
    with pytest.raises(ValueError, match="projections are not quantized; use quantize"):
        fresh.quantize_head("int8")
    with pytest.raises(ValueError, match="format must be one of"):
        kept.quantize_head("int3")
    with pytest.raises(ValueError, match="head must be 'int8', 'int4' or None.*got 'int2'"):
        fresh.quantize("int8", head="int2")
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32, got 48"):
        fresh.quantize("int8", head="int4", group_size=48)
    with pytest.raises(ValueError, match=r"int4 needs lm_head's in_features \(128\) to be a multiple of group_size \(256\)"):
        fresh.quantize("int8", head="int4", group_size=256)
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())
    assert "quantization_config" not in fresh.config.extra
    # a checkpoint whose head_bits this package cannot build
    config = json.loads((tmp_path / "q84" / "config.json").read_text())
    config["quantization_config"]["head_bits"] = 3
    (tmp_path / "q84" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="head_bits must be 8 or 4, got 3"):
        ExaoneForCausalLM.from_pretrained(tmp_path / "q84")


@pytest.mark.parametrize("fmt,naming", [("int8", "exaone"), ("int4", "llama")])
def test_quantized_checkpoint_round_trip(tiny, tmp_path, fmt, naming):
    model = ExaoneForCausalLM.from_pretrained(tiny).quantize(fmt)
    model.save_pretrained(tmp_path / "q", naming=naming)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exaone_ext"
    assert config["quantization_config"]["bits"] == (8 if fmt == "int8" else 4)
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    ids = _ids(tiny)
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already quantized"):
        back.quantize("int8")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_projection_groups_take_one_call(tiny, fmt, monkeypatch):
    """q/k/v and gate/up of a quantized model go through linear_int8_cat / linear_int4_cat (one call
    each), and the logits are bit for bit those of calling each projection on its own."""
    from exaone_ext import ops
    model = ExaoneForCausalLM.from_pretrained(tiny).quantize(fmt)
    ids = _ids(tiny)
    name = f"linear_{fmt}_cat"
    calls = []
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    from exaone_ext.model import modeling
    monkeypatch.setattr(modeling, "_OPS", {key: modeling._resolve_ops(*key) for key in modeling._OPS})
    with torch.no_grad():
        grouped = model(ids)
        assert len(calls) == 2 * model.config.num_layers
        monkeypatch.setattr(QuantLinear, "grouped", None)
        separate = model(ids)
    assert len(calls) == 2 * model.config.num_layers
    assert torch.equal(grouped, separate)


def _awq_pack(values):
    """uint8 [rows, cols] (4-bit) -> int32 [rows, cols / 8]: nibble j of word c holds column
    8c + (0, 2, 4, 6, 1, 3, 5, 7)[j] (AWQ's GEMM packing)."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= values[:, order[j]::8].long() << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_awq_checkpoint_loads_and_matches(tiny, tmp_path):
    """An AWQ checkpoint (Llama names, qweight / qzeros / scales) written here from the tiny model's
    weights loads into int4 QuantLinear modules that compute (q - z) * s exactly."""
    model = ExaoneForCausalLM.from_pretrained(tiny)
    group = 128
    tensors, expected = {}, {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue                                                        # stored once, as the embedding
        llama = exaone_to_llama_name(name)
        if not name.startswith("transformer.h.") or "proj" not in name and "c_fc" not in name:
            tensors[llama] = t.contiguous()
            continue
        w = t.float().t()                                                   # AWQ stores [in, out]
        g = w.reshape(w.shape[0] // group, group, w.shape[1])
        lo, hi = g.amin(1), g.amax(1)
        s = ((hi - lo) / 15).clamp(min=1e-5)
        z = torch.round(-lo / s).clamp(0, 15)
        q = torch.round(g / s[:, None] + z[:, None]).clamp(0, 15).reshape_as(w).to(torch.uint8)
        base = llama.removesuffix(".weight")
        tensors[base + ".qweight"] = _awq_pack(q)
        tensors[base + ".qzeros"] = _awq_pack(z.to(torch.uint8))
        tensors[base + ".scales"] = s.half()
        rows = torch.arange(w.shape[0]) // group
        expected[name] = ((q.float() - z[rows]) * s.half().float()[rows]).t()   # [out, in]
    out = tmp_path / "awq"
    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tiny / f).exists():
            (out / f).write_bytes((tiny / f).read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    loaded = ExaoneForCausalLM.from_pretrained(out)
    for name, w in expected.items():
        module = loaded.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, QuantLinear) and module.bits == 4
        torch.testing.assert_close(module.dequantized_weight(), w, rtol=0, atol=0)
    with torch.no_grad():                      # the float model holding the dequantised weights
        for name, w in expected.items():
            model.get_parameter(name).copy_(w)
    ids = _ids(tiny)
    torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-4, atol=1e-4)
    # AWQ keeps the head in float; quantize_head quantizes it (tied: the lookup reads its rows)
    assert type(loaded.lm_head).__name__ == "Linear"
    before = loaded(ids)
    loaded.quantize_head("int8")
    assert isinstance(loaded.lm_head, QuantLinear) and isinstance(loaded.transformer.wte, QuantEmbedding)
    assert loaded.config.extra["quantization_config"]["head_bits"] == 8
    after = loaded(ids)
    assert 0 < ((after - before).norm() / before.norm()).item() < 0.03
    loaded.save_pretrained(tmp_path / "awq-head8")
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "awq-head8")
    torch.testing.assert_close(back(ids), after, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the head is already quantized"):
        back.quantize_head("int4")


def test_cli_quantize_and_quant_flag(tiny, tmp_path, capsys):
    from exaone_ext.cli import main
    dst = tmp_path / "q4"
    assert main(["quantize", str(tiny), str(dst), "--bits", "4", "--no-progress"]) == 0
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert (dst / "tokenizer.json").exists()
    assert main(["quantize", str(tiny), str(dst), "--bits", "8"]) == 1            # DST exists: refused
    assert main(["quantize", str(tiny), str(tmp_path / "q8f"), "--bits", "8", "--head", "float",
                 "--no-progress"]) == 0
    assert "head_bits" not in json.loads((tmp_path / "q8f" / "config.json").read_text())["quantization_config"]
    assert "already exists" in capsys.readouterr().err
    args = ["--prompt", "hello", "--raw", "--max-new-tokens", "4", "--no-progress"]
    assert main(["generate", "--model", str(dst)] + args) == 0
    from_file = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny), "--quant", "int4"] + args) == 0
    assert capsys.readouterr().out == from_file    # quantized on load == quantized checkpoint
    assert main(["generate", "--model", str(dst), "--quant", "int8"] + args) == 1
    assert "already quantized" in capsys.readouterr().err
    # --quant-head: the head's format with --quant; alone, the float head of a quantized checkpoint
    assert main(["generate", "--model", str(tiny), "--quant", "int4", "--quant-head", "float"] + args) == 0
    float_head = capsys.readouterr().out
    kept = tmp_path / "q4f"
    assert main(["quantize", str(tiny), str(kept), "--bits", "4", "--head", "float", "--no-progress"]) == 0
    assert main(["generate", "--model", str(kept)] + args) == 0
    assert capsys.readouterr().out == float_head
    assert main(["generate", "--model", str(kept), "--quant-head", "int8"] + args) == 0
    assert capsys.readouterr().out == from_file          # the same int8 head as quantize's default
    assert main(["generate", "--model", str(dst), "--quant-head", "int4"] + args) == 1
    assert "--quant-head: quantize_head: the head is already quantized" in capsys.readouterr().err
    # info describes the quantized checkpoint: logical parameter count, the format, every tensor
    from exaone_ext.model import checkpoint_info
    info = checkpoint_info(dst)
    assert info["quantization"]["bits"] == 4 and info["num_parameters"] == checkpoint_info(tiny)["num_parameters"]
    names = [t["name"] for t in info["tensors"]]
    assert names.index("transformer.h.0.attn.attention.q_proj.qweight") < names.index("transformer.h.0.ln_2.weight")
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "quantized    int4 block projections, groups of 128 inputs with zero points; head int8 (the tied embedding reads its rows)" in out
    assert "q_proj.qzeros" in out and "uint8" in out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_buffers_in_one_hugepage_arena(tiny, tmp_path, fmt):
    # hugepage_buffers places every projection's and the head's quantized tensors, in the order a
    # decode step reads them, in one 2 MiB-aligned buffer (each tensor a 64-byte-aligned view): the
    # values, the outputs and a save / load round trip are unchanged
    from exaone_ext.model.quant import hugepage_buffers, projections
    model = ExaoneForCausalLM.from_pretrained(tiny).quantize(fmt)   # the tiny model is below min_bytes
    before = {n: b.clone() for n, b in model.named_buffers()}
    ids = _ids(tiny)
    with torch.no_grad():
        logits = model(ids)
    placed = hugepage_buffers(model, min_bytes=0)
    modules = [m for _, _, m in projections(model)] + [model.lm_head]
    tensors = [t for m in modules for t in (m.qweight, m.scales, getattr(m, "qzeros", None)) if t is not None]
    for n, b in model.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    if placed:   # Linux with transparent huge pages (else nothing moves)
        assert placed >= sum(t.nbytes for t in tensors)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        assert tensors[0].data_ptr() % (2 << 20) == 0
        assert all(t.data_ptr() % 64 == 0 for t in tensors)
        ptrs = [t.data_ptr() for t in tensors]
        assert ptrs == sorted(ptrs)   # decode order: layer by layer, q k v o gate up down, then the head
        ends = [t.data_ptr() + t.nbytes for t in tensors]
        assert all(e <= p for e, p in zip(ends, ptrs[1:]))   # no overlap
    with torch.no_grad():
        assert torch.equal(model(ids), logits)
    model.save_pretrained(tmp_path / "q")
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q")
    for n, b in back.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n
    with torch.no_grad():
        assert torch.equal(back(ids), logits)
    assert hugepage_buffers(model, min_bytes=1 << 40) == 0   # below the threshold: nothing moves
