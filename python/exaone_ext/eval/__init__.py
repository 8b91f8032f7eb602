"""Evaluation tools: needle-in-a-haystack long-context retrieval.

    from exaone_ext.eval import run_niah, build_haystack, filler_sentences
"""
from __future__ import annotations

from .filler import filler_sentences
from .niah import (CODE_TASK, Haystack, NiahConfig, NiahTask, build_haystack, file_filler, get_task, make_needle,
                   run_niah, score_answer)

__all__ = ["filler_sentences", "Haystack", "NiahConfig", "NiahTask", "CODE_TASK", "get_task", "file_filler",
           "build_haystack", "make_needle", "run_niah", "score_answer"]
