"""The demo model: a tiny bilingual (English and Korean) EXAONE trained by the package's own recipe.

    from exaone_ext.demo_model import load, WEIGHTS
    model, tokenizer = load()                       # the shipped weights (bfloat16 on disk, float32 here)

It knows a synthetic world of forty people (world.py): where they live, their jobs, their pets;
recipe.py is the EXAONE 3.5 recipe at toy scale that made it (`make train-demo`), evaluate.py what
is measured after each stage, and WEIGHTS / "recipe_results.json" the numbers of the shipped run.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["WEIGHTS", "load", "recipe_results"]

WEIGHTS = Path(__file__).resolve().parent / "weights"


def load(path: str | Path | None = None, dtype=None):
    """(ExaoneForCausalLM in eval mode, ExaoneTokenizer) of the demo model at `path` (default: shipped)."""
    import torch

    from ..model import ExaoneForCausalLM
    from ..tokenizer import ExaoneTokenizer
    path = Path(path) if path is not None else WEIGHTS
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"demo model: no checkpoint at {path} (run `make train-demo` to make one)")
    model = ExaoneForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, ExaoneTokenizer.from_pretrained(path)


def recipe_results(path: str | Path | None = None) -> dict:
    """The numbers the recipe measured when it made the model at `path` (default: shipped)."""
    path = Path(path) if path is not None else WEIGHTS
    return json.loads((path / "recipe_results.json").read_text())
