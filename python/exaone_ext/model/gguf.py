"""GGUF files (the single-file format of llama.cpp) as EXAONE models and tokenizers.

    model = ExaoneForCausalLM.from_pretrained("EXAONE-3.5-2.4B-Instruct-Q4_0.gguf")   # or from_gguf
    tok = ExaoneTokenizer.from_pretrained("EXAONE-3.5-2.4B-Instruct-Q4_0.gguf")
    convert_gguf("model.gguf", "checkpoint-dir")     # a Hugging Face-layout checkpoint with its tokenizer
    gguf_info("model.gguf")                          # what checkpoint_info gives for a directory

Architectures: llama.cpp's "exaone" and "llama" (general.architecture). Hyperparameters come from
the `{arch}.*` keys; a llama3 RoPE scaling, which llama.cpp stores as the per-frequency divisors
of the `rope_freqs` tensor, is read back into config.json's llama3 parameters (and checked to
reproduce every stored divisor). Tensor names are llama.cpp's (token_embd, blk.N.attn_q, ...,
output_norm, output); no `output` tensor means a tied head.

Q/K rows: llama.cpp's converter permutes the rows of attn_q / attn_k of "llama" models within
each head, from Hugging Face's rotate-half RoPE layout (pair i, i + d/2) to the interleaved one
(pair 2i, 2i + 1) that llama.cpp's llama architecture rotates; its "exaone" architecture rotates
in the rotate-half layout and is converted without the permutation. The loader undoes the
permutation for "llama" files (on whole rows, so quantized rows move unchanged).

Tensor types:
  F32, F16, BF16  copied (cast to the model's dtype).
  Q4_0            blocks of 32 inputs: fp16 scale d, then 16 bytes, byte j holding input j in its
                  low nibble and input 16 + j in its high nibble; w = (q - 8) * d. This is the
                  package's int4 layout with group_size 32 and zero point 8, so block projections
                  become int4 QuantLinear modules bit for bit (scales kept in float32 for a
                  bfloat16 model, where fp16 would not fit exactly); other Q4_0 tensors (the
                  embedding, the head) are dequantised into the model's dtype.
  Q8_0            blocks of 32: fp16 scale d, 32 int8 q; w = q * d. The package's int8 has one
                  scale per output channel and cannot hold one per 32 inputs, so Q8_0 tensors are
                  dequantised into the model's dtype (exact in float32). model.quantize("int8")
                  re-quantises per channel afterwards when memory matters more.
  Q4_1, Q5_0,     the rest of llama.cpp's legacy and K-quant types: blocks of 32 with an fp16
  Q5_1, Q2_K,     scale (and min), and super-blocks of 256 with 8 or 16 sub-block scales (and
  Q3_K, Q4_K,     mins) quantized against fp16 super-block scales. Mins that are not integer zero
  Q5_K, Q6_K      points and 2/3/5/6-bit values have no package format, so these tensors are
                  dequantised into the model's dtype by the gguf package's dequantiser
                  (gguf.quants; ggml's arithmetic, exact in float32).
Block types are dequantised a few MiB of rows at a time straight into the weight the model keeps
(no float32 copy of a whole tensor on the way). Q8_K (ggml's intermediate for dot products, not
written into model files), the IQ*, TQ* and FP4 types and any other type are refused with the
tensor named.

Default dtype: the token embedding's when it is F32, F16 or BF16 (the file's own precision);
bfloat16 when it is block-quantized, as in every file llama.cpp's quantizer writes. The dense
weights then take half of float32's memory (a 2.4B model dequantised from Q4_K_M: about 5 GB
instead of 10), bfloat16 is the dtype EXAONE's own checkpoints use, and its rounding (at most 2^-9
of a weight) is small beside the error of these block types: on Gaussian weights Q8_0, the finest,
is 0.54% from the original (relative norm) and 0.56% once rounded to bfloat16. dtype=torch.float32
keeps the stored values exactly.
"""
from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np
import torch

from ..ops.reference.quant import INT4_BLOCK, dequantize_int4
from ..ops.reference.rope import rope_inv_freq
from .checkpoint import CheckpointError, _dtype_name, _Progress, _set_tensor, rename_tensor, save_model
from .config import ConfigError, ExaoneConfig

__all__ = ["GGUFError", "ARCHITECTURES", "TENSOR_TYPES", "is_gguf_path", "read_gguf_config", "load_gguf",
           "gguf_tokenizer", "gguf_generation_config", "gguf_info", "convert_gguf", "gguf_to_exaone_name"]

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("exaone", "llama")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BLOCK_BYTES = {"Q8_0": 2 + INT4_BLOCK, "Q4_0": 2 + INT4_BLOCK // 2}   # fp16 scale + the block's values
_CHUNK = 1 << 22   # elements of a block-quantized tensor dequantised at a time (16 MiB in float32)
_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp tensor names -> EXAONE names
_GLOBAL = {"token_embd.weight": "transformer.wte.weight", "output_norm.weight": "transformer.ln_f.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "ln_1.weight", "attn_q": "attn.attention.q_proj.weight",
          "attn_k": "attn.attention.k_proj.weight", "attn_v": "attn.attention.v_proj.weight",
          "attn_output": "attn.attention.out_proj.weight", "ffn_norm": "ln_2.weight",
          "ffn_gate": "mlp.c_fc_0.weight", "ffn_up": "mlp.c_fc_1.weight", "ffn_down": "mlp.c_proj.weight"}
_GLOBAL_REV = {v: k for k, v in _GLOBAL.items()}
_LAYER_REV = {v: k for k, v in _LAYER.items()}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")
_EXAONE_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_PROJECTIONS = ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                "attn.attention.out_proj", "mlp.c_fc_0", "mlp.c_fc_1", "mlp.c_proj")

# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp keeps the rules in its code, by name)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "gpt2": "GPT-2's split",
    "exaone": "every digit alone, then GPT-2's split",
    "llama-bpe": "Llama 3's split",
    "llama3": "Llama 3's split",
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(CheckpointError):
    """A GGUF file that cannot be loaded: not GGUF, corrupt, or holding something this package does
    not run (another architecture, an unsupported tensor type, a missing tensor)."""


def gguf_to_exaone_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'transformer.h.3.attn.attention.q_proj.weight'. KeyError if unknown."""
    out = rename_tensor(name, _GLOBAL, _GGUF_LAYER, _LAYER, "transformer.h.{}.{}")
    if out is not None:
        return out
    raise KeyError(f"not a llama.cpp tensor name of an EXAONE / Llama model: {name!r}")


def _exaone_to_gguf_name(name: str) -> str:
    out = rename_tensor(name, _GLOBAL_REV, _EXAONE_LAYER, _LAYER_REV, "blk.{}.{}.weight")
    if out is None:
        raise KeyError(f"no llama.cpp name for the tensor {name!r}")
    return out


def is_gguf_path(path) -> bool:
    """True for a path that names a GGUF file rather than a checkpoint directory: an existing file
    that starts with the GGUF magic, or any non-directory path ending in '.gguf' (so that a missing
    or damaged one is reported as such)."""
    try:
        path = os.fspath(path)
    except TypeError:
        return False
    if os.path.isdir(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ---- reading ----
class _GGUFFile:
    """A GGUF file's metadata and tensor index (gguf.GGUFReader; tensor data stays memory-mapped)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"GGUF file {self.path!r} does not exist")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, expected a GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (expected the bytes {GGUF_MAGIC!r} at the start, "
                            f"found {magic!r})")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'exaone-ext[gguf]'") from None
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file, corrupt or truncated ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} is unreadable ({e})") from None

    def require(self, key: str, kind: type | tuple, what: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: missing metadata {key!r} ({what})")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise GGUFError(f"{self.path}: metadata {key!r} ({what}) must be {_kind_name(kind)}, got {value!r}")
        return value

    @property
    def arch(self) -> str:
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{self.path}: architecture {arch!r} (general.architecture) is not supported; expected "
                            f"one of {', '.join(map(repr, ARCHITECTURES))} (EXAONE 3.5 / Llama models)")
        return arch


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list"}.get(k, k.__name__)
                       for k in kinds)


def _decimal(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06): the
    shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def _type_name(t) -> str:
    return t.tensor_type.name


def _shape(t) -> tuple[int, ...]:
    """A tensor's shape in PyTorch order ([out, in]); GGUF lists dimensions innermost first."""
    return tuple(int(n) for n in reversed(t.shape.tolist()))


_LAST_OPENED: dict[tuple, _GGUFFile] = {}


def _open(path) -> _GGUFFile:
    """The parsed file, reused while it is unchanged: gguf's reader takes seconds over a 100K-token
    vocabulary, and loading a model reads the tokenizer, the weights and the generation defaults
    from the same file. Only the last file opened is kept (its tensor data stays memory-mapped)."""
    if isinstance(path, _GGUFFile):
        return path
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    except (OSError, TypeError, ValueError):
        return _GGUFFile(path)   # reports the missing file
    if key not in _LAST_OPENED:
        f = _GGUFFile(path)
        _LAST_OPENED.clear()
        _LAST_OPENED[key] = f
    return _LAST_OPENED[key]


# ---- config ----
def read_gguf_config(path) -> ExaoneConfig:
    """The ExaoneConfig of a GGUF file's model (its metadata, the embedding's shape, and the
    rope_freqs tensor when there is one)."""
    f = _open(path)
    arch = f.arch
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    layers = f.require(key("block_count"), int, "the number of layers")
    hidden = f.require(key("embedding_length"), int, "the hidden size")
    intermediate = f.require(key("feed_forward_length"), int, "the MLP's intermediate size")
    heads = f.require(key("attention.head_count"), int, "the number of attention heads")
    kv_heads = f.get(key("attention.head_count_kv"), heads)
    if isinstance(kv_heads, list):  # per-layer counts: one value for all layers is what the model has
        if len(set(kv_heads)) != 1:
            raise GGUFError(f"{f.path}: metadata {key('attention.head_count_kv')!r} gives different counts per "
                            f"layer ({kv_heads}); the model has one count for every layer")
        kv_heads = kv_heads[0]
    context = f.require(key("context_length"), int, "the context length")
    eps = f.require(key("attention.layer_norm_rms_epsilon"), (float, int), "the RMSNorm epsilon")
    theta = f.get(key("rope.freq_base"), 10000.0)   # llama.cpp's default when the key is absent
    if heads <= 0:
        raise GGUFError(f"{f.path}: metadata {key('attention.head_count')!r} must be positive, got {heads}")
    head_dim = f.get(key("attention.key_length"))
    if head_dim is None:  # llama.cpp's rule: the hidden size split over the heads
        if hidden % heads:
            raise GGUFError(f"{f.path}: embedding_length {hidden} is not a multiple of head_count {heads} and "
                            f"{key('attention.key_length')!r} is absent: the head dim is unknown")
        head_dim = hidden // heads
    value_dim = f.get(key("attention.value_length"), head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{f.path}: key_length {head_dim} and value_length {value_dim} differ; the model has one "
                        f"head dim")
    rope_dims = f.get(key("rope.dimension_count"), head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{f.path}: {key('rope.dimension_count')!r} is {rope_dims}, expected the head dim "
                        f"{head_dim} (rotary embedding over the whole head; partial rotary is not supported)")
    scaling_type = f.get(key("rope.scaling.type"), "none")
    if scaling_type not in ("none", None):
        raise GGUFError(f"{f.path}: {key('rope.scaling.type')!r} is {scaling_type!r}; supported: none, and llama3 "
                        f"scaling through the rope_freqs tensor")
    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: missing tensor 'token_embd.weight' (the token embedding)")
    embd_shape = _shape(f.tensors["token_embd.weight"])
    vocab = embd_shape[0]
    if len(embd_shape) != 2 or embd_shape[1] != hidden:
        raise GGUFError(f"{f.path}: tensor 'token_embd.weight' has shape {list(embd_shape)}, expected "
                        f"[vocab, {hidden}]")
    stated_vocab = f.get(key("vocab_size"))
    if stated_vocab is not None and stated_vocab != vocab:
        raise GGUFError(f"{f.path}: {key('vocab_size')!r} is {stated_vocab} but token_embd.weight has {vocab} rows")
    scaling = _llama3_scaling(f, head_dim, _decimal(theta)) if _ROPE_FREQS in f.tensors else None
    tokens = {kind: f.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("bos", "eos", "padding")}
    try:
        return ExaoneConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
            layer_norm_epsilon=_decimal(eps), max_position_embeddings=context, rope_theta=_decimal(theta),
            rope_scaling=scaling, tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=tokens["bos"], eos_token_id=tokens["eos"], pad_token_id=tokens["padding"])
    except ConfigError as e:
        raise GGUFError(f"{f.path}: {e}") from None


def _llama3_scaling(f: _GGUFFile, head_dim: int, theta: float) -> dict | None:
    """llama3 rope_scaling parameters that reproduce the rope_freqs tensor (llama.cpp divides
    frequency i by factors[i]); None when every factor is 1. The rule depends on the parameters only
    through factor and the two wavelength bounds original / low_freq_factor and original /
    high_freq_factor, so published combinations are tried first (clean numbers), then the bounds
    are solved from the factors between them (with low_freq_factor = 1)."""
    t = f.tensors[_ROPE_FREQS]
    if _type_name(t) != "F32" or _shape(t) != (head_dim // 2,):
        raise GGUFError(f"{f.path}: tensor {_ROPE_FREQS!r} is {_type_name(t)} of shape {list(_shape(t))}, expected "
                        f"F32 of shape [{head_dim // 2}] (one factor per rotary frequency)")
    factors = np.array(t.data, dtype=np.float64)
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())

    def fits(original: float, low: float, high: float) -> dict | None:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": original}
        try:
            base, scaled = rope_inv_freq(head_dim, theta), rope_inv_freq(head_dim, theta, scaling)
        except (TypeError, ValueError):
            return None
        ok = np.allclose((base / scaled).numpy(), factors, rtol=2e-5, atol=0)
        return scaling if ok else None

    if factor == round(factor):
        factor = float(round(factor))
    for original in (8192, 4096, 16384, 2048, 32768, 1024, 65536, 512, 256, 128):
        for high in (4.0, 2.0, 8.0, 16.0, 32.0):
            if (found := fits(original, 1.0, high)) is not None:
                return found
    # Solve: with s_i = (1 / f_i - 1 / factor) / (1 - 1 / factor) for the factors strictly between 1
    # and factor, s_i = original / wavelen_i / (high - 1) - 1 / (high - 1) (low_freq_factor = 1).
    inv = rope_inv_freq(head_dim, theta).numpy()
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if middle.sum() >= 2:
        s = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv[middle] / (2 * math.pi), s, 1)
        if b < 0:
            high = 1 - 1 / b
            original = a * (high - 1)
            if (found := fits(float(round(original, 3)), 1.0, float(round(high, 6)))) is not None:
                return found
    raise GGUFError(f"{f.path}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors that no llama3 scaling "
                    f"reproduces (factors {np.round(factors, 4).tolist()})")


# ---- tensors ----
def _expected(config: ExaoneConfig) -> dict[str, tuple[int, ...]]:
    """{EXAONE name: shape} of every tensor a GGUF file must hold for `config`."""
    return {n: tuple(s) for n, s in config.parameter_shapes().items()}


def _plan(f: _GGUFFile, config: ExaoneConfig) -> dict[str, object]:
    """{EXAONE name: GGUF tensor} for every tensor of the model; raises GGUFError for a missing,
    unexpected, misshapen or unsupported tensor."""
    expected = _expected(config)
    plan = {}
    for name, t in f.tensors.items():
        if name == _ROPE_FREQS:
            continue
        try:
            ours = gguf_to_exaone_name(name)
        except KeyError:
            ours = None
        if ours not in expected:
            raise GGUFError(f"{f.path}: unexpected tensor {name!r} (not part of a {f.arch} model with "
                            f"{config.num_layers} layers as this package runs it)")
        if _type_name(t) not in TENSOR_TYPES:
            raise GGUFError(f"{f.path}: tensor {name!r} has type {_type_name(t)}, which this package cannot load "
                            f"(supported: {', '.join(TENSOR_TYPES)})")
        if _shape(t) != expected[ours]:
            raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(_shape(t))}, the model needs "
                            f"{list(expected[ours])} (from the file's metadata)")
        plan[ours] = t
    for ours, shape in expected.items():
        if ours not in plan:
            raise GGUFError(f"{f.path}: missing tensor {_exaone_to_gguf_name(ours)!r} (expected shape {list(shape)}, "
                            f"the model's {ours}) in this {f.arch} file with {config.num_layers} layers")
    return plan


def _raw(t) -> np.ndarray:
    """The tensor's bytes or values, copied out of the memory map (writable, so torch can share it)."""
    return np.array(t.data, copy=True)


def _blocks(t) -> torch.Tensor:
    """A Q8_0 / Q4_0 tensor's blocks as uint8 [rows, blocks per row, bytes per block]."""
    shape = _shape(t)
    return _rows_as_blocks(_raw(t).reshape(math.prod(shape[:-1]), -1), _type_name(t))


def _rows_as_blocks(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(raw).reshape(raw.shape[0], -1, _BLOCK_BYTES[kind])


def _q4_0(t) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 [out, in] -> (qweight uint8 [out, in / 2] in the package's int4 packing, scales float16
    [out, in / 32]); the zero point is 8 everywhere."""
    return _q4_0_blocks(_blocks(t))


def _q4_0_blocks(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = b.shape[0]
    scales = b[..., :2].contiguous().view(torch.float16).reshape(rows, -1)
    return b[..., 2:].reshape(rows, -1).contiguous(), scales


def _dequantize_rows(t, raw: np.ndarray) -> torch.Tensor:
    """Rows of a block-quantized tensor (uint8 [rows, bytes per row], memory-mapped) -> float32
    [rows, inputs], where every type's values are exact."""
    kind = _type_name(t)
    if kind == "Q8_0":
        b = _rows_as_blocks(np.array(raw), kind)
        d = b[..., :2].contiguous().view(torch.float16).float()                  # [rows, blocks, 1]
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(raw.shape[0], -1)
    if kind == "Q4_0":
        q, s = _q4_0_blocks(_rows_as_blocks(np.array(raw), kind))
        return dequantize_int4(q, s, torch.full(s.shape, 8, dtype=torch.uint8), INT4_BLOCK)
    from gguf.quants import dequantize
    return torch.from_numpy(dequantize(raw, t.tensor_type))


def _dense(t, dtype: torch.dtype) -> torch.Tensor:
    """Any supported tensor as a dense one in `dtype`. Block types are dequantised in float32 (where
    their values are exact) _CHUNK elements at a time into the returned tensor."""
    kind, shape = _type_name(t), _shape(t)
    if kind == "F32":
        return torch.from_numpy(_raw(t).astype(np.float32, copy=False)).reshape(shape).to(dtype)
    if kind == "F16":
        return torch.from_numpy(_raw(t).view(np.float16)).reshape(shape).to(dtype)
    if kind == "BF16":
        return torch.from_numpy(_raw(t).view(np.int16)).view(torch.bfloat16).reshape(shape).to(dtype)
    if kind not in TENSOR_TYPES:  # _plan has refused it already
        raise GGUFError(f"tensor {t.name!r}: unsupported type {kind}")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    data = t.data.reshape(rows, -1)
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, _CHUNK // cols)
    for start in range(0, rows, step):
        out[start:start + step] = _dequantize_rows(t, data[start:start + step])
    return out.reshape(shape)


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's llama Q/K permutation on [n_heads * head_dim, ...] rows: within each head,
    row 2j + t of the file is row t * head_dim / 2 + j of the Hugging Face (rotate-half) layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _default_dtype(plan: dict) -> torch.dtype:
    """The float type of the token embedding; bfloat16 when it is block-quantized (see the module
    docstring for why)."""
    return _FLOAT_TYPES.get(_type_name(plan["transformer.wte.weight"]), torch.bfloat16)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    # Q4_0's fp16 scales are exact in float16 and float32, not in bfloat16
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _rows_of(name: str, config: ExaoneConfig, arch: str) -> int | None:
    """The head count whose rows llama.cpp permuted in this tensor (llama Q and K), else None."""
    if arch != "llama":
        return None
    if name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if name.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None


def _is_projection(name: str) -> bool:
    m = _EXAONE_LAYER.fullmatch(name)
    return m is not None and m.group(2).removesuffix(".weight") in _PROJECTIONS


def _convert(t, name: str, config: ExaoneConfig, arch: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One GGUF tensor -> the model's tensors for it: {'weight': dense} or, for a Q4_0 projection,
    {'qweight', 'scales', 'qzeros'} of an int4 QuantLinear (group_size 32)."""
    heads = _rows_of(name, config, arch)
    if _type_name(t) == "Q4_0" and _is_projection(name):
        q, s = _q4_0(t)
        if heads is not None:
            q, s = _unpermute_rows(q, heads), _unpermute_rows(s, heads)
        return {"qweight": q, "scales": s.to(_scale_dtype(dtype)), "qzeros": torch.full(s.shape, 8, dtype=torch.uint8)}
    w = _dense(t, dtype)
    return {"weight": _unpermute_rows(w, heads) if heads is not None else w}


def _quantization(plan: dict) -> dict | None:
    """config.json's quantization_config for the projections stored as Q4_0 (int4, group 32);
    the others are listed in modules_to_not_convert. None without Q4_0 projections."""
    from .quant import quantization_config
    projections = [n for n in plan if _is_projection(n)]
    q4 = [n for n in projections if _type_name(plan[n]) == "Q4_0"]
    if not q4:
        return None
    qc = quantization_config(4, INT4_BLOCK)
    dense = sorted(n.removesuffix(".weight") for n in projections if n not in q4)
    if dense:
        qc["modules_to_not_convert"] = dense
    return qc


def load_gguf(path, dtype: torch.dtype | None = None, device=None, progress=False, use_kernels: bool = True):
    """ExaoneForCausalLM from a GGUF file (see the module docstring for what each tensor type
    becomes). dtype: the model's float dtype (default: the token embedding's, bfloat16 when it is
    block-quantized); progress as for from_pretrained."""
    from .modeling import ExaoneForCausalLM
    from .quant import QuantLinear, finish_checkpoint

    f = _open(path)
    config = read_gguf_config(f)
    plan = _plan(f, config)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_gguf: dtype must be a floating torch.dtype, got {dtype!r}")
    dtype = dtype or _default_dtype(plan)
    device = torch.device("cpu" if device is None else device)
    qc = _quantization(plan)
    if qc is not None:
        config.extra["quantization_config"] = qc
    with torch.device("meta"):
        model = ExaoneForCausalLM(config, use_kernels=use_kernels)
    for name, t in plan.items():
        if _type_name(t) == "Q4_0" and _is_projection(name):
            parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
            lin = model.get_submodule(f"{parent_name}.{attr}")
            setattr(model.get_submodule(parent_name), attr,
                    QuantLinear(lin.in_features, lin.out_features, 4, INT4_BLOCK, use_kernels, device="meta",
                                dtype=_scale_dtype(dtype)))
    bar = _Progress(progress, sum(int(t.n_bytes) for t in plan.values()), f"loading {os.path.basename(f.path)}")
    for name, t in plan.items():
        module_name = name.removesuffix(".weight")
        for attr, value in _convert(t, name, config, f.arch, dtype).items():
            _set_tensor(model, f"{module_name}.{attr}", value.to(device), requires_grad=value.is_floating_point()
                        and attr == "weight")
        bar.update(int(t.n_bytes), t.name)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    if device.type == "cpu":
        model.hugepage_weights()
    model.init_rope(device)
    model.generation_config = gguf_generation_config(f)
    model.loaded_naming = "gguf"
    finish_checkpoint(model)
    return model.eval()


def gguf_generation_config(path) -> dict:
    """generation_config.json contents for a GGUF file: the special token ids, and the sampling
    defaults of general.sampling.* where the file has them (Hugging Face key names)."""
    f = _open(path)
    out = {}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = f.get(f"tokenizer.ggml.{kind}_token_id")
        if isinstance(value, int):
            out[key] = value
    sampling = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                "penalty_repeat": "repetition_penalty"}
    for gguf_key, hf_key in sampling.items():
        value = f.get(f"general.sampling.{gguf_key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[hf_key] = _decimal(value) if isinstance(value, float) else value
    if "temperature" in out:
        out["do_sample"] = out["temperature"] > 0
    return out


# ---- tokenizer ----
def gguf_tokenizer(path):
    """The ExaoneTokenizer of a GGUF file's tokenizer.* metadata: byte-level BPE ('gpt2' model)
    with its tokens, merges and token types (control tokens become special tokens, user-defined
    ones added tokens), the split rule named by tokenizer.ggml.pre, the special token ids and the
    chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from ..tokenizer import ExaoneTokenizer

    f = _open(path)
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE, as EXAONE and "
                        f"Llama 3 use) is supported")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{f.path}: tokenizer.ggml.pre is {pre!r}, a split rule this package does not know; "
                        f"supported: {', '.join(f'{k!r} ({v})' for k, v in _PRE_TOKENIZERS.items())}")
    tokens = f.require("tokenizer.ggml.tokens", list, "the vocabulary")
    merges = f.require("tokenizer.ggml.merges", list, "the BPE merges")
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise GGUFError(f"{f.path}: token {token!r} appears twice in tokenizer.ggml.tokens (ids {vocab[token]} "
                            f"and {i})")
        vocab[token] = i
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{f.path}: tokenizer.ggml.merges[{i}] is {merge!r}, expected two tokens separated by "
                            f"one space")
        pairs.append((parts[0], parts[1]))
    llama3 = pre in ("llama-bpe", "llama3")
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=None, fuse_unk=False, byte_fallback=False,
                               ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if pre == "exaone":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == _USER_DEFINED])

    def special(kind):
        tid = f.get(f"tokenizer.ggml.{kind}_token_id")
        if tid is None:
            return None
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise GGUFError(f"{f.path}: tokenizer.ggml.{kind}_token_id is {tid!r}, not a token id below "
                            f"{len(tokens)}")
        return tokens[tid]

    bos, eos = special("bos"), special("eos")
    if f.get("tokenizer.ggml.add_bos_token") is True and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    try:
        return ExaoneTokenizer(tok, eos_token=eos, bos_token=bos, pad_token=special("padding"),
                               unk_token=special("unknown"), chat_template=f.get("tokenizer.chat_template"))
    except ValueError as e:
        raise GGUFError(f"{f.path}: {e}") from None


# ---- summary and conversion ----
def gguf_info(path) -> dict:
    """What checkpoint_info gives for a directory, for a GGUF file (from its header; no tensor data
    read): naming 'gguf', config, tensors with their GGUF types, parameter count, bytes."""
    f = _open(path)
    config = read_gguf_config(f)
    plan = _plan(f, config)
    dtypes: dict[str, int] = {}
    for t in plan.values():
        dtypes[_type_name(t)] = dtypes.get(_type_name(t), 0) + int(t.n_elements)
    main = _default_dtype(plan)
    elem = main.itemsize
    order = {n: i for i, n in enumerate(_expected(config))}
    return {
        "path": os.path.abspath(f.path),
        "naming": "gguf",
        "architecture": f.arch,
        "config": config.to_dict(),
        "num_parameters": sum(int(t.n_elements) for t in plan.values()),
        "dtypes": dtypes,
        "files": [os.path.basename(f.path)],
        "file_bytes": os.path.getsize(f.path),
        "weight_bytes": sum(int(t.n_bytes) for t in plan.values()),
        "kv_cache_dtype": _dtype_name(main),
        "kv_cache_bytes_per_token": config.kv_cache_bytes(1, 1, elem),
        "kv_cache_bytes": config.kv_cache_bytes(1, config.max_position_embeddings, elem),
        "tied_word_embeddings": config.tie_word_embeddings,
        "tensors": [{"name": t.name, "shape": list(_shape(t)), "dtype": _type_name(t), "file": os.path.basename(f.path)}
                    for n, t in sorted(plan.items(), key=lambda kv: order[kv[0]])],
    }


def convert_gguf(src, dst, naming: str = "exaone", dtype: torch.dtype | None = None, max_shard_size="5GB",
                 progress=False) -> None:
    """Write the GGUF file `src` as a checkpoint directory `dst` (config.json, generation_config.json,
    safetensors with `naming` 'exaone' or 'llama' tensor names, and the tokenizer files), atomically.
    Q4_0 projections are stored in the package's int4 format; see load_gguf for the rest."""
    if naming not in ("exaone", "llama"):
        raise ValueError(f"convert_gguf: naming must be 'exaone' or 'llama', got {naming!r}")
    f = _open(src)
    tokenizer = gguf_tokenizer(f)
    model = load_gguf(f, dtype=dtype, progress=progress)
    with tempfile.TemporaryDirectory(prefix="exaone-ext-gguf-") as tmp:
        files = tokenizer.save_pretrained(tmp)
        save_model(model, dst, max_shard_size=max_shard_size, naming=naming, progress=progress, extra_files=files)

