"""Training-data tools: decontamination against benchmark test sets.

    from exaone_ext.data import DecontaminationPool, decontaminate, normalize
"""
from __future__ import annotations

from .decontaminate import (DecontaminationPool, Match, decontaminate, normalize, read_test_set)

__all__ = ["DecontaminationPool", "Match", "decontaminate", "normalize", "read_test_set"]
