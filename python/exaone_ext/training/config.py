"""Training recipes as small TOML files; a key the schema does not know is an error naming it.

    [model]
    path = "checkpoints/exaone-tiny"      # Hugging Face-layout checkpoint to start from

    [data]
    files = ["corpus.jsonl"]              # .txt (documents separated by empty lines) or .jsonl
    field = "text"
    seq_len = 1024
    # stage 2: replay_files = ["stage1.jsonl"], replay_fraction = 0.25, replay_len = 512

    [train]
    out_dir = "runs/stage1"
    steps = 1000
    batch_size = 16                       # rows (preference: pairs) per optimizer step, all processes
    micro_batch = 4                       # rows (pairs) per forward on one process
    lr = 3e-4

Paths in the file are relative to the file's directory.
"""
from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass

__all__ = ["ConfigError", "SCHEMA", "load_config", "check_config"]


class ConfigError(ValueError):
    """A bad recipe; the message names the file and the key."""


_LIST = "list"
# section -> key -> (types, default); default REQUIRED means the key must be given
REQUIRED = object()
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {"path": (str, REQUIRED), "use_kernels": (bool, True)},
    "data": {
        "files": ((str, list), REQUIRED), "field": (str, None), "split": (str, "paragraph"),
        "seq_len": (int, 1024), "replay_files": ((str, list), None), "replay_fraction": ((float, int), 0.0),
        "replay_len": (int, None),
    },
    "train": {
        "out_dir": (str, REQUIRED), "steps": (int, REQUIRED), "batch_size": (int, 8), "micro_batch": (int, 1),
        "lr": ((float, int), 3e-4), "min_lr_ratio": ((float, int), 0.1), "warmup_steps": (int, 0),
        "weight_decay": ((float, int), 0.0), "betas": (list, [0.9, 0.95]), "eps": ((float, int), 1e-8),
        "grad_clip": ((float, int), 1.0), "seed": (int, 0), "precision": (str, "auto"),
        "activation_checkpointing": (bool, False), "save_every": (int, 0), "keep_checkpoints": (int, 2),
        "log_every": (int, 1), "distributed": (str, "ddp"), "device": (str, "auto"), "progress": (bool, True),
        "plot": (bool, True), "keep_freed_memory": (bool, True),
    },
    "preference": {
        "beta": ((float, int), None), "gamma": ((float, int), 0.5), "stages": (int, 1),
        "candidates": (int, 0), "scorer": (str, None), "max_new_tokens": (int, 64),
        "temperature": ((float, int), 1.0), "top_p": ((float, int), 1.0),
    },
}


@dataclass
class Section:
    """Attribute access to one section's values."""
    _values: dict

    def __getattr__(self, key):
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None


def _base_dir(path: str | None) -> str:
    return os.path.dirname(os.path.abspath(path)) if path else os.getcwd()


def check_config(raw: dict, source: str = "<config>", base_dir: str | None = None) -> dict[str, Section]:
    """The recipe `raw` (a dict of sections) checked against SCHEMA, defaults filled, paths made
    absolute relative to `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(raw).__name__}")
    base_dir = base_dir or os.getcwd()
    out = {}
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SCHEMA)})")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in keys:
                raise ConfigError(f"{source}: unknown key {key!r} in [{section}] (known: {', '.join(keys)})")
        values = {}
        for key, (types, default) in keys.items():
            if key not in given:
                if default is REQUIRED:
                    raise ConfigError(f"{source}: [{section}] needs {key!r}")
                values[key] = copy.deepcopy(default)
                continue
            value = given[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
                raise ConfigError(f"{source}: [{section}] {key} must be {_type_names(types)}, "
                                  f"got {value!r}")
            values[key] = value
        out[section] = values
    for key in ("files", "replay_files"):
        v = out["data"][key]
        if v is not None:
            v = [v] if isinstance(v, str) else v
            if not v or not all(isinstance(f, str) for f in v):
                raise ConfigError(f"{source}: [data] {key} must be a path or a non-empty list of paths")
            out["data"][key] = [os.path.join(base_dir, f) for f in v]
    out["model"]["path"] = os.path.join(base_dir, out["model"]["path"])
    out["train"]["out_dir"] = os.path.join(base_dir, out["train"]["out_dir"])
    t = out["train"]
    for key in ("steps", "batch_size", "micro_batch", "log_every"):
        if t[key] < 1:
            raise ConfigError(f"{source}: [train] {key} must be >= 1, got {t[key]}")
    if t["precision"] not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"{source}: [train] precision must be 'auto', 'fp32' or 'bf16', got {t['precision']!r}")
    if t["distributed"] not in ("ddp", "fsdp"):
        raise ConfigError(f"{source}: [train] distributed must be 'ddp' or 'fsdp', got {t['distributed']!r}")
    if len(t["betas"]) != 2:
        raise ConfigError(f"{source}: [train] betas must be two numbers, got {t['betas']!r}")
    if out["data"]["split"] not in ("paragraph", "line"):
        raise ConfigError(f"{source}: [data] split must be 'paragraph' or 'line', got {out['data']['split']!r}")
    if out["preference"]["stages"] < 1:
        raise ConfigError(f"{source}: [preference] stages must be >= 1")
    result = {name: Section(values) for name, values in out.items()}
    result["source"] = source
    return result


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join({str: "a string", int: "an integer", float: "a number", bool: "true/false",
                        list: "a list"}[t] for t in _as_tuple(types))


def load_config(path: str | os.PathLike) -> dict[str, Section]:
    """Read and check a recipe TOML file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return check_config(raw, path, _base_dir(path))
