from __future__ import annotations

import math

import torch


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def parse_rope_scaling(scaling, where: str, name: str = "scaling") -> tuple[float, float, float, float] | None:
    """The one reading of a config.json rope_scaling: None (no scaling: None, 'default') or the
    llama3 (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    TypeError / ValueError naming `where` and `name` otherwise."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"{where}: '{name}' must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"{where}: unsupported {name} type: rope_type must be 'llama3' or 'default', got {kind!r}")
    missing = [key for key in _LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"{where}: llama3 {name} is missing {', '.join(map(repr, missing))}")
    try:
        factor, low, high, original = (float(scaling[key]) for key in _LLAMA3_KEYS)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: llama3 {name} values must be numbers: {e}") from None
    if not factor > 0:
        raise ValueError(f"{where}: llama3 {name} 'factor' must be positive, got {factor}")
    if not 0 < low < high:
        raise ValueError(f"{where}: llama3 {name} needs 0 < 'low_freq_factor' < 'high_freq_factor', "
                         f"got {low} and {high}")
    if not original > 0:
        raise ValueError(f"{where}: llama3 {name} 'original_max_position_embeddings' must be positive, "
                         f"got {original}")
    return factor, low, high, original


def rope_inv_freq(head_dim: int, theta: float = 1e6, scaling: dict | None = None) -> torch.Tensor:
    """float64 inverse frequencies [head_dim // 2], with the llama3 rule when
    scaling = {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    params = parse_rope_scaling(scaling, "rope_inv_freq")
    if params is None:
        return inv_freq
    factor, low, high, original = params
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_cos_sin(head_dim: int, max_position: int, theta: float = 1e6, scaling: dict | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin tables [max_position, head_dim // 2], computed in float64."""
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), rope_inv_freq(head_dim, theta, scaling))
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x [b, s, h, d]; cos/sin [b, s, 1, d/2] float32
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, hq, d] and k [b, s, hk, d] by the angles of position_ids [b, s] (int64).
    Rotate-half layout by default (pairs (i, i + d/2)); interleaved=True pairs (2i, 2i + 1).
    Math in float32 (float64 for float64), output in the input dtype."""
    c = cos[position_ids].unsqueeze(2)
    s = sin[position_ids].unsqueeze(2)
    return _rotate(q, c, s, interleaved), _rotate(k, c, s, interleaved)
