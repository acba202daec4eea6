"""Losses for RL post-training, exact under every parallel layout.

Two layers: ``mrl.losses.functional`` (masked arithmetic over per-token log-probs, no
communication) and loss objects that take a micro-batch with vocab-sharded logits, call the
vocab-parallel ops and return ``(loss, metrics)`` divided by the step's global counts.
"""

from mrl.losses import functional
from mrl.losses.base import BATCH_KEYS, GlobalCounts, compute_global_counts, token_mask
from mrl.losses.metrics import Metric, Metrics, MetricsAccumulator

__all__ = [
    "BATCH_KEYS",
    "GlobalCounts",
    "Metric",
    "Metrics",
    "MetricsAccumulator",
    "compute_global_counts",
    "functional",
    "token_mask",
]
