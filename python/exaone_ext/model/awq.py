"""AWQ-format 4-bit weights (as published for EXAONE 3.5 and Llama models) converted into the layout
of exaone_ext.ops.linear_int4.

AWQ stores a linear layer's weight transposed, [in, out], as int32 words of eight 4-bit values
along out: `qweight` int32 [in, out / 8], `qzeros` int32 [in / group, out / 8] (packed the same way)
and `scales` float16 [in / group, out]; w[o, i] = (q[i, o] - z[i / group, o]) * s[i / group, o].
Within a word the nibble at bits 4j..4j+3 holds output column 8c + AWQ_ORDER[j].
"""
from __future__ import annotations

import torch

from ..ops.reference.quant import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)           # nibble j of a word -> column within its 8
_COLUMN_TO_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(8))


def unpack_awq_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's nibble order -> uint8 [rows, cols] of 4-bit values in column order."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError(f"unpack_awq_int32: expected a 2-dimensional int32 tensor, got {packed.dtype} "
                        f"of shape {tuple(packed.shape)}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 15                      # [rows, cols / 8, 8] by nibble
    columns = nibbles[..., list(_COLUMN_TO_NIBBLE)]                    # [rows, cols / 8, 8] by column
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ tensors of one linear layer -> (qweight uint8 [out, in / 2], scales [out, in / g] in
    scale_dtype, zeros uint8 [out, in / g]) for ops.linear_int4. Raises ValueError on shapes that
    do not fit together."""
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("awq_to_int4: qweight, qzeros and scales must be 2-dimensional, got shapes "
                         f"{tuple(qweight.shape)}, {tuple(qzeros.shape)}, {tuple(scales.shape)}")
    n_in, out = qweight.shape[0], qweight.shape[1] * 8
    if n_in % group_size or n_in % 32:
        raise ValueError(f"awq_to_int4: in_features {n_in} must be a multiple of group_size {group_size} and of 32")
    groups = n_in // group_size
    if tuple(scales.shape) != (groups, out) or tuple(qzeros.shape) != (groups, out // 8):
        raise ValueError(f"awq_to_int4: for qweight of shape {tuple(qweight.shape)} (in {n_in}, out {out}) and "
                         f"group_size {group_size}, scales must be {(groups, out)} and qzeros {(groups, out // 8)}, "
                         f"got {tuple(scales.shape)} and {tuple(qzeros.shape)}")
    q = unpack_awq_int32(qweight).t().contiguous()                     # [out, in]
    zeros = unpack_awq_int32(qzeros).t().contiguous()                  # [out, in / g]
    return pack_int4(q), scales.t().to(scale_dtype).contiguous(), zeros
