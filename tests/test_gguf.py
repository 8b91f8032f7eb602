"""GGUF files (llama.cpp's format) into the package: real files written here with the `gguf`
package's GGUFWriter from a tiny model and tokenizer, laid out as llama.cpp's converter lays them
out (metadata keys, tensor names, the llama Q/K row permutation, llama3 RoPE as a rope_freqs
tensor), with Q8_0 / Q4_0 blocks quantised by this file from the format's description."""
from __future__ import annotations

import copy
import json
import math

import gguf
import numpy as np
import pytest
import torch

from exaone_ext import ExaoneForCausalLM, ExaoneTokenizer, GenerationConfig, generate
from exaone_ext.model import ExaoneConfig
from exaone_ext.model.gguf import GGUFError
from exaone_ext.model.quant import QuantLinear
from exaone_ext.testing import tiny_config_dict, write_tiny_tokenizer

Q = gguf.GGMLQuantizationType
TEXTS = ["The quick brown fox jumps over the lazy dog. Numbers: 2024, 32768 and 3.14!",
         "안녕하세요. 한국의 수도는 서울입니다. 오늘 날씨가 좋아서 공원에 산책하러 갑니다.",
         "EXAONE은 한국어와 English를 모두 잘 합니다 🙂 — ñ 漢字 [|endofturn|] 끝.\n\n  spaces  "]
# EXAONE 3.5's chat template as its tokenizer_config.json (and the published GGUF files) carry it
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '[|system|][|endofturn|]\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)
PROJECTIONS = ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj", "attn.attention.out_proj",
               "mlp.c_fc_0", "mlp.c_fc_1", "mlp.c_proj")


# ---- llama.cpp's converter, as this test reads it ----
def gguf_name(name: str) -> str:
    glob = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    layer = {"ln_1": "attn_norm", "attn.attention.q_proj": "attn_q", "attn.attention.k_proj": "attn_k",
             "attn.attention.v_proj": "attn_v", "attn.attention.out_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc_0": "ffn_gate", "mlp.c_fc_1": "ffn_up", "mlp.c_proj": "ffn_down"}
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows (first half, second half) interleaved, so that the pair
    (j, j + d/2) of the rotate-half layout lands on rows (2j, 2j + 1)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def rope_factors(config: ExaoneConfig) -> torch.Tensor:
    """generate_extra_tensors of the converter: the llama3 divisor of every rotary frequency, float32."""
    s = config.rope_scaling
    dim, base = config.head_dim, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return torch.tensor(out, dtype=torch.float32)


def quantize_q4_0(w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """ggml's quantize_row_q4_0_ref: per 32 values, m = the value of largest magnitude (with its
    sign), d = m / -8, q = min(15, trunc(x / d + 8.5)); the block is fp16 d then 16 bytes, byte j =
    q[j] | q[16 + j] << 4. Returns (bytes [rows, blocks * 18], dequantised (q - 8) * fp16(d))."""
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // 32, 32)
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d16 = d.half()
    blocks = torch.cat([d16.view(torch.uint8), qs], dim=-1)
    return blocks.reshape(rows, -1).numpy(), ((q.float() - 8) * d16.float()).reshape(rows, cols)


def quantize_q8_0(w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """ggml's quantize_row_q8_0_ref: per 32 values d = max |x| / 127, q = roundf(x / d) (halves away
    from zero); the block is fp16 d then 32 int8. Returns (bytes, dequantised q * fp16(d))."""
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // 32, 32)
    d = x.abs().amax(-1, keepdim=True) / 127
    v = x * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)
    d16 = d.half()
    blocks = torch.cat([d16.view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return blocks.reshape(rows, -1).numpy(), (q.float() * d16.float()).reshape(rows, cols)


def quantize_int4_g32(w: torch.Tensor) -> torch.Tensor:
    from exaone_ext.ops.reference import dequantize_int4, quantize_int4
    return dequantize_int4(*quantize_int4(w, 32), 32)


def encode_tensor(w: torch.Tensor, kind: str):
    """(data, raw_dtype, the values the file then holds, as float32)."""
    if kind == "F32":
        return w.float().numpy(), None, w.float()
    if kind == "F16":
        return w.half().numpy(), None, w.half().float()
    if kind == "BF16":
        b = w.bfloat16()
        return b.view(torch.int16).numpy().view(np.uint8), Q.BF16, b.float()
    if kind == "Q8_0":
        data, deq = quantize_q8_0(w)
        return data, Q.Q8_0, deq
    if kind == "Q4_0":
        data, deq = quantize_q4_0(w)
        return data, Q.Q4_0, deq
    raise ValueError(kind)


def tokenizer_metadata(writer, tok_dir, pre: str) -> None:
    """As the converter's _set_vocab_gpt2: tokens by id (added special tokens CONTROL, other added
    tokens USER_DEFINED), merges as 'a b', special ids, chat template."""
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(len(by_id)):
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[config["bos_token"]])
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_unk_token_id(vocab[config["unk_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(path, model: ExaoneForCausalLM, tok_dir, arch: str = "exaone", types=None, pre: str = "exaone",
               drop=(), arch_name: str | None = None, raw_override=None) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp's converter would for `arch`; types(name) -> the GGUF type of a
    2-D tensor (1-D norms are F32, as llama.cpp keeps them). Returns {EXAONE name: the values the
    file holds, float32, in the model's own row order} (the test's dequantisation)."""
    c = model.config
    types = types or (lambda name: "F32")
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "exaone":   # ExaoneModel.set_gguf_parameters: rope dims from hidden / heads, no key_length
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    else:                  # TextModel + LlamaModel: key/value length from head_dim, vocab size
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
    tokenizer_metadata(w, tok_dir, pre)
    held = {}
    state = {n: t.detach() for n, t in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        if gguf_name(name) in drop:
            continue
        kind = "F32" if t.dim() == 1 else types(name)
        stored = t
        if arch == "llama" and name.endswith("q_proj.weight"):
            stored = permute_qk(t, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            stored = permute_qk(t, c.num_key_value_heads)
        data, raw, _ = encode_tensor(stored, kind)
        if raw_override and gguf_name(name) in raw_override:
            data, raw = raw_override[gguf_name(name)]
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
        # quantisation works row by row, so the rows in the model's order hold these values
        held[name] = encode_tensor(t, kind)[2]
    if c.rope_scaling:
        w.add_tensor("rope_freqs.weight", rope_factors(c).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def reference(config: ExaoneConfig, held: dict, use_kernels: bool = True) -> ExaoneForCausalLM:
    """A dense model holding exactly the values the file holds (float32)."""
    model = ExaoneForCausalLM(config, use_kernels=use_kernels)
    model.load_state_dict({**model.state_dict(), **held})
    return model.eval()


# ---- fixtures ----
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """EXAONE-style tokenizer: byte-level BPE that splits digits (llama.cpp's 'exaone' pre-tokenizer)."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), split_digits=True, chat_template=CHAT_TEMPLATE)


def tiny_model(tok_dir, seed=0, **overrides) -> ExaoneForCausalLM:
    tok = ExaoneTokenizer.from_pretrained(tok_dir)
    config = ExaoneConfig.from_dict(tiny_config_dict(tok.vocab_size, tok.eos_token_id, tok.bos_token_id,
                                                     tok.pad_token_id, **overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExaoneForCausalLM(config)
        model.reset_parameters(std=0.1)
    return model.eval()


# hidden / heads = head_dim, as in EXAONE 3.5 (the exaone converter derives the rope dims from it)
EXAONE_SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def exaone_model(tok_dir):
    return tiny_model(tok_dir, **EXAONE_SHAPE)


@pytest.fixture(scope="module")
def llama_model(tok_dir):
    # head_dim 64 != hidden / heads = 32 (key_length says it), untied head, GQA 4:2
    return tiny_model(tok_dir, seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def ids(tok_dir):
    tok = ExaoneTokenizer.from_pretrained(tok_dir)
    return torch.tensor([tok.encode(TEXTS[0] + " " + TEXTS[1])])


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, exaone_model, tok_dir):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(path, exaone_model, tok_dir)
    return path


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- model ----
def test_f32_exaone_file_loads_exactly(f32_file, exaone_model, ids):
    model = ExaoneForCausalLM.from_pretrained(f32_file)
    c, o = model.config, exaone_model.config
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "layer_norm_epsilon", "max_position_embeddings", "rope_theta",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(c, key) == getattr(o, key), key
    assert {k: float(v) for k, v in c.rope_scaling.items() if k != "rope_type"} == \
        {k: float(v) for k, v in o.rope_scaling.items() if k != "rope_type"}
    assert c.rope_scaling["rope_type"] == "llama3"
    assert torch.equal(model.rope_cos, exaone_model.rope_cos) and torch.equal(model.rope_sin, exaone_model.rope_sin)
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, t in exaone_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(model(ids), exaone_model(ids))
    assert model.generation_config["eos_token_id"] == o.eos_token_id


def test_llama_file_with_permuted_qk_and_untied_head(tmp_path, llama_model, tok_dir, ids):
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, llama_model, tok_dir, arch="llama")
    model = ExaoneForCausalLM.from_gguf(path)
    assert not model.config.tie_word_embeddings and model.config.head_dim == 64
    attn, ref = model.transformer.h[1].attn.attention, llama_model.transformer.h[1].attn.attention
    assert torch.equal(attn.q_proj.weight, ref.q_proj.weight) and torch.equal(attn.k_proj.weight, ref.k_proj.weight)
    assert torch.equal(model.lm_head.weight, llama_model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(model(ids), llama_model(ids))


@pytest.mark.parametrize("kind, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_files_load_as_stored(tmp_path, exaone_model, tok_dir, ids, kind, dtype):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_gguf(path, exaone_model, tok_dir, types=lambda name: kind)
    model = ExaoneForCausalLM.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {dtype}
    expected = ExaoneForCausalLM(exaone_model.config)
    expected.load_state_dict(exaone_model.state_dict())
    expected = expected.to(dtype).eval()
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))


def test_q8_0_dequantised_exactly_and_the_per_channel_alternative(tmp_path, exaone_model, tok_dir, ids, capsys):
    path = tmp_path / "tiny-q8_0.gguf"
    # the projections in Q8_0 (the embedding, quantized in the other files, kept F32 for the comparison)
    held = write_gguf(path, exaone_model, tok_dir, types=lambda name: "F32" if "wte" in name else "Q8_0")
    model = ExaoneForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.config.extra.get("quantization_config")
    for name, values in held.items():
        assert torch.equal(model.state_dict()[name], values), name
    with torch.no_grad():
        logits, exact, original = model(ids), reference(model.config, held)(ids), exaone_model(ids)
    assert torch.equal(logits, exact)
    # Random weights amplify any weight error layer by layer, so the yardstick is the package's own
    # int8 (one scale per output channel) applied to the original weights: Q8_0, with one scale per
    # 32 inputs, must be closer; re-quantising the Q8_0 weights per channel must add error.
    direct = ExaoneForCausalLM(copy.deepcopy(exaone_model.config))   # quantize() records itself in the config
    direct.load_state_dict(exaone_model.state_dict())
    direct.quantize("int8")
    weights = {f"transformer.h.{i}.{p}": model.get_submodule(f"transformer.h.{i}.{p}").weight.detach().clone()
               for i in range(model.config.num_layers) for p in PROJECTIONS}
    model.quantize("int8")
    with torch.no_grad():
        q8, int8, requant = _rel(logits, original), _rel(direct.eval()(ids), original), _rel(model(ids), original)
    err_q8 = np.mean([_rel(w, exaone_model.state_dict()[f"{n}.weight"]) for n, w in weights.items()])
    err_int8 = np.mean([_rel(direct.get_submodule(n).dequantized_weight(), exaone_model.state_dict()[f"{n}.weight"])
                        for n in weights])
    err_requant = np.mean([_rel(model.get_submodule(n).dequantized_weight(), w) for n, w in weights.items()])
    with capsys.disabled():
        print(f"\n[Q8_0] projection weights, mean relative error vs the original: Q8_0 {err_q8:.2e}, per-channel int8 "
              f"{err_int8:.2e}; Q8_0 re-quantised per channel vs Q8_0 {err_requant:.2e}\n"
              f"[Q8_0] logits, relative error vs the original: Q8_0 dequantised {q8:.2e}, per-channel int8 {int8:.2e}, "
              f"Q8_0 re-quantised per channel {requant:.2e}")
    assert err_q8 < err_int8 and q8 < int8
    assert err_requant > 0 and requant > q8


@pytest.mark.parametrize("arch", ["exaone", "llama"])
def test_q4_0_projections_become_int4_bit_for_bit(tmp_path, exaone_model, llama_model, tok_dir, ids, arch, capsys):
    source = exaone_model if arch == "exaone" else llama_model
    path = tmp_path / f"tiny-{arch}-q4_0.gguf"
    # as llama.cpp's Q4_0: every matrix Q4_0 (the embedding too; an untied head Q8_0 here)
    held = write_gguf(path, source, tok_dir, arch=arch, types=lambda n: "Q8_0" if n == "lm_head.weight" else "Q4_0")
    model = ExaoneForCausalLM.from_pretrained(path, use_kernels=False)
    assert model.config.extra["quantization_config"] == {"quant_method": "exaone_ext", "bits": 4, "group_size": 32,
                                                         "zero_point": True}
    for i in range(model.config.num_layers):
        for p in PROJECTIONS:
            m = model.get_submodule(f"transformer.h.{i}.{p}")
            assert isinstance(m, QuantLinear) and m.bits == 4 and m.group_size == 32
            assert torch.equal(m.qzeros, torch.full_like(m.qzeros, 8)) and m.scales.dtype == torch.float32
            assert torch.equal(m.dequantized_weight(), held[f"transformer.h.{i}.{p}.weight"]), (i, p)
            # the stored nibbles, not a re-quantisation: packing the test's block bytes is the qweight
            rows = source.get_submodule(f"transformer.h.{i}.{p}").weight.detach()
            blocks = torch.from_numpy(quantize_q4_0(rows)[0]).reshape(rows.shape[0], -1, 18)
            assert torch.equal(m.qweight, blocks[..., 2:].reshape(rows.shape[0], -1))
    assert torch.equal(model.transformer.wte.weight, held["transformer.wte.weight"])
    dense = reference(model.config, held, use_kernels=False)
    with torch.no_grad():
        assert torch.equal(model(ids), dense(ids))                      # plain PyTorch: the same arithmetic
        model.use_kernels, dense.use_kernels = True, True
        kern, exact, original = model(ids), dense(ids), source(ids)     # the int4 kernel against dense float32
    assert _rel(kern, exact) < 1e-5, _rel(kern, exact)
    # within the quantisation error: the yardstick is the package's own int4 with groups of 32
    # (asymmetric, round to nearest) applied to the original's matrices, the embedding included
    yard = ExaoneForCausalLM(copy.deepcopy(source.config))
    yard.load_state_dict(source.state_dict())
    yard.quantize("int4", group_size=32)
    with torch.no_grad():
        for name in ["transformer.wte.weight"] + (["lm_head.weight"] if arch == "llama" else []):
            p = yard.get_parameter(name)
            p.copy_(quantize_int4_g32(p))
        q4, int4 = _rel(exact, original), _rel(yard.eval()(ids), original)
    with capsys.disabled():
        print(f"\n[Q4_0 {arch}] logits, relative error: int4 kernel vs dense float32 of the same weights "
              f"{_rel(kern, exact):.1e}; vs the original: Q4_0 {q4:.2e}, package int4 group 32 {int4:.2e}")
    assert q4 < 1.5 * int4
    # bfloat16: scales stay float32 (fp16 scales do not all fit in bfloat16), so the weights are unchanged
    bf = ExaoneForCausalLM.from_gguf(path, dtype=torch.bfloat16)
    m = bf.transformer.h[0].mlp.c_proj
    assert m.scales.dtype == torch.float32 and torch.equal(m.dequantized_weight(), held["transformer.h.0.mlp.c_proj.weight"])


def test_mixed_types_save_reload_and_convert(tmp_path, exaone_model, tok_dir, ids):
    from exaone_ext.cli import main

    path = tmp_path / "tiny-mixed.gguf"
    kinds = {"attn.attention.q_proj": "Q4_0", "attn.attention.k_proj": "Q4_0", "attn.attention.v_proj": "Q8_0",
             "attn.attention.out_proj": "F16", "mlp.c_fc_0": "Q4_0", "mlp.c_fc_1": "BF16", "mlp.c_proj": "Q4_0"}
    write_gguf(path, exaone_model, tok_dir,
               types=lambda n: next((k for p, k in kinds.items() if p in n), "F16"))
    model = ExaoneForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float16
    qc = model.config.extra["quantization_config"]
    assert qc["modules_to_not_convert"] == sorted(f"transformer.h.{i}.{p}" for i in range(2)
                                                  for p, k in kinds.items() if k != "Q4_0")
    assert isinstance(model.transformer.h[1].mlp.c_proj, QuantLinear)
    assert type(model.transformer.h[1].mlp.c_fc_1).__name__ == "Linear"
    with torch.no_grad():
        logits = model(ids)
    model.save_pretrained(tmp_path / "saved")
    again = ExaoneForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids), logits)

    dst = tmp_path / "converted"
    assert main(["convert", "--from", "gguf", "--to", "llama", str(path), str(dst), "--no-progress"]) == 0
    converted = ExaoneForCausalLM.from_pretrained(dst)
    assert converted.loaded_naming == "llama"
    with torch.no_grad():
        assert torch.equal(converted(ids), logits)
    tok, original = ExaoneTokenizer.from_pretrained(dst), ExaoneTokenizer.from_pretrained(tok_dir)
    for text in TEXTS:
        assert tok.encode(text) == original.encode(text)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token_id == original.eos_token_id
    assert main(["convert", "--from", "gguf", "--to", "exaone", str(path), str(dst)]) == 1   # DST holds one


def test_llama3_scaling_outside_the_published_values_is_solved(tmp_path, tok_dir, ids):
    # original 100, high 3: no published combination; the loader solves the bounds from the factors
    scaling = {"rope_type": "llama3", "factor": 6.0, "low_freq_factor": 1.0, "high_freq_factor": 3.0,
               "original_max_position_embeddings": 100}
    source = tiny_model(tok_dir, rope_scaling=scaling, **EXAONE_SHAPE)
    path = tmp_path / "rope.gguf"
    write_gguf(path, source, tok_dir)
    model = ExaoneForCausalLM.from_pretrained(path)
    got = model.config.rope_scaling
    assert got["factor"] == 6.0 and got["original_max_position_embeddings"] == pytest.approx(100, rel=1e-4)
    assert got["high_freq_factor"] / got["low_freq_factor"] == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(model.rope_cos, source.rope_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.rope_sin, source.rope_sin, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), source(ids), rtol=0, atol=1e-4)


# ---- tokenizer ----
@pytest.mark.parametrize("pre", ["exaone", "gpt2"])
def test_tokenizer_round_trip(tmp_path, exaone_model, pre):
    tok_dir = write_tiny_tokenizer(tmp_path / "tok", split_digits=pre == "exaone", chat_template=CHAT_TEMPLATE)
    path = tmp_path / f"tok-{pre}.gguf"
    write_gguf(path, exaone_model, tok_dir, pre=pre)
    tok, original = ExaoneTokenizer.from_pretrained(path), ExaoneTokenizer.from_pretrained(tok_dir)
    assert tok.vocab_size == original.vocab_size
    for attr in ("eos_token", "eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "special_ids",
                 "chat_template"):
        assert getattr(tok, attr) == getattr(original, attr), attr
    for text in TEXTS:
        ids = original.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == original.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    assert [len(tok.encode(d)) for d in ("2024", "32768")] == ([4, 5] if pre == "exaone" else
                                                               [len(original.encode("2024")),
                                                                len(original.encode("32768"))])
    chat = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": TEXTS[0]},
            {"role": "user", "content": "고마워요"}]
    assert tok.apply_chat_template(chat, tokenize=True) == original.apply_chat_template(chat, tokenize=True)
    pieces = tok.stream_decoder()
    assert "".join(pieces.add(i) for i in tok.encode(TEXTS[1])) + pieces.flush() == TEXTS[1]


# ---- CLI ----
def test_cli_generate_chat_and_info_from_gguf(f32_file, exaone_model, tok_dir, capsys, monkeypatch):
    import io

    from exaone_ext.cli import main

    tok = ExaoneTokenizer.from_pretrained(tok_dir)
    expected = generate(exaone_model, tok, "The capital of Korea is", GenerationConfig(max_new_tokens=8)).text
    capsys.readouterr()
    assert main(["generate", "--model", str(f32_file), "--prompt", "The capital of Korea is", "--raw",
                 "--max-new-tokens", "8", "--no-progress"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    chat = generate(exaone_model, tok, [{"role": "user", "content": "안녕?"}], GenerationConfig(max_new_tokens=6)).text
    monkeypatch.setattr("sys.stdin", io.StringIO("안녕?\n"))
    assert main(["chat", "--model", str(f32_file), "--max-new-tokens", "6", "--no-progress"]) == 0
    assert capsys.readouterr().out == chat + "\n"
    assert main(["info", str(f32_file)]) == 0
    out = capsys.readouterr().out
    assert f"parameters   {exaone_model.num_parameters:,}" in out and "gguf tensor names" in out
    assert "blk.0.attn_q.weight" in out and "F32" in out
    assert main(["info", str(f32_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "exaone" and info["num_parameters"] == exaone_model.num_parameters


def test_serve_app_from_gguf(f32_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from exaone_ext.serve import create_app

    with TestClient(create_app(str(f32_file), max_batch=2)) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-f32"
        r = client.post("/v1/completions", json={"model": "tiny-f32", "prompt": "Hello", "max_tokens": 3,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- errors ----
def test_missing_and_non_gguf_files(tmp_path, capsys):
    from exaone_ext.cli import main

    with pytest.raises(FileNotFoundError, match="missing.gguf.*does not exist"):
        ExaoneForCausalLM.from_pretrained(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text('{"model_type": "exaone"}')
    with pytest.raises(GGUFError, match=r"fake.gguf: not a GGUF file \(expected the bytes b'GGUF' at the start, "
                                        r"found b'\{\"mo'\)"):
        ExaoneForCausalLM.from_pretrained(fake)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        ExaoneTokenizer.from_pretrained(fake)
    assert main(["generate", "--model", str(fake), "--prompt", "x"]) == 1
    assert main(["generate", "--model", str(tmp_path / "nothing-here"), "--prompt", "x"]) == 1
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    assert main(["info", str(other)]) == 1
    assert main(["generate", "--model", str(other), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("exaone-ext: error:") for line in err), err
    assert "fake.gguf: not a GGUF file" in err[0] and "is not a directory (a checkpoint) or a GGUF file" in err[1]
    assert "weights.bin: not a GGUF file (expected the bytes b'GGUF'" in err[2]
    assert "is a file but not a GGUF file" in err[3]


def test_truncated_file(tmp_path, f32_file):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_file.read_bytes()[:-1000])
    with pytest.raises(GGUFError, match="cut.gguf: not a readable GGUF file, corrupt or truncated"):
        ExaoneForCausalLM.from_pretrained(cut)


def test_unsupported_architecture(tmp_path, exaone_model, tok_dir):
    path = tmp_path / "qwen.gguf"
    write_gguf(path, exaone_model, tok_dir, arch_name="qwen2")
    with pytest.raises(GGUFError, match="architecture 'qwen2' .* expected one of 'exaone', 'llama'"):
        ExaoneForCausalLM.from_pretrained(path)


def test_unsupported_tensor_type(tmp_path, exaone_model, tok_dir):
    path = tmp_path / "q4_1.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_1]
    rows, cols = exaone_model.transformer.h[0].mlp.c_fc_1.weight.shape
    raw = np.random.default_rng(0).integers(0, 255, (rows, cols // block * size), dtype=np.uint8)
    write_gguf(path, exaone_model, tok_dir, raw_override={"blk.0.ffn_up.weight": (raw, Q.Q4_1)})
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.ffn_up.weight' has type Q4_1, which this package cannot "
                                        r"load \(supported: F32, F16, BF16, Q8_0, Q4_0\)"):
        ExaoneForCausalLM.from_pretrained(path)


def test_missing_tensor(tmp_path, exaone_model, tok_dir):
    path = tmp_path / "holed.gguf"
    write_gguf(path, exaone_model, tok_dir, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFError, match=r"missing tensor 'blk.1.ffn_down.weight' \(expected shape \[128, 256\]"):
        ExaoneForCausalLM.from_pretrained(path)


def test_unknown_pre_tokenizer(tmp_path, exaone_model, tok_dir):
    path = tmp_path / "pre.gguf"
    write_gguf(path, exaone_model, tok_dir, pre="qwen2")
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre is 'qwen2'.*supported: 'gpt2'"):
        ExaoneTokenizer.from_pretrained(path)
