"""DPO-family preference losses over vocab-sharded logits, with an optional SFT term.

Rows are paired: row 2i is the chosen response, row 2i + 1 the rejected one (a pair never spans
micro-batches). The sequence log-prob of a row is the sum (or, with ``average_logprobs``, the
mean) of its valid tokens' log-probs; with ``ld_alpha`` (LD-DPO) the tokens past the shorter
response of the pair count with weight α. The reference side comes, in this order of preference,
from ``ref_seq_logps`` [B] (already reduced, taken as given), ``ref_logprobs`` [B, S], or
``ref_logits`` [B, S, V/tp] through the vocab-parallel log-prob op.

    L = Σ_k w_k · Σ_pairs ω·ℓ_k / P  +  c_sft · L_sft

with ℓ_k the per-pair losses of the ``loss_type`` list (``mrl.losses.preference``; one type, or a
weighted mix as TRL's MPO), ω the WPO weights (``use_weighting``; else 1), P the global number of
valid pairs (``GlobalCounts.num_pairs``), and the SFT term normalised by ``sft_normalizer``:

- "pairs": Σ_pairs −log π(chosen) / P, log π(chosen) summed or averaged over its tokens
  (``sft_average_logprobs``; by default like the preference term);
- "chosen_tokens": Σ −log p(y_t) over the chosen tokens of valid pairs / their global count
  (``GlobalCounts.num_chosen_tokens``): the token-mean NLL of TRL's RPO/MPO "sft" term.

``aot``, ``aot_unpaired`` and ``bco_pair`` read statistics of the whole step: the trainer runs the
policy once over the step's batch before it (``old_logprobs``) and calls ``prepare_step``, which
writes each pair's sort partners / BCO's shift into the micro-batches (module docstring of
``mrl.losses.preference``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist

from mrl.losses import functional as LF
from mrl.losses import preference as P
from mrl.losses.base import (
    BatchNeeds,
    GlobalCounts,
    Loss,
    LossConfigBase,
    LossInputs,
    check_shape,
    masked_fill_invalid,
    pair_mask,
    token_mask,
)
from mrl.losses.metrics import Metric, Metrics
from mrl.ops import vocab_parallel_logprobs, vocab_parallel_softmax_stats

REFERENCE_KEYS: tuple[str, ...] = ("ref_seq_logps", "ref_logprobs", "ref_logits")

PreferenceLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
]

STEP_KEYS: dict[str, tuple[str, ...]] = {
    "aot": ("aot_partner",),
    "aot_unpaired": ("aot_unpaired_partner",),
    "bco_pair": ("bco_shift",),
}
"""Batch keys ``prepare_step`` writes for each loss type that needs step statistics."""


@dataclass
class DPOLossConfig(LossConfigBase):
    """DPO-family settings."""

    kind: Literal["dpo"] = "dpo"
    """Loss name (selects this loss in ``build_loss``)."""

    beta: float = 0.1
    """β: scale of the implicit reward β·log(π/π_ref) (IPO's and SPPO's τ: their target is 1/(2β))."""

    loss_type: Union[PreferenceLossType, list[PreferenceLossType]] = "sigmoid"
    """Per-pair loss (mrl.losses.preference), or a list of them mixed with loss_weights (TRL's MPO).
    Δ = c − r with c, r the chosen / rejected log-ratios log π/π_ref:
    "sigmoid" −log σ(βΔ) (DPO); "ipo" (Δ − 1/(2β))²; "hinge" max(0, 1 − βΔ) (SLiC);
    "robust" rDPO with flip rate label_smoothing; "exo_pair" EXO; "nca_pair" NCA; "bco_pair" BCO with a
    running reward shift; "sppo_hard" SPPO; "aot" / "aot_unpaired" AOT (global-batch sort);
    "apo_zero" / "apo_down" APO; "discopop" DiscoPOP (discopop_tau)."""

    loss_weights: Optional[list[float]] = None
    """Weight of each loss_type entry (null: 1 each); must have one weight per type."""

    label_smoothing: float = 0.0
    """ε: conservative DPO for "sigmoid", "aot", "aot_unpaired"; the label-flip rate of "robust";
    EXO's label smoothing (0 reads as 1e-3 there). Must be in [0, 0.5)."""

    discopop_tau: float = 0.05
    """τ of "discopop": temperature of the σ(βΔ/τ) blend of its logistic and exponential parts."""

    ld_alpha: Optional[float] = None
    """LD-DPO α in [0, 1]: a row's log-prob counts the tokens past the pair's shorter response with
    weight α (null: off). Applied to the policy and to the reference log-probs it reduces itself;
    ref_seq_logps are taken as given (TRL weights the policy only). Needs summed log-probs."""

    use_weighting: bool = False
    """WPO: weight each pair by min(1, exp(ω_c + ω_r)), ω the mean over a row's tokens of the
    policy's detached log p(y_t) − log Σ_v p_v² (TRL's use_weighting)."""

    average_logprobs: bool = False
    """Use the per-token MEAN of a row's log-probs instead of their sum in the preference term."""

    sft_coef: float = 0.0
    """Weight of the SFT term on the chosen responses (0: off)."""

    sft_normalizer: Literal["pairs", "chosen_tokens"] = "pairs"
    """"pairs": Σ −log π(chosen) / valid pairs; "chosen_tokens": Σ −log p over the chosen tokens of
    valid pairs / their global number (a token mean)."""

    sft_average_logprobs: Optional[bool] = None
    """With sft_normalizer "pairs": reduce log π(chosen) by token mean (true) or sum (false);
    null: as average_logprobs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "dpo":
            raise ValueError(f"kind must be 'dpo' for DPOLossConfig, got {self.kind!r}")
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        bad = [t for t in types if t not in P.PREFERENCE_LOSSES]
        if not types or bad:
            raise ValueError(f"loss_type must be one of {list(P.PREFERENCE_LOSSES)} or a non-empty list "
                             f"of them, got {self.loss_type!r}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists a type twice: {types}")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(types):
                raise ValueError(f"loss_weights needs one weight per loss_type entry ({len(types)}), "
                                 f"got {list(self.loss_weights)}")
            if any(not w >= 0.0 for w in self.loss_weights):
                raise ValueError(f"loss_weights must be >= 0, got {list(self.loss_weights)}")
        if self.beta <= 0.0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0.0 and not any(t in P.SMOOTHED_LOSSES for t in types):
            raise ValueError(f"label_smoothing needs a loss_type among {list(P.SMOOTHED_LOSSES)}, "
                             f"got {self.loss_type!r}")
        if not self.discopop_tau > 0.0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if self.ld_alpha is not None:
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must be in [0, 1] or null, got {self.ld_alpha}")
            if self.average_logprobs:
                raise ValueError("ld_alpha weights summed log-probs; it cannot be combined with "
                                 "average_logprobs (already length-normalised)")
        if self.sft_coef < 0.0:
            raise ValueError(f"sft_coef must be >= 0, got {self.sft_coef}")
        if self.sft_normalizer not in ("pairs", "chosen_tokens"):
            raise ValueError(f"sft_normalizer must be 'pairs' or 'chosen_tokens', got {self.sft_normalizer!r}")
        if self.sft_normalizer == "chosen_tokens" and self.sft_average_logprobs is not None:
            raise ValueError("sft_average_logprobs applies to sft_normalizer 'pairs'; "
                             "'chosen_tokens' is a token mean already (leave it null)")

    @property
    def loss_types(self) -> tuple[str, ...]:
        """The loss types as a tuple (one entry for a single ``loss_type``)."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss type."""
        return tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.loss_types)


class DPOLoss(Loss):
    """The DPO family (module docstring). Normalised by pairs; needs ``compute_global_counts(paired=True)``."""

    kind = "dpo"
    normalizer = "pairs"
    required_keys = ("labels",)

    def __init__(self, config: DPOLossConfig, *, vocab_size: int | None = None) -> None:
        super().__init__(config, vocab_size=vocab_size)
        self.bco_shift = P.RunningMean()

    @property
    def needs_policy_logprobs(self) -> bool:
        """Whether the trainer must store the policy's log-probs of the step's batch, before the step,
        as ``old_logprobs`` and call ``prepare_step`` (loss types that read step statistics)."""
        return any(kind in P.STEP_STATISTIC_LOSSES for kind in self.config.loss_types)

    @property
    def batch_needs(self) -> BatchNeeds:
        """The reference's log-probs; the policy's too for loss types that read step statistics."""
        return BatchNeeds(keys=self.required_keys, reference_logprobs=True, old_logprobs=self.needs_policy_logprobs)

    def step_keys(self) -> tuple[str, ...]:
        """Batch keys written by ``prepare_step`` that this loss reads."""
        return tuple(key for kind in self.config.loss_types for key in STEP_KEYS.get(kind, ()))

    def check_inputs(self, batch, logits, values, counts: GlobalCounts) -> dict[str, torch.Tensor]:
        """The reference (one of ``REFERENCE_KEYS``) and step statistics, shape-checked; the pair counts."""
        cfg = self.config
        ref_key = self._reference_key(batch)
        missing = [key for key in self.step_keys() if key not in batch]
        if missing:
            raise ValueError(f"dpo loss: loss.loss_type {list(cfg.loss_types)} reads step statistics {missing}; "
                             "call DPOLoss.prepare_step on the step's micro-batches first (the trainer does)")
        if counts.num_pairs is None:
            raise ValueError("dpo loss: counts.num_pairs is None; use compute_global_counts(..., paired=True)")
        num_chosen_tokens = getattr(counts, "num_chosen_tokens", None)
        if cfg.sft_coef > 0 and cfg.sft_normalizer == "chosen_tokens" and num_chosen_tokens is None:
            raise ValueError("dpo loss: loss.sft_normalizer 'chosen_tokens' needs counts.num_chosen_tokens "
                             "(compute_global_counts(..., paired=True))")
        checked = self._reference_input(batch, ref_key, tuple(logits.shape))
        step_inputs = {key: check_shape(batch, key, batch["labels"].shape[:1]) for key in self.step_keys()}  # [B]
        finite = {} if ref_key == "ref_logits" else {ref_key: checked}  # logits: finite or not, like the policy's
        return {**finite, **step_inputs}

    def compute(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, batch, mask, safe_labels = inputs.logits, inputs.batch, inputs.mask, inputs.safe_labels
        counts, group = inputs.counts, inputs.group
        num_chosen_tokens = getattr(counts, "num_chosen_tokens", None)
        ref_key = self._reference_key(batch)
        checked = batch[ref_key]
        step_inputs = {key: inputs.checked[key] for key in self.step_keys()}  # [B] each
        pairs = pair_mask(mask)  # [B/2]
        logprobs = vocab_parallel_logprobs(
            logits, safe_labels, group, cfg.ignore_index, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size
        )  # [B, S] fp32
        token_weights = self._token_weights(mask)  # [B, S] or None
        seq_logps = self._reduce(logprobs, mask, token_weights)  # [B]
        ref_seq_logps = self._reference_seq_logps(checked, ref_key, safe_labels, mask, group, token_weights)
        ref_seq_logps = masked_fill_invalid(ref_seq_logps.to(seq_logps.dtype), mask)  # [B]
        chosen_ratio = seq_logps[0::2] - ref_seq_logps[0::2]  # [P]
        rejected_ratio = seq_logps[1::2] - ref_seq_logps[1::2]  # [P]
        step = {key: masked_fill_invalid(value.float(), mask) for key, value in step_inputs.items()}  # [B]
        pair_weights = self._wpo_weights(logits, logprobs, mask, group) if cfg.use_weighting else None  # [P]

        pref_loss, terms = P.preference_term(
            cfg.loss_types, cfg.weights, chosen_ratio, rejected_ratio, pairs, counts.num_pairs,
            beta=cfg.beta, label_smoothing=cfg.label_smoothing, discopop_tau=cfg.discopop_tau,
            policy_margin=seq_logps[0::2] - seq_logps[1::2],
            aot_partner=step["aot_partner"][0::2] if "aot_partner" in step else None,
            aot_unpaired_partners=(step["aot_unpaired_partner"][0::2], step["aot_unpaired_partner"][1::2])
            if "aot_unpaired_partner" in step else None,
            bco_shift=step["bco_shift"][0::2] if "bco_shift" in step else None,
            pair_weights=pair_weights,
        )
        metrics = self._reward_metrics(chosen_ratio, rejected_ratio, pairs, counts.num_pairs)
        metrics["dpo_loss"] = Metric.mean_fragment(pref_loss)
        if len(terms) > 1:
            for kind, term in terms.items():
                metrics[f"dpo_loss_{kind}"] = Metric.mean_fragment(term)
        if pair_weights is not None:
            metrics["wpo_weight"] = Metric.mean_fragment(LF.masked_mean(pair_weights, pairs, counts.num_pairs))
        if "bco_shift" in step:
            metrics["bco_shift"] = Metric.mean_fragment(LF.masked_mean(step["bco_shift"][0::2], pairs, counts.num_pairs))
        chosen_logps, rejected_logps = seq_logps[0::2], seq_logps[1::2]  # [P] each
        for name, logps in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
            metrics[name] = Metric.mean_fragment(LF.masked_mean(logps.detach(), pairs, counts.num_pairs))
        total = pref_loss
        if cfg.sft_coef > 0:
            sft_loss = self._sft_loss(logprobs, mask, pairs, counts.num_pairs, num_chosen_tokens)
            metrics["sft_loss"] = Metric.mean_fragment(sft_loss)
            total = total + cfg.sft_coef * sft_loss
        metrics["loss"] = Metric.mean_fragment(total)
        metrics["num_pairs"] = Metric.count(pairs.sum())
        return total, metrics

    # Pieces of the loss -------------------------------------------------------------------------

    def _token_weights(self, mask: torch.Tensor) -> torch.Tensor | None:
        """LD-DPO token weights ``[B, S]`` (None without ``ld_alpha``)."""
        if self.config.ld_alpha is None:
            return None
        return P.length_desensitized_weights(mask, self.config.ld_alpha)

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor, token_weights: torch.Tensor | None = None,
                average: bool | None = None) -> torch.Tensor:
        """[B, S] -> [B]: (weighted) sum, or mean, over each row's valid tokens."""
        if token_weights is not None:
            per_token = per_token * token_weights.to(per_token.dtype)
        summed = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
        if not (self.config.average_logprobs if average is None else average):
            return summed
        return summed / mask.sum(-1).clamp_min(1).to(per_token.dtype)

    def _sft_loss(self, logprobs, mask, pairs, num_pairs, num_chosen_tokens) -> torch.Tensor:
        """The SFT term on the chosen rows of valid pairs, divided per ``sft_normalizer``."""
        cfg = self.config
        if cfg.sft_normalizer == "chosen_tokens":
            chosen_tokens = mask[0::2] & pairs.unsqueeze(-1)  # [P, S]
            return LF.masked_mean(-logprobs[0::2], chosen_tokens, num_chosen_tokens)
        average = cfg.average_logprobs if cfg.sft_average_logprobs is None else cfg.sft_average_logprobs
        chosen = self._reduce(logprobs[0::2], mask[0::2], average=average)  # [P]
        return LF.masked_mean(-chosen, pairs, num_pairs)

    def _wpo_weights(self, logits, logprobs: torch.Tensor, mask: torch.Tensor, group) -> torch.Tensor:
        """WPO pair weights ``[P]`` (detached): log Σ_v p_v² = lse(2x) − 2·lse(x) through the
        vocab-parallel logsumexp at temperatures 1 and 1/2 (two reads of the shard, no gradient)."""
        cfg = self.config
        with torch.no_grad():
            lse = [vocab_parallel_softmax_stats(logits, None, group, logprobs=False, logsumexp=True,
                                                temperature=t, vocab_size=self.vocab_size,
                                                chunk_size=cfg.chunk_size).logsumexp for t in (1.0, 0.5)]
            log_sum_p2 = lse[1] - 2.0 * lse[0]  # [B, S]
            return P.wpo_pair_weights(P.wpo_log_weights(logprobs.detach(), log_sum_p2, mask))

    def _reward_metrics(self, chosen_ratio, rejected_ratio, pairs, num_pairs) -> Metrics:
        """Pair means of accuracy (Δ > 0), β·Δ, β·c, β·r."""
        beta = self.config.beta
        zeros = torch.zeros_like(chosen_ratio)
        chosen = torch.where(pairs, chosen_ratio.detach(), zeros)  # [P]
        rejected = torch.where(pairs, rejected_ratio.detach(), zeros)  # [P]
        delta = chosen - rejected

        def pair_mean(x: torch.Tensor) -> Metric:
            return Metric.mean_fragment(LF.masked_mean(x, pairs, num_pairs))

        return {
            "accuracy": pair_mean((delta > 0).to(delta.dtype)),
            "reward_margin": pair_mean(beta * delta),
            "chosen_reward": pair_mean(beta * chosen),
            "rejected_reward": pair_mean(beta * rejected),
        }

    # Reference ---------------------------------------------------------------------------------

    @staticmethod
    def _reference_key(batch) -> str:
        ref_key = next((key for key in REFERENCE_KEYS if key in batch), None)
        if ref_key is None:
            raise ValueError(f"dpo loss: batch needs one of the reference keys {list(REFERENCE_KEYS)}")
        return ref_key

    def _reference_input(self, batch, ref_key: str, logits_shape: tuple | None) -> torch.Tensor:
        shape = tuple(batch["labels"].shape)
        if ref_key == "ref_seq_logps":
            return check_shape(batch, ref_key, shape[:1])
        if ref_key == "ref_logprobs":
            return check_shape(batch, ref_key, shape)
        if logits_shape is None:
            return batch[ref_key]
        return check_shape(batch, ref_key, logits_shape)

    def _reference_seq_logps(self, ref, ref_key: str, safe_labels, mask, group,
                             token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B] reference sequence log-probs (no gradient)."""
        cfg = self.config
        with torch.no_grad():
            if ref_key == "ref_seq_logps":
                return ref.detach()
            if ref_key == "ref_logprobs":
                return self._reduce(ref.detach().float(), mask, token_weights)
            ref_logprobs = vocab_parallel_logprobs(
                ref.detach(), safe_labels, group, cfg.ignore_index,
                vocab_size=self.vocab_size, chunk_size=cfg.chunk_size,
            )
            return self._reduce(ref_logprobs, mask, token_weights)

    # Step statistics (aot, aot_unpaired, bco_pair) ----------------------------------------------

    def prepare_step(self, micro_batches: Sequence[dict], dp_group=None, tp_group=None) -> None:
        """Write the step statistics of ``aot`` / ``aot_unpaired`` / ``bco_pair`` into ``micro_batches``.

        Reads each micro-batch's ``old_logprobs`` [B, S] (the policy's log-probs with the weights of
        this step, before its update) and reference, gathers every pair of the step over the DP group
        (one all-gather of ``[5, pairs]``), and writes ``[B]`` per-row keys: ``aot_partner`` (row 2i:
        the reference margin matched with pair i's policy margin), ``aot_unpaired_partner`` (row 2i:
        the rejected log-ratio matched with pair i's chosen one; row 2i + 1: the chosen log-ratio
        matched with its rejected one), ``bco_shift`` (δ on every row, after this step's update of
        the running mean). A no-op when no loss type needs them, or on ranks whose micro-batches
        carry no ``old_logprobs`` (pipeline stages before the last, where no loss runs).
        """
        cfg = self.config
        kinds = [kind for kind in cfg.loss_types if kind in P.STEP_STATISTIC_LOSSES]
        if not kinds or not micro_batches or "old_logprobs" not in micro_batches[0]:
            return
        with torch.no_grad():
            local = torch.cat([self._pair_summary(batch, tp_group) for batch in micro_batches], dim=1)  # [5, P_local]
            everything, offset = _all_gather_columns(local, dp_group)  # [5, P_global]
            chosen, rejected, policy_margin, ref_margin, valid = everything
            stats = P.step_statistics(kinds, chosen, rejected, policy_margin, ref_margin, valid.bool(), beta=cfg.beta)
            shift = None
            if "bco_pair" in kinds:
                shift = self.bco_shift.update(float(stats["bco_batch_mean"]))
            start = offset
            for batch in micro_batches:
                pairs = batch["labels"].shape[0] // 2
                mine = slice(start, start + pairs)
                start += pairs
                like = batch["old_logprobs"]
                rows = torch.zeros(2 * pairs, dtype=torch.float32, device=like.device)  # [B]
                if "aot" in kinds:
                    partner = rows.clone()
                    partner[0::2] = stats["aot_partner"][mine]
                    batch["aot_partner"] = partner
                if "aot_unpaired" in kinds:
                    both = rows.clone()
                    both[0::2] = stats["aot_rejected_partner"][mine]
                    both[1::2] = stats["aot_chosen_partner"][mine]
                    batch["aot_unpaired_partner"] = both
                if shift is not None:
                    batch["bco_shift"] = rows.clone().fill_(shift)

    def _pair_summary(self, batch: dict, tp_group) -> torch.Tensor:
        """``[5, P]`` of one micro-batch: c, r, π_c − π_r, ρ_c − ρ_r, pair validity (detached)."""
        cfg = self.config
        labels = batch["labels"]
        mask = token_mask(batch, cfg.ignore_index)  # [B, S]
        pairs = pair_mask(mask)  # [P]
        ref_key = self._reference_key(batch)
        policy = check_shape(batch, "old_logprobs", tuple(labels.shape)).float()  # [B, S]
        token_weights = self._token_weights(mask)
        seq = masked_fill_invalid(self._reduce(policy, mask, token_weights), mask)  # [B]
        safe_labels = torch.where(mask, labels, torch.full_like(labels, cfg.ignore_index))
        ref = self._reference_seq_logps(self._reference_input(batch, ref_key, None), ref_key, safe_labels, mask,
                                        tp_group, token_weights)
        ref = masked_fill_invalid(ref.float(), mask)  # [B]
        summary = torch.stack([
            seq[0::2] - ref[0::2], seq[1::2] - ref[1::2], seq[0::2] - seq[1::2], ref[0::2] - ref[1::2],
        ])  # [4, P]
        summary = torch.where(pairs, summary, torch.zeros_like(summary))
        return torch.cat([summary, pairs.to(summary.dtype).unsqueeze(0)])

    # Checkpointed state (BCO's running shift) ---------------------------------------------------

    def state_dict(self) -> dict:
        return {"bco_shift": self.bco_shift.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if "bco_shift" in state:
            self.bco_shift.load_state_dict(state["bco_shift"])


def _all_gather_columns(local: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``[R, n_rank]`` along the columns in rank order, and this rank's
    column offset. Ranks may hold different column counts (one extra all-gather of the counts)."""
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return local, 0
    count = torch.tensor([local.shape[1]], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    widest = max(sizes)
    padded = torch.zeros(local.shape[0], widest, dtype=local.dtype, device=local.device)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1), sum(sizes[:rank])
