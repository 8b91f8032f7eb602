"""The model's linear layer as a module that owns its weight and calls the op.

A projection of the model can be replaced by any module with the same `forward(x)` contract
(a quantized linear, say) with `setattr`; `linear_group` then falls back to calling each module."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops as _kernel_ops
from ..ops import reference as _reference_ops


class Linear(nn.Module):
    """y = x @ weight.T without bias. weight [out_features, in_features] (the checkpoint's layout).
    `use_kernels` (set by the model for all its layers) picks exaone_ext.ops.linear or the reference."""

    def __init__(self, in_features: int, out_features: int, use_kernels: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_kernels = use_kernels
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if not self.weight.is_meta:
            nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        return (_kernel_ops if self.use_kernels else _reference_ops).linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def linear_group(x: torch.Tensor, modules: list[nn.Module], ops) -> torch.Tensor:
    """The outputs of several projections of the same input, concatenated along the last dim:
    [..., sum of out_features]. One ops.linear_cat (a single pass over x for all the weights) when
    every module is a plain Linear; modules of another type that has a `grouped(x, modules, ops)`
    static method (the quantized linear) go through it when it takes them (it returns None when it
    does not); else each module is called in turn."""
    if all(type(m) is Linear for m in modules):
        return ops.linear_cat(x, [m.weight for m in modules])
    grouped = getattr(type(modules[0]), "grouped", None)
    if grouped is not None:
        out = grouped(x, modules, ops)
        if out is not None:
            return out
    return torch.cat([m(x) for m in modules], dim=-1)
