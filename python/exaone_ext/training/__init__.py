"""Training: objectives (losses) and the trainer."""
from .losses import causal_lm_loss, dpo_loss, sequence_logps, simpo_loss

__all__ = ["causal_lm_loss", "dpo_loss", "sequence_logps", "simpo_loss"]
