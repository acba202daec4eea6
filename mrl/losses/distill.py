"""KL regularisation / distillation over the full sharded vocabulary.

Per valid token, with p = softmax(logits / T) the policy (student) and q = softmax(ref_logits / T)
the reference (teacher), both sharded over the TP group:

- forward: KL(q || p) = Σ_v q (log q − log p)  (mode-covering, classic distillation);
- reverse: KL(p || q) = Σ_v p (log p − log q)  (mode-seeking, on-policy distillation).

Exact (no sampling), through ``vocab_parallel_kl``; divided by the step's global token count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from mrl.losses import functional as LF
from mrl.losses.base import (
    GlobalCounts,
    Loss,
    LossConfigBase,
    check_logits,
    check_shape,
    check_values,
    count_metrics,
    require_keys,
    split_model_output,
    token_mask,
    vocab_limit,
)
from mrl.losses.metrics import Metric, Metrics
from mrl.ops import vocab_parallel_kl


@dataclass
class DistillLossConfig(LossConfigBase):
    """Distillation / KL-regularisation settings."""

    kind: Literal["distill"] = "distill"
    """Loss name (selects this loss in ``build_loss``)."""

    direction: Literal["forward", "reverse"] = "forward"
    """"forward": KL(teacher || policy); "reverse": KL(policy || teacher)."""

    temperature: float = 1.0
    """Both logits are divided by this before the softmax."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "distill":
            raise ValueError(f"loss.kind must be 'distill' for DistillLossConfig, got {self.kind!r}")
        if self.direction not in ("forward", "reverse"):
            raise ValueError(f"loss.direction must be 'forward' or 'reverse', got {self.direction!r}")
        if self.temperature <= 0.0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


class DistillLoss(Loss):
    """Token-mean full-vocabulary KL to ``ref_logits`` (module docstring)."""

    kind = "distill"
    normalizer = "tokens"
    required_keys = ("labels", "ref_logits")

    def __call__(
        self, output, batch: Mapping[str, torch.Tensor], counts: GlobalCounts, group=None
    ) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, _ = split_model_output(output)  # [B, S, V/tp]
        require_keys(batch, self.required_keys, "distill")
        labels = batch["labels"]  # [B, S]
        check_logits(logits, labels)
        ref_logits = check_shape(batch, "ref_logits", tuple(logits.shape)).detach()  # [B, S, V/tp]
        mask = token_mask(batch, cfg.ignore_index)  # [B, S]
        if cfg.validate:
            check_values(labels, mask, vocab_limit(logits, group, self.vocab_size), {})
        p, q = (logits, ref_logits) if cfg.direction == "reverse" else (ref_logits, logits)
        kl = vocab_parallel_kl(
            p, q, group, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size, temperature=cfg.temperature
        )  # [B, S]
        loss = LF.masked_mean(kl, mask, counts.num_tokens)
        metrics: Metrics = {"kl": Metric.mean_fragment(loss), "loss": Metric.mean_fragment(loss)}
        metrics.update(count_metrics(mask))
        return loss, metrics
