"""Linear layer without bias, as nn.Linear(bias=False) computes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out]."""
    return F.linear(x, weight)


def linear_cat(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x [..., in] @ cat(weights).T -> [..., sum of out_i]: each weight's outputs in turn."""
    return torch.cat([F.linear(x, w) for w in weights], dim=-1)
