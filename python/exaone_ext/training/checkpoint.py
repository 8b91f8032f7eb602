"""Training checkpoints: the model in the Hugging Face layout plus everything a resumed run needs.

    out_dir/checkpoint-000200/   config.json, model.safetensors, tokenizer files, trainer_state.pt
    out_dir/latest               "checkpoint-000200"

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a run killed while saving leaves the previous checkpoint as
the latest one.
"""
from __future__ import annotations

import os
import shutil

import torch

from ..model.checkpoint import _fsync_file as _fsync_dir  # opens and syncs a file or a directory

__all__ = ["TOKENIZER_FILES", "save_checkpoint", "latest_checkpoint", "load_trainer_state"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, name: str, save_model, state: dict, tokenizer_dir: str | None,
                    keep: int = 2) -> str:
    """Write checkpoint `name` in `out_dir`: save_model(dir) writes the weights, `state` goes to
    trainer_state.pt, tokenizer files are copied from `tokenizer_dir`. Keeps the `keep` newest
    checkpoint-* directories (0: all). Returns the checkpoint's path."""
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp)
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, f)):
                shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    with open(os.path.join(tmp, "trainer_state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a checkpoint of the same name from an earlier run: replace it
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(out_dir)
    if name.startswith("checkpoint-"):
        _write_atomic(os.path.join(out_dir, "latest"), (name + "\n").encode())
        if keep > 0:
            ckpts = sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-"))
            for d in ckpts[:-keep]:
                shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint `latest` names in out_dir, or None when there is none."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    path = os.path.join(out_dir, open(pointer).read().strip())
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"{pointer}: names {path}, which holds no trainer_state.pt")
    return path


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
