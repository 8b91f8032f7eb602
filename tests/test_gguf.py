"""GGUF files (llama.cpp's format) into the package: real files written here with the `gguf`
package's GGUFWriter from a tiny model and tokenizer, laid out as llama.cpp's converter lays them
out (metadata keys, tensor names, the llama Q/K row permutation, llama3 RoPE as a rope_freqs
tensor), with Q8_0 / Q4_0 / Q6_K blocks quantised by this file from the format's description, and
random blocks of every other supported type checked against this file's own dequantisers, written
from ggml's block layouts (ggml-common.h) without the gguf package's."""
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
from exaone_ext.model.gguf import GGUFError, gguf_info
from exaone_ext.model.quant import QuantLinear
from exaone_ext import testing
from exaone_ext.testing import write_tiny_tokenizer

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


# ---- ggml's other block types, from their layouts ----
# kind -> (values per block, bytes per block, byte offsets of the block's fp16 fields)
BLOCKS = {"Q8_0": (32, 34, (0,)), "Q4_1": (32, 20, (0, 2)), "Q5_0": (32, 22, (0,)), "Q5_1": (32, 24, (0, 2)),
          "Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,)), "Q4_K": (256, 144, (0, 2)),
          "Q5_K": (256, 176, (0, 2)), "Q6_K": (256, 210, (208,))}


def _half(b: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block [n, bytes] -> float32 [n, 1]."""
    return np.ascontiguousarray(b[:, at:at + 2]).view("<f2").astype(np.float32)


def _f(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def dequant_q8_0(b):    # d, int8 q[32]: q * d
    return _f(b[:, 2:].view(np.int8)) * _half(b, 0)


def dequant_q4_1(b):    # d, m, qs[16] (input j low nibble of byte j, input 16 + j high nibble): q * d + m
    e = np.arange(32)
    q = (b[:, 4 + e % 16] >> 4 * (e // 16)) & 15
    return _f(q) * _half(b, 0) + _half(b, 2)


def _q5(b, qh_at, qs_at):   # 4 low bits as in Q4_1, the fifth bit of input e = bit e of the 32-bit qh
    e = np.arange(32)
    return ((b[:, qs_at + e % 16] >> 4 * (e // 16)) & 15) | (((b[:, qh_at + e // 8] >> e % 8) & 1) << 4)


def dequant_q5_0(b):    # d, qh[4], qs[16]: (q - 16) * d
    return _f(_q5(b, 2, 6) - 16) * _half(b, 0)


def dequant_q5_1(b):    # d, m, qh[4], qs[16]: q * d + m
    return _f(_q5(b, 4, 8)) * _half(b, 0) + _half(b, 2)


def dequant_q2_k(b):
    """scales[16] (low nibble: scale, high: min, of inputs 16s..16s+15), qs[64], d, dmin. Input e of
    half n = e // 128, part j = (e % 128) // 32: bits 2j..2j+1 of qs[32n + e % 32].
    w = d * scale * q - dmin * min."""
    e = np.arange(256)
    q = (b[:, 16 + 32 * (e // 128) + e % 32] >> 2 * (e % 128 // 32)) & 3
    sc = b[:, e // 16]
    return (_half(b, 80) * _f(sc & 15)) * _f(q) - _half(b, 82) * _f(sc >> 4)


def dequant_q3_k(b):
    """hmask[32], qs[64], scales[12], d. Low 2 bits as in Q2_K; the third bit of input e is bit
    4n + j of hmask[e % 32], and a clear bit subtracts 4. Scale s (6 bits, minus 32): low 4 bits in
    byte s % 8 (low nibble for s < 8, high after), high 2 bits at bit 2 (s // 4) of byte 8 + s % 4.
    w = d * scale * q."""
    e = np.arange(256)
    j, r, s = e % 128 // 32, e % 32, e // 16
    low = (b[:, 32 + 32 * (e // 128) + r] >> 2 * j) & 3
    high = (b[:, r] >> 4 * (e // 128) + j) & 1
    q = low.astype(np.int32) - 4 * (1 - high.astype(np.int32))
    sc = ((b[:, 96 + s % 8] >> 4 * (s // 8)) & 15) | (((b[:, 104 + s % 4] >> 2 * (s // 4)) & 3) << 4)
    return (_half(b, 108) * (_f(sc) - 32)) * _f(q)


def _k_scales(b):
    """The 8 six-bit scales and mins of Q4_K / Q5_K (12 bytes from byte 4): sub-block s < 4 has its
    scale in the low 6 bits of byte s and its min in byte s + 4; s >= 4 has the low 4 bits of both in
    byte s + 4 (scale low nibble, min high nibble) and their top 2 bits in the top bits of bytes s - 4
    (scale) and s (min). -> (scales, mins) int [n, 8]."""
    x = b[:, 4:16].astype(np.int32)
    sc = np.concatenate([x[:, 0:4] & 63, (x[:, 8:12] & 15) | (x[:, 0:4] >> 6 << 4)], axis=1)
    mn = np.concatenate([x[:, 4:8] & 63, (x[:, 8:12] >> 4) | (x[:, 4:8] >> 6 << 4)], axis=1)
    return sc, mn


def _q4_k_low(b, qs_at):    # input e: nibble (e // 32) % 2 of qs[32 (e // 64) + e % 32]
    e = np.arange(256)
    return (b[:, qs_at + 32 * (e // 64) + e % 32] >> 4 * (e // 32 % 2)) & 15


def dequant_q4_k(b):
    """d, dmin, scales[12], qs[128]; 8 sub-blocks of 32: w = d * scale * q - dmin * min."""
    s = np.arange(256) // 32
    sc, mn = _k_scales(b)
    return (_half(b, 0) * _f(sc[:, s])) * _f(_q4_k_low(b, 16)) - _half(b, 2) * _f(mn[:, s])


def dequant_q5_k(b):
    """d, dmin, scales[12], qh[32], qs[128]: Q4_K's 4 bits, the fifth of input e = bit e // 32 of
    qh[e % 32]."""
    e = np.arange(256)
    s = e // 32
    sc, mn = _k_scales(b)
    q = _q4_k_low(b, 48) | (((b[:, 16 + e % 32] >> s) & 1) << 4)
    return (_half(b, 0) * _f(sc[:, s])) * _f(q) - _half(b, 2) * _f(mn[:, s])


def dequant_q6_k(b):
    """ql[128], qh[64], int8 scales[16], d. Input e of half n, part k = (e % 128) // 32, l = e % 32:
    low 4 bits = nibble k // 2 of ql[64n + 32 (k % 2) + l], high 2 bits = bits 2k..2k+1 of
    qh[32n + l]; w = d * scale[e // 16] * (q - 32)."""
    e = np.arange(256)
    n, k, l = e // 128, e % 128 // 32, e % 32
    low = (b[:, 64 * n + 32 * (k % 2) + l] >> 4 * (k // 2)) & 15
    high = (b[:, 128 + 32 * n + l] >> 2 * k) & 3
    q = (low | high << 4).astype(np.int32) - 32
    return (_half(b, 208) * _f(b[:, 192 + e // 16].view(np.int8))) * _f(q)


DEQUANT = {"Q8_0": dequant_q8_0, "Q4_1": dequant_q4_1, "Q5_0": dequant_q5_0, "Q5_1": dequant_q5_1,
           "Q2_K": dequant_q2_k, "Q3_K": dequant_q3_k, "Q4_K": dequant_q4_k, "Q5_K": dequant_q5_k,
           "Q6_K": dequant_q6_k}


def dequantize_blocks(kind: str, data: np.ndarray) -> torch.Tensor:
    """Bytes [rows, bytes per row] of `kind` -> float32 [rows, inputs] (in ggml's float32 arithmetic:
    the same products in the same order)."""
    _, size, _ = BLOCKS[kind]
    return torch.from_numpy(DEQUANT[kind](data.reshape(-1, size)).reshape(data.shape[0], -1))


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes [rows, bytes per row] of `kind`: every bit pattern is a valid block, except that
    fp16 fields must be finite, so an all-ones exponent (bits 2..6 of the high byte) loses a bit."""
    values, size, halves = BLOCKS[kind]
    b = rng.integers(0, 256, (rows * cols // values, size), dtype=np.uint8)
    for at in halves:
        special = (b[:, at + 1] & 0x7C) == 0x7C
        b[special, at + 1] ^= 0x40
    return b.reshape(rows, -1)


def quantize_q6_k(w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """A Q6_K quantiser (round to nearest; ggml's searches for better scales): per 16 inputs a scale
    max |x| / 31, stored as int8 multiples of the super-block's fp16 d = max scale / 127; q =
    round(x / (d * scale)) in [-32, 31], stored + 32, packed as dequant_q6_k reads it. Returns
    (bytes, the values dequant_q6_k reads back)."""
    rows, cols = w.shape
    x = w.float().reshape(-1, 16, 16)                                   # [blocks, sub-blocks, inputs]
    scale = x.abs().amax(-1) / 31
    d = (scale.amax(-1, keepdim=True) / 127).half()
    df = d.float()
    sc = torch.round(scale / torch.where(df > 0, df, 1)).clamp(-128, 127).to(torch.int8)
    step = (df * sc.float())[..., None]
    q = (torch.round(x / torch.where(step > 0, step, 1)).clamp(-32, 31) + 32).to(torch.int64).reshape(-1, 256)
    e = torch.arange(256)
    n, k, l = e // 128, e % 128 // 32, e % 32
    # the bit fields of a byte do not overlap, so adding them up packs them
    ql = torch.zeros(q.shape[0], 128, dtype=torch.int64).index_add_(1, 64 * n + 32 * (k % 2) + l,
                                                                    (q & 15) << 4 * (k // 2))
    qh = torch.zeros(q.shape[0], 64, dtype=torch.int64).index_add_(1, 32 * n + l, (q >> 4) << 2 * k)
    blocks = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc.view(torch.uint8), d.view(torch.uint8)], dim=-1)
    data = blocks.reshape(rows, -1).numpy()
    return data, dequantize_blocks("Q6_K", data)


def quantize_int4_g32(w: torch.Tensor) -> torch.Tensor:
    from exaone_ext.ops.reference import dequantize_int4, quantize_int4
    return dequantize_int4(*quantize_int4(w, 32), 32)


def encode_tensor(w: torch.Tensor, kind: str, rng=None):
    """(data, raw_dtype, the values the file then holds, as float32). With `rng`, the types of
    BLOCKS get random blocks (of w's shape) instead of w's quantisation."""
    if rng is not None and kind in BLOCKS:
        data = random_blocks(kind, *w.shape, rng)
        return data, Q[kind], dequantize_blocks(kind, data)
    if kind == "Q6_K":
        data, deq = quantize_q6_k(w)
        return data, Q.Q6_K, deq
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
               drop=(), arch_name: str | None = None, raw_override=None,
               random_blocks_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp's converter would for `arch`; types(name) -> the GGUF type of a
    2-D tensor (1-D norms are F32, as llama.cpp keeps them); with random_blocks_seed, tensors of the
    BLOCKS types hold random blocks instead of the model's weights. Returns {EXAONE name: the
    values the file holds, float32, in the model's own row order} (the test's dequantisation)."""
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
    rng = None if random_blocks_seed is None else np.random.default_rng(random_blocks_seed)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        if gguf_name(name) in drop:
            continue
        kind = "F32" if t.dim() == 1 else types(name)
        data, raw, held[name] = encode_tensor(t, kind, rng)
        # quantisation works row by row, so permuting the encoded rows encodes the permuted rows
        heads = c.num_attention_heads if name.endswith("q_proj.weight") else \
            c.num_key_value_heads if name.endswith("k_proj.weight") else None
        if arch == "llama" and heads:
            data = permute_qk(torch.from_numpy(np.ascontiguousarray(data)), heads).numpy()
        if raw_override and gguf_name(name) in raw_override:
            data, raw = raw_override[gguf_name(name)]
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
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
    return testing.tiny_model(tok_dir, seed, 0.1, **overrides)


# hidden / heads = head_dim, as in EXAONE 3.5 (the exaone converter derives the rope dims from it)
EXAONE_SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def exaone_model(tok_dir):
    return tiny_model(tok_dir, **EXAONE_SHAPE)


# inputs in multiples of 256, as the K-quants need (EXAONE 3.5 2.4B: hidden 2560, intermediate 7168)
WIDE_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)


@pytest.fixture(scope="module")
def wide_model(tok_dir):
    return tiny_model(tok_dir, seed=2, **WIDE_SHAPE)


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
    direct.quantize("int8", head=None)   # the projections only, as the file quantizes them
    weights = {f"transformer.h.{i}.{p}": model.get_submodule(f"transformer.h.{i}.{p}").weight.detach().clone()
               for i in range(model.config.num_layers) for p in PROJECTIONS}
    model.quantize("int8", head=None)
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
    model = ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)   # the values exactly
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
    yard.quantize("int4", group_size=32, head=None)   # the head is quantized below, as in the file
    with torch.no_grad():
        for name in ["transformer.wte.weight"] + (["lm_head.weight"] if arch == "llama" else []):
            p = yard.get_parameter(name)
            p.copy_(quantize_int4_g32(p))
        q4, int4 = _rel(exact, original), _rel(yard.eval()(ids), original)
    with capsys.disabled():
        print(f"\n[Q4_0 {arch}] logits, relative error: int4 kernel vs dense float32 of the same weights "
              f"{_rel(kern, exact):.1e}; vs the original: Q4_0 {q4:.2e}, package int4 group 32 {int4:.2e}")
    assert q4 < 1.5 * int4
    # bfloat16, the default for a quantized embedding: scales stay float32 (fp16 scales do not all fit
    # in bfloat16), so the int4 weights are unchanged
    bf = ExaoneForCausalLM.from_gguf(path)
    assert bf.transformer.wte.weight.dtype == torch.bfloat16
    m = bf.transformer.h[0].mlp.c_proj
    assert m.scales.dtype == torch.float32 and torch.equal(m.dequantized_weight(), held["transformer.h.0.mlp.c_proj.weight"])
    # the file's head (dequantised, dense) quantized afterwards: saved and loaded with the projections
    bf.quantize_head("int8")
    assert bf.config.extra["quantization_config"]["head_bits"] == 8
    bf.save_pretrained(tmp_path / "q4_0-head8")
    back = ExaoneForCausalLM.from_pretrained(tmp_path / "q4_0-head8")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), bf(ids), rtol=0, atol=0)


@pytest.mark.parametrize("kind, arch", [(k, "exaone") for k in BLOCKS] + [("Q4_K", "llama"), ("Q6_K", "llama")])
def test_block_types_dequantised_exactly(tmp_path, wide_model, tok_dir, kind, arch, monkeypatch):
    from exaone_ext.model import gguf as gguf_module

    assert gguf.GGML_QUANT_SIZES[Q[kind]] == BLOCKS[kind][:2]
    # several chunks per tensor, the last one short (rows of 256 inputs: 3 a chunk; of 512: 1)
    monkeypatch.setattr(gguf_module, "_CHUNK", 3 * 256 + 5)
    path = tmp_path / f"tiny-{arch}-{kind}.gguf"
    # every matrix (the embedding included) random blocks of `kind`; "llama" files permute Q / K rows
    held = write_gguf(path, wide_model, tok_dir, arch=arch, types=lambda n: kind, random_blocks_seed=3)
    model = ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not model.config.extra.get("quantization_config")
    state = model.state_dict()
    for name, values in held.items():
        assert torch.equal(state[name], values), name
    # the default for a quantized embedding: bfloat16, the same values rounded once
    default = ExaoneForCausalLM.from_pretrained(path)
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}
    state = default.state_dict()
    for name, values in held.items():
        assert torch.equal(state[name], values.bfloat16()), name
    info = gguf_info(path)
    assert info["kv_cache_dtype"] == "bfloat16" and set(info["dtypes"]) == {kind, "F32"}


def test_k_quant_blocks_by_hand(tmp_path, wide_model, tok_dir):
    """One Q6_K and one Q4_K block written byte by byte, the expected values worked out by hand."""
    # Q6_K, d = 1: every q is 0 - 32 (all bytes 0) except input 200 (half 1, part 2, l = 8: high nibble
    # of ql[64 + 8] = 7, bits 4..5 of qh[32 + 8] = 2, q = 7 + 32 - 32 = 7); only scale 12 (inputs
    # 192..207) is non-zero, -3: inputs 192..207 are -3 * -32 = 96, input 200 is -3 * 7 = -21.
    q6 = np.zeros((512, 210), dtype=np.uint8)
    q6[5, 208:210] = np.array([1.0], dtype="<f2").view(np.uint8)
    q6[5, 192 + 12] = np.array([-3], dtype=np.int8).view(np.uint8)[0]
    q6[5, 64 + 8] = 0x70
    q6[5, 128 + 32 + 8] = 0b10 << 4
    want6 = torch.zeros(512, 256)
    want6[5, 192:208] = 96
    want6[5, 200] = -21
    # Q4_K, d = 1, dmin = 0.5: sub-block 5 (inputs 160..191) has scale = low nibble of byte 4 + 9 (3)
    # | top bits of byte 4 + 1 (1) << 4 = 19 and min = high nibble of byte 4 + 9 (2) | top bits of byte
    # 4 + 5 (2) << 4 = 34; input 164 is the high nibble of qs[64 + 4] = 10: 19 * 10 - 0.5 * 34 = 173,
    # the rest of the sub-block q = 0: -17; the other sub-blocks have scale and min 0.
    q4 = np.zeros((512, 144), dtype=np.uint8)
    q4[7, 0:4] = np.array([1.0, 0.5], dtype="<f2").view(np.uint8)
    q4[7, 4 + 9], q4[7, 4 + 1], q4[7, 4 + 5] = 0x23, 0x40, 0x80
    q4[7, 16 + 64 + 4] = 0xA0
    want4 = torch.zeros(512, 256)
    want4[7, 160:192] = -17
    want4[7, 164] = 173
    path = tmp_path / "by-hand.gguf"
    write_gguf(path, wide_model, tok_dir, raw_override={"blk.0.ffn_up.weight": (q6, Q.Q6_K),
                                                        "blk.1.ffn_gate.weight": (q4, Q.Q4_K)})
    model = ExaoneForCausalLM.from_pretrained(path)    # F32 embedding: float32
    assert torch.equal(model.transformer.h[0].mlp.c_fc_1.weight, want6)
    assert torch.equal(model.transformer.h[1].mlp.c_fc_0.weight, want4)
    assert torch.equal(dequantize_blocks("Q6_K", q6), want6) and torch.equal(dequantize_blocks("Q4_K", q4), want4)


def test_q4_0_file_with_q6_k_embedding_generates(tmp_path, wide_model, tok_dir, ids, capsys):
    from exaone_ext.cli import main

    path = tmp_path / "tiny-Q4_0.gguf"
    # llama.cpp's Q4_0 of a tied model: the matrices Q4_0 but the embedding (the head too) Q6_K
    held = write_gguf(path, wide_model, tok_dir, types=lambda n: "Q6_K" if n == "transformer.wte.weight" else "Q4_0")
    model = ExaoneForCausalLM.from_pretrained(path)
    wte = model.transformer.wte.weight
    assert wte.dtype == torch.bfloat16 and model.lm_head.weight is wte
    assert torch.equal(wte, held["transformer.wte.weight"].bfloat16())
    for i in range(model.config.num_layers):
        for p in PROJECTIONS:
            m = model.get_submodule(f"transformer.h.{i}.{p}")
            assert isinstance(m, QuantLinear) and m.scales.dtype == torch.float32
            assert torch.equal(m.dequantized_weight(), held[f"transformer.h.{i}.{p}.weight"]), (i, p)
    exact = ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)
    with torch.no_grad():
        logits, bf16 = exact(ids), model(ids).float()
        assert torch.equal(logits, reference(exact.config, held, use_kernels=False)(ids))
    q6 = _rel(held["transformer.wte.weight"], wide_model.transformer.wte.weight.detach())
    with capsys.disabled():
        print(f"\n[Q4_0 + Q6_K] embedding vs the original {q6:.2e}; logits of the bfloat16 default vs float32 "
              f"{_rel(bf16, logits):.2e}")
    assert q6 < 0.03 and _rel(bf16, logits) < 0.05

    tok = ExaoneTokenizer.from_pretrained(path)
    expected = generate(model, tok, "The capital of Korea is", GenerationConfig(max_new_tokens=8)).text
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--prompt", "The capital of Korea is", "--raw",
                 "--max-new-tokens", "8", "--no-progress"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q6_K" in out and "Q4_0" in out and "token_embd.weight" in out


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


@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS", "TQ2_0"])
def test_unsupported_tensor_type(tmp_path, wide_model, tok_dir, kind):
    path = tmp_path / f"{kind}.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q[kind]]
    rows, cols = wide_model.transformer.h[0].mlp.c_fc_1.weight.shape
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    write_gguf(path, wide_model, tok_dir, raw_override={"blk.0.ffn_up.weight": (raw, Q[kind])})
    with pytest.raises(GGUFError, match=rf"{kind}.gguf: tensor 'blk.0.ffn_up.weight' has type {kind}, which "
                                        r"this package cannot load \(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                        r"Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K\)"):
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
