from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up in the inputs' own dtype, as the Hugging Face model computes it.
    With `up` omitted, `gate` holds gate then up along its last dimension."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up
