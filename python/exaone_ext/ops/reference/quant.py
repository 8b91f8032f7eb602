"""Quantized weights in plain PyTorch: the formats, round-to-nearest quantisers, dequantisation, and
the quantized linear layers as dequantise-then-matmul.

Formats (the same as the kernels take):
  int8: qweight int8 [out, in], scales [out]; w = qweight * scales[:, None] (symmetric, per output
        channel).
  int4: qweight uint8 [out, in / 2], scales [out, in / g], zeros uint8 [out, in / g] (0..15), for
        groups of g consecutive inputs (g a multiple of 32 dividing in); w = (q - zeros) * scales
        (asymmetric, as AWQ). Packing: inputs in blocks of 32; byte j of a block (0..15) holds
        input j in its low nibble and input 16 + j in its high nibble.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_BLOCK = 32


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (qweight int8 [out, in], scales float32 [out]), round to nearest,
    scale = max |w| / 127 per output channel (1 for an all-zero row)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values uint8 [out, in] (0..15, in a multiple of 32) -> packed uint8 [out, in / 2]."""
    out, n_in = q.shape
    blocks = q.to(torch.uint8).reshape(out, n_in // INT4_BLOCK, 2, INT4_BLOCK // 2)  # [out, blocks, lo|hi, 16]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, n_in // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [out, in / 2] -> 4-bit values uint8 [out, in]."""
    out, half = packed.shape
    b = packed.reshape(out, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(out, 2 * half)


def quantize_int4(weight: torch.Tensor, group_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (qweight uint8 [out, in / 2], scales float32 [out, in / g], zeros uint8
    [out, in / g]): per group, scale = (max - min) / 15 and zero = round(-min / scale), so that the
    group's range maps onto 0..15 (asymmetric, round to nearest)."""
    out, n_in = weight.shape
    if group_size <= 0 or group_size % INT4_BLOCK or n_in % group_size:
        raise ValueError(f"quantize_int4: group_size must be a positive multiple of {INT4_BLOCK} dividing "
                         f"in_features ({n_in}), got {group_size}")
    w = weight.detach().float().reshape(out, n_in // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = (hi - lo) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out, n_in)), scales, zeros.to(torch.uint8)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> w [out, in] in dtype (computed in float32)."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> w [out, in] in dtype (computed in float32)."""
    q = unpack_int4(qweight).float()
    out, n_in = q.shape
    g = q.reshape(out, n_in // group_size, group_size)
    w = (g - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out, n_in).to(dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequantize_int8(qweight, scales).T -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype))


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128) -> torch.Tensor:
    """x [..., in] @ dequantize_int4(qweight, scales, zeros, group_size).T -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype))


def linear_int8_cat(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """x [..., in] @ cat(dequantised weights).T -> [..., sum of out_i]: each weight's outputs in turn."""
    return torch.cat([linear_int8(x, q, s) for q, s in zip(qweights, scales, strict=True)], dim=-1)


def linear_int4_cat(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor],
                    zeros: list[torch.Tensor], group_size: int = 128) -> torch.Tensor:
    """x [..., in] @ cat(dequantised weights).T -> [..., sum of out_i]: each weight's outputs in turn."""
    return torch.cat([linear_int4(x, q, s, z, group_size) for q, s, z in zip(qweights, scales, zeros, strict=True)],
                     dim=-1)
