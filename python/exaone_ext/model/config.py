"""ExaoneConfig: the fields of an EXAONE 3.5 config.json, the published presets, and the mapping to
and from the equivalent Llama config (the two models compute the same function)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..ops.reference.rope import parse_rope_scaling

# config.json key spellings: EXAONE name -> Llama name (the only keys that differ)
_EXAONE_TO_LLAMA_KEYS = {
    "num_layers": "num_hidden_layers",
    "activation_function": "hidden_act",
    "layer_norm_epsilon": "rms_norm_eps",
}
_LLAMA_TO_EXAONE_KEYS = {v: k for k, v in _EXAONE_TO_LLAMA_KEYS.items()}

# keys every transformers config carries that say nothing about the model
_GENERIC_HF_KEYS = ("pretraining_tp", "id2label", "label2id", "output_hidden_states", "output_attentions",
                    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_name_or_path")

_LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Published shapes of the three EXAONE 3.5 models.
_PRESETS = {
    "2.4b": dict(hidden_size=2560, num_layers=30, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=80, intermediate_size=7168, tie_word_embeddings=True),
    "7.8b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, num_layers=64, num_attention_heads=40, num_key_value_heads=8,
                head_dim=128, intermediate_size=27392, tie_word_embeddings=False),
}


class ConfigError(ValueError):
    """A config.json that cannot describe an EXAONE model (wrong model_type, inconsistent shapes)."""


@dataclass
class ExaoneConfig:
    """Every field of EXAONE 3.5's config.json. Defaults are those of the 2.4B model, except that
    `head_dim` defaults to hidden_size // num_attention_heads. Keys this class does not know are
    kept in `extra` and written back by `to_dict()`."""

    vocab_size: int = 102400
    hidden_size: int = 2560
    num_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    intermediate_size: int = 7168
    activation_function: str = "silu"
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_scaling: dict | None = field(default_factory=lambda: dict(_LLAMA3_SCALING))
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 361
    pad_token_id: int | None = 0
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    embed_dropout: float = 0.0
    use_cache: bool = True
    torch_dtype: str | None = None
    model_type: str = "exaone"
    architectures: list[str] = field(default_factory=lambda: ["ExaoneForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                  f"{self.num_attention_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.activation_function != "silu":
            raise ConfigError(f"activation_function must be 'silu' (SwiGLU), got {self.activation_function!r}")
        try:
            parse_rope_scaling(self.rope_scaling, "config", "rope_scaling")
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    # ---- derived sizes ----
    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model this config describes (the tied head counted once)."""
        return sum(math.prod(shape) for shape in self.parameter_shapes().values())

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """{EXAONE tensor name: shape} of every parameter (the tied head once, as the embedding)."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        layer = {"ln_1.weight": (d,), "attn.attention.q_proj.weight": (q, d), "attn.attention.k_proj.weight": (kv, d),
                 "attn.attention.v_proj.weight": (kv, d), "attn.attention.out_proj.weight": (d, q),
                 "ln_2.weight": (d,), "mlp.c_fc_0.weight": (i, d), "mlp.c_fc_1.weight": (i, d),
                 "mlp.c_proj.weight": (d, i)}
        shapes = {"transformer.wte.weight": (self.vocab_size, d)}
        for n in range(self.num_layers):
            shapes.update({f"transformer.h.{n}.{k}": v for k, v in layer.items()})
        shapes["transformer.ln_f.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def kv_cache_bytes(self, batch_size: int = 1, seq_len: int | None = None, element_size: int = 2) -> int:
        """Bytes of a KV cache for `batch_size` rows of `seq_len` tokens (default: the full context)."""
        seq_len = self.max_position_embeddings if seq_len is None else seq_len
        return 2 * self.num_layers * batch_size * seq_len * self.num_key_value_heads * self.head_dim * element_size

    # ---- construction ----
    @classmethod
    def preset(cls, name: str, **overrides) -> "ExaoneConfig":
        """The published shapes of EXAONE 3.5 '2.4b', '7.8b' or '32b' (any field can be overridden)."""
        key = name.lower().replace("exaone-3.5-", "")
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, d: dict, allow_llama: bool = False) -> "ExaoneConfig":
        """From a config.json dict. model_type must be 'exaone' ('llama' too when `allow_llama`, with the
        Llama key spellings mapped). `num_hidden_layers` is accepted for `num_layers`."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "llama":
            if not allow_llama:
                raise ConfigError("config model_type is 'llama', not 'exaone' (load it as a Llama-named checkpoint "
                                  "or convert it with exaone_ext.model.convert_checkpoint)")
            return cls._from_llama_dict(d)
        if model_type != "exaone":
            raise ConfigError(f"config model_type must be 'exaone'{' or llama' if allow_llama else ''}, "
                              f"got {model_type!r}: this is not an EXAONE checkpoint")
        d = dict(d)
        if "num_hidden_layers" in d:
            n = d.pop("num_hidden_layers")
            if "num_layers" in d and d["num_layers"] != n:
                raise ConfigError(f"config has num_layers={d['num_layers']} and num_hidden_layers={n}")
            d["num_layers"] = n
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def _from_llama_dict(cls, d: dict) -> "ExaoneConfig":
        d = dict(d)
        for flag in ("attention_bias", "mlp_bias"):
            if d.pop(flag, False):
                raise ConfigError(f"Llama config has {flag}=true; EXAONE has no biases")
        # transformers >= 5 writes rope_theta and the scaling together as rope_parameters
        rope = d.pop("rope_parameters", None)
        if rope:
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rope)
        if "dtype" in d:
            d.setdefault("torch_dtype", d.pop("dtype"))
        for k in _GENERIC_HF_KEYS:
            d.pop(k, None)
        out = {_LLAMA_TO_EXAONE_KEYS.get(k, k): v for k, v in d.items()}
        # Llama's tie_word_embeddings defaults to false, EXAONE's to true: make it explicit
        out["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
        out.setdefault("activation_function", "silu")
        out.setdefault("layer_norm_epsilon", 1e-6)  # LlamaConfig's default
        out.setdefault("rope_theta", 10000.0)
        out.setdefault("rope_scaling", None)
        out["model_type"] = "exaone"
        out["architectures"] = ["ExaoneForCausalLM"]
        return cls.from_dict(out)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, allow_llama: bool = False) -> "ExaoneConfig":
        """Read `path/config.json` (or `path` itself when it is a file)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d, allow_llama=allow_llama)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{file}: {e}") from None

    # ---- serialisation ----
    def to_dict(self) -> dict:
        """config.json contents with EXAONE's key spellings, unknown keys included."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["torch_dtype"] is None:
            del d["torch_dtype"]
        d.update(copy.deepcopy(self.extra))
        return dict(sorted(d.items()))

    def to_llama_dict(self) -> dict:
        """The equivalent Hugging Face LlamaConfig dict (LlamaForCausalLM computes the same function)."""
        d = {_EXAONE_TO_LLAMA_KEYS.get(k, k): v for k, v in self.to_dict().items()}
        for k in ("auto_map", "embed_dropout"):
            d.pop(k, None)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
                 tie_word_embeddings=self.tie_word_embeddings, pretraining_tp=1)
        return dict(sorted(d.items()))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
