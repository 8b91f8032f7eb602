"""GenerationConfig: the decoding controls, validated when built."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    max_new_tokens: at most this many tokens per sequence (also bounded by the model's context).
    do_sample: False = greedy (argmax after the repetition penalty; temperature/top_k/top_p/min_p
        are then ignored). True = sample from softmax(logits / temperature) restricted by
        top_k (0 = off), top_p (1.0 = off) and min_p (0.0 = off), applied in that order.
        temperature 0 with do_sample is greedy.
    repetition_penalty: > 1 discourages every token already in the prompt or the output
        (positive logits divided by it, negative ones multiplied), as in CTRL / Hugging Face.
    stop_token_ids: stop when one of these is produced (not included in the result). None =
        the tokenizer's end-of-turn token ([|endofturn|]) and the model config's eos_token_id.
    stop_strings: stop when the decoded text contains one of these; the text is cut before it.
    seed: makes sampling reproducible (same seed, prompts and batch -> same tokens).
    cuda_graphs: on a GPU, generate / stream replay the decode step as CUDA graphs (False: every
        step launched op by op). An Engine takes its own `cuda_graphs` argument instead.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    cuda_graphs: bool = True

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"GenerationConfig.do_sample: expected bool, got {type(self.do_sample).__name__}")
        if not _is_number(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"GenerationConfig.temperature: expected a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p: expected a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"GenerationConfig.min_p: expected a number in [0, 1] (0 = off), got {self.min_p!r}")
        if (not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0
                or self.repetition_penalty == float("inf")):
            raise ValueError(f"GenerationConfig.repetition_penalty: expected a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if self.stop_token_ids is not None:
            if _is_int(self.stop_token_ids):
                self.stop_token_ids = [self.stop_token_ids]
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise TypeError(f"GenerationConfig.stop_token_ids: expected a list of ints, "
                                f"got {type(self.stop_token_ids).__name__}")
            self.stop_token_ids = list(self.stop_token_ids)
            for i, t in enumerate(self.stop_token_ids):
                if not _is_int(t) or t < 0:
                    raise ValueError(f"GenerationConfig.stop_token_ids[{i}]: expected a token id >= 0, got {t!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is None:
            self.stop_strings = []
        self.stop_strings = list(self.stop_strings)
        for i, s in enumerate(self.stop_strings):
            if not isinstance(s, str) or not s:
                raise ValueError(f"GenerationConfig.stop_strings[{i}]: expected a non-empty string, got {s!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"GenerationConfig.cuda_graphs: expected bool, got {type(self.cuda_graphs).__name__}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"GenerationConfig.seed: expected an int or None, got {type(self.seed).__name__}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, defaults: dict | None = None,
                        **overrides) -> "GenerationConfig":
        """`defaults`, then what a checkpoint's generation_config.json sets (Hugging Face keys; the
        ones this class does not have are ignored; for a GGUF file, its general.sampling.* keys),
        then `overrides`."""
        from ..model.gguf import gguf_generation_config, is_gguf_path

        file = Path(path) / "generation_config.json" if Path(path).is_dir() else Path(path)
        values: dict = dict(defaults or {})
        if is_gguf_path(path):
            known = {f for f in cls.__dataclass_fields__}
            values.update({k: v for k, v in gguf_generation_config(path).items() if k in known})
        elif file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{file}: not a readable JSON file ({e})") from e
            known = {f for f in cls.__dataclass_fields__}
            values.update({k: v for k, v in data.items() if k in known and v is not None})
        values.update(overrides)
        return cls(**values)
