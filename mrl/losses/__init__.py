"""Losses for RL post-training, exact under every parallel layout.

Two layers: ``mrl.losses.functional`` (masked arithmetic over per-token log-probs, no
communication) and loss objects that take a micro-batch with vocab-sharded logits, call the
vocab-parallel ops and return ``(loss, metrics)`` divided by the step's global counts (see
``mrl.losses.base`` for the calling convention and the batch keys).
"""

from mrl.losses import functional
from mrl.losses.base import BATCH_KEYS, BatchNeeds, GlobalCounts, Loss, LossInputs, compute_global_counts, token_mask
from mrl.losses.distill import DistillLoss, DistillLossConfig
from mrl.losses.dpo import DPOLoss, DPOLossConfig
from mrl.losses.factory import LOSSES, LossConfig, build_loss, loss_config_from_dict
from mrl.losses.metrics import Metric, Metrics, MetricsAccumulator
from mrl.losses.policy import PolicyLoss, PolicyLossConfig
from mrl.losses.sft import SFTLoss, SFTLossConfig

__all__ = [
    "BATCH_KEYS",
    "BatchNeeds",
    "LOSSES",
    "DPOLoss",
    "DPOLossConfig",
    "DistillLoss",
    "DistillLossConfig",
    "GlobalCounts",
    "Loss",
    "LossConfig",
    "LossInputs",
    "Metric",
    "Metrics",
    "MetricsAccumulator",
    "PolicyLoss",
    "PolicyLossConfig",
    "SFTLoss",
    "SFTLossConfig",
    "build_loss",
    "compute_global_counts",
    "functional",
    "loss_config_from_dict",
    "token_mask",
]
