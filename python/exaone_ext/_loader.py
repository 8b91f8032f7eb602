"""Loads the compiled extension, refusing clearly when it was built for another torch."""
from __future__ import annotations

import importlib

import torch

_REBUILD = (
    "Rebuild exaone_ext against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps ."
)


def load_extension():
    try:
        config = importlib.import_module("exaone_ext._build_config")
    except ImportError as e:  # running from a source tree that was never built
        raise ImportError(
            "exaone_ext's compiled extension is missing (no exaone_ext/_build_config.py). Install the "
            "package with `pip install --no-build-isolation .` rather than importing it from the "
            "source tree."
        ) from e
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"exaone_ext was built against torch {config.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed; its compiled kernels cannot be loaded. {_REBUILD}"
        )
    try:
        return importlib.import_module("exaone_ext._C")
    except ImportError as e:
        raise ImportError(f"exaone_ext's compiled extension failed to load: {e}. {_REBUILD}") from e
