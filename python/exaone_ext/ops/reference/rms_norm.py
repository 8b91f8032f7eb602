from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """EXAONE's RMSNorm: normalise in float32, cast back to x's dtype, then apply the weight;
    the result is in x's dtype. x [..., hidden], weight [hidden]."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(compute)
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (in x's dtype), y = rms_norm(h). Returns (y, h)."""
    h = x + residual
    return rms_norm(h, weight, eps), h
