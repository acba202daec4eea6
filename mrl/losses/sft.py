"""SFT / NLL loss over vocab-sharded logits: global token mean, label smoothing, focal, z-loss.

Per valid token t with target probability p_t:

- plain: ℓ = −log p_t;
- label smoothing ε: the TP-correct smoothed cross-entropy of ``vocab_parallel_cross_entropy``;
- focal (γ > 0): ℓ = −α·(1 − p_t)^γ·log p_t, differentiated exactly through the log-prob op;
- z-loss: + coef·logsumexp(logits)² (pushes the softmax normaliser towards 1).

Each term is divided by the step's global number of valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mrl.losses import functional as LF
from mrl.losses.base import Loss, LossConfigBase, LossInputs
from mrl.losses.metrics import Metric, Metrics
from mrl.ops import vocab_parallel_cross_entropy, vocab_parallel_logprobs, vocab_parallel_logsumexp


@dataclass
class SFTLossConfig(LossConfigBase):
    """SFT settings."""

    kind: Literal["sft"] = "sft"
    """Loss name (selects this loss in ``build_loss``)."""

    label_smoothing: float = 0.0
    """ε: the target distribution is (1 − ε)·onehot + ε·uniform over the (unpadded) vocabulary."""

    focal_gamma: float = 0.0
    """γ of the focal loss −α(1 − p_t)^γ log p_t; 0 gives the plain NLL."""

    focal_alpha: float = 1.0
    """α of the focal loss (a constant weight; used only with focal_gamma > 0)."""

    z_loss_coef: float = 0.0
    """Weight of the z-loss logsumexp(logits)² per token; 0 disables."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "sft":
            raise ValueError(f"kind must be 'sft' for SFTLossConfig, got {self.kind!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.focal_gamma < 0.0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.focal_alpha <= 0.0:
            raise ValueError(f"focal_alpha must be > 0, got {self.focal_alpha}")
        if self.focal_gamma > 0.0 and self.label_smoothing > 0.0:
            raise ValueError(
                "focal_gamma and label_smoothing cannot both be set (the focal loss has no "
                f"smoothed form here), got focal_gamma={self.focal_gamma}, label_smoothing={self.label_smoothing}"
            )
        if self.z_loss_coef < 0.0:
            raise ValueError(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")


class SFTLoss(Loss):
    """Token-mean SFT loss (module docstring)."""

    kind = "sft"
    normalizer = "tokens"
    required_keys = ("labels",)

    def compute(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, mask, safe_labels, group = inputs.logits, inputs.mask, inputs.safe_labels, inputs.group
        N = inputs.counts.num_tokens

        if cfg.label_smoothing > 0.0:
            per_token = vocab_parallel_cross_entropy(
                logits, safe_labels, group, label_smoothing=cfg.label_smoothing,
                ignore_index=cfg.ignore_index, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size,
            )  # [B, S]
        else:
            logprobs = vocab_parallel_logprobs(
                logits, safe_labels, group, cfg.ignore_index, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size
            )  # [B, S]
            per_token = -logprobs
            if cfg.focal_gamma > 0.0:
                # 1 − p_t, floored at the smallest normal so a fractional γ never sees 0^(γ−1).
                one_minus_p = (-torch.expm1(logprobs)).clamp_min(torch.finfo(logprobs.dtype).tiny)
                per_token = cfg.focal_alpha * one_minus_p.pow(cfg.focal_gamma) * per_token
        nll_loss = LF.masked_mean(per_token, mask, N)
        metrics: Metrics = {"nll_loss": Metric.mean_fragment(nll_loss)}
        total = nll_loss
        if cfg.z_loss_coef > 0.0:
            lse = vocab_parallel_logsumexp(logits, group, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size)
            z_loss = LF.masked_mean(lse.square(), mask, N)
            metrics["z_loss"] = Metric.mean_fragment(z_loss)
            total = total + cfg.z_loss_coef * z_loss
        metrics["loss"] = Metric.mean_fragment(total)
        return total, metrics
