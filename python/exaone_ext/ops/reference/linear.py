"""Linear layer without bias, as nn.Linear(bias=False) computes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out]."""
    return F.linear(x, weight)
