"""Training: the EXAONE 3.5 recipe (two-stage pre-training, SFT, staged DPO / SimPO) and its objectives.

    from exaone_ext.training import Trainer, load_config
    Trainer(load_config("sft.toml"), objective="sft").train(resume=False)

CLI: exaone-ext train pretrain|sft|dpo|simpo --config FILE [--resume]; many processes with torchrun.
"""
from .checkpoint import latest_checkpoint
from .config import ConfigError, check_config, load_config
from .losses import causal_lm_loss, dpo_loss, sequence_logps, simpo_loss
from .objectives import document_logps, token_logps, token_nll_sum
from .trainer import OBJECTIVES, Trainer, lr_factor

__all__ = ["ConfigError", "OBJECTIVES", "Trainer", "causal_lm_loss", "check_config", "document_logps", "dpo_loss",
           "latest_checkpoint", "load_config", "lr_factor", "sequence_logps", "simpo_loss", "token_logps",
           "token_nll_sum"]
