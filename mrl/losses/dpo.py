"""DPO / IPO preference loss over vocab-sharded logits, with an optional SFT term.

Rows are paired: row 2i is the chosen response, row 2i + 1 the rejected one (a pair never spans
micro-batches). The sequence log-prob of a row is the sum (or, with ``average_logprobs``, the
mean) of its valid tokens' log-probs. The reference side comes, in this order of preference, from
``ref_seq_logps`` [B] (already reduced the same way), ``ref_logprobs`` [B, S], or ``ref_logits``
[B, S, V/tp] through the vocab-parallel log-prob op.

    L = L_dpo + c_sft · Σ_pairs (−log π(chosen)) / P

with P the global number of valid pairs (``GlobalCounts.num_pairs``).
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
    masked_fill_invalid,
    pair_mask,
    require_keys,
    split_model_output,
    token_mask,
    vocab_limit,
)
from mrl.losses.metrics import Metric, Metrics
from mrl.ops import vocab_parallel_logprobs

REFERENCE_KEYS: tuple[str, ...] = ("ref_seq_logps", "ref_logprobs", "ref_logits")


@dataclass
class DPOLossConfig(LossConfigBase):
    """DPO settings."""

    kind: Literal["dpo"] = "dpo"
    """Loss name (selects this loss in ``build_loss``)."""

    beta: float = 0.1
    """β: scale of the implicit reward β·log(π/π_ref)."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """"sigmoid" (DPO, −log σ(βΔ)) or "ipo" ((Δ − 1/(2β))²)."""

    label_smoothing: float = 0.0
    """ε of conservative DPO: −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ) (sigmoid only)."""

    average_logprobs: bool = False
    """Use the per-token MEAN of a row's log-probs instead of their sum (length-normalised)."""

    sft_coef: float = 0.0
    """Weight of the SFT term −log π(chosen) (reduced like the DPO log-probs), averaged over pairs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "dpo":
            raise ValueError(f"loss.kind must be 'dpo' for DPOLossConfig, got {self.kind!r}")
        if self.loss_type not in LF.DPO_KINDS:
            raise ValueError(f"loss.loss_type must be one of {list(LF.DPO_KINDS)}, got {self.loss_type!r}")
        if self.beta <= 0.0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0.0 and self.loss_type != "sigmoid":
            raise ValueError(f"loss.label_smoothing needs loss.loss_type 'sigmoid', got {self.loss_type!r}")
        if self.sft_coef < 0.0:
            raise ValueError(f"loss.sft_coef must be >= 0, got {self.sft_coef}")


class DPOLoss(Loss):
    """DPO / IPO (module docstring). Normalised by pairs; needs ``compute_global_counts(paired=True)``."""

    kind = "dpo"
    normalizer = "pairs"
    required_keys = ("labels",)

    def __call__(
        self, output, batch: Mapping[str, torch.Tensor], counts: GlobalCounts, group=None
    ) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, _ = split_model_output(output)  # [B, S, V/tp]
        require_keys(batch, self.required_keys, "dpo")
        ref_key = next((key for key in REFERENCE_KEYS if key in batch), None)
        if ref_key is None:
            raise ValueError(f"dpo loss: batch needs one of the reference keys {list(REFERENCE_KEYS)}")
        if counts.num_pairs is None:
            raise ValueError("dpo loss: counts.num_pairs is None; use compute_global_counts(..., paired=True)")
        labels = batch["labels"]  # [B, S]
        check_logits(logits, labels)
        mask = token_mask(batch, cfg.ignore_index)  # [B, S]
        pairs = pair_mask(mask)  # [B/2]
        checked = self._reference_input(batch, ref_key, logits)
        if cfg.validate:
            finite = {} if ref_key == "ref_logits" else {ref_key: checked}
            check_values(labels, mask, vocab_limit(logits, group, self.vocab_size), finite)

        safe_labels = torch.where(mask, labels, torch.full_like(labels, cfg.ignore_index))
        logprobs = vocab_parallel_logprobs(
            logits, safe_labels, group, cfg.ignore_index, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size
        )  # [B, S] fp32
        seq_logps = self._reduce(logprobs, mask)  # [B]
        ref_seq_logps = self._reference_seq_logps(checked, ref_key, safe_labels, mask, group).to(seq_logps.dtype)
        ref_seq_logps = masked_fill_invalid(ref_seq_logps, mask)

        dpo_loss, metrics = LF.dpo_loss(
            seq_logps[0::2], seq_logps[1::2], ref_seq_logps[0::2], ref_seq_logps[1::2],
            beta=cfg.beta, kind=cfg.loss_type, label_smoothing=cfg.label_smoothing,
            num_pairs=counts.num_pairs, pair_mask=pairs,
        )
        metrics["dpo_loss"] = Metric.mean_fragment(dpo_loss)
        chosen_logps, rejected_logps = seq_logps[0::2], seq_logps[1::2]  # [P] each
        for name, logps in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
            metrics[name] = Metric.mean_fragment(LF.masked_mean(logps.detach(), pairs, counts.num_pairs))
        total = dpo_loss
        if cfg.sft_coef > 0:
            sft_loss = LF.masked_mean(-chosen_logps, pairs, counts.num_pairs)
            metrics["sft_loss"] = Metric.mean_fragment(sft_loss)
            total = total + cfg.sft_coef * sft_loss
        metrics["loss"] = Metric.mean_fragment(total)
        metrics["num_pairs"] = Metric.count(pairs.sum())
        metrics.update(count_metrics(mask))
        return total, metrics

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B]: sum, or mean, over each row's valid tokens."""
        summed = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
        if not self.config.average_logprobs:
            return summed
        return summed / mask.sum(-1).clamp_min(1).to(per_token.dtype)

    def _reference_input(self, batch, ref_key: str, logits: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch["labels"].shape)
        if ref_key == "ref_seq_logps":
            return check_shape(batch, ref_key, shape[:1])
        if ref_key == "ref_logprobs":
            return check_shape(batch, ref_key, shape)
        return check_shape(batch, ref_key, tuple(logits.shape))

    def _reference_seq_logps(self, ref, ref_key: str, safe_labels, mask, group) -> torch.Tensor:
        """[B] reference sequence log-probs (no gradient)."""
        cfg = self.config
        with torch.no_grad():
            if ref_key == "ref_seq_logps":
                return ref.detach()
            if ref_key == "ref_logprobs":
                return self._reduce(ref.detach().float(), mask)
            ref_logprobs = vocab_parallel_logprobs(
                ref.detach(), safe_labels, group, cfg.ignore_index,
                vocab_size=self.vocab_size, chunk_size=cfg.chunk_size,
            )
            return self._reduce(ref_logprobs, mask)
