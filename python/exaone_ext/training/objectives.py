"""What the trainer differentiates: per-token log-probabilities of packed batches, summed per document.

The model gives the final normed hidden states and the fused linear + cross-entropy op turns them
into per-token losses chunk by chunk, so a long row never holds [tokens, vocab] logits.
"""
from __future__ import annotations

import torch

from ..data.packing import IGNORE_INDEX, Batch
from ..ops import linear_cross_entropy
from .losses import sequence_logps

__all__ = ["token_logps", "token_nll_sum", "document_logps"]


def _base(model):
    """The ExaoneForCausalLM under a DDP / compile wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _token_losses(model, batch: Batch, reduction: str) -> torch.Tensor:
    """The fused loss of the batch's labels from the model's final hidden states."""
    hidden = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen, return_hidden=True)                      # [1, total, d]
    return linear_cross_entropy(hidden[0], _base(model).lm_head.weight, batch.labels[0], ignore_index=IGNORE_INDEX,
                                reduction=reduction)


def token_logps(model, batch: Batch) -> torch.Tensor:
    """float32 [total]: log p(label_t | tokens <= t of its document); 0 where the label is ignored."""
    return -_token_losses(model, batch, "none")


def token_nll_sum(model, batch: Batch) -> torch.Tensor:
    """float32 scalar: the summed negative log-likelihood of the batch's labels, -token_logps(...).sum().
    The fused op then computes its gradients during the forward (the incoming gradient is one
    number), so each chunk of logits is made once, not again in the backward."""
    return _token_losses(model, batch, "sum")


def document_logps(logps: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document (cu_seqlens segment): summed log-probabilities [n_docs] and learnt tokens [n_docs]."""
    return sequence_logps(logps, batch.labels[0] != IGNORE_INDEX, cu_seqlens=batch.cu_seqlens, return_lengths=True)
