"""What the trainer differentiates: per-token log-probabilities of packed batches, summed per document.

The model gives the final normed hidden states and the fused linear + cross-entropy op turns them
into per-token losses chunk by chunk, so a long row never holds [tokens, vocab] logits. Where the
model or the op predates that (return_hidden / exaone_ext.ops.linear_cross_entropy), the plain
paths below give the same numbers.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..data.packing import IGNORE_INDEX, Batch

try:
    from ..ops import linear_cross_entropy
except ImportError:
    from ._fallback import linear_cross_entropy
try:
    from .losses import dpo_loss, simpo_loss
except ImportError:
    from ._fallback import dpo_loss, simpo_loss

__all__ = ["token_logps", "sequence_logps", "dpo_loss", "simpo_loss", "linear_cross_entropy"]


def _base(model):
    """The ExaoneForCausalLM under DDP / compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def token_logps(model, batch: Batch) -> torch.Tensor:
    """float32 [total]: log p(label_t | tokens <= t of its document); 0 where the label is ignored."""
    labels = batch.labels[0]
    base = _base(model)
    if "return_hidden" in inspect.signature(base.forward).parameters:
        hidden = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                       max_seqlen=batch.max_seqlen, return_hidden=True)             # [1, total, d]
        loss = linear_cross_entropy(hidden[0], base.lm_head.weight, labels, ignore_index=IGNORE_INDEX,
                                    reduction="none")
    else:
        logits = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)  # [1, total, V]
        loss = F.cross_entropy(logits[0].float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return -loss.float()


def sequence_logps(logps: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document: the summed log-probabilities [n_docs] and the number of learnt tokens [n_docs]."""
    cu = batch.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=logps.device), lengths.to(logps.device))
    sums = torch.zeros(len(lengths), dtype=logps.dtype, device=logps.device).index_add(0, doc, logps)
    counts = torch.zeros(len(lengths), dtype=torch.long, device=logps.device).index_add(
        0, doc, (batch.labels[0] != IGNORE_INDEX).long())
    return sums, counts
