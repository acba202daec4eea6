"""GRPO / PPO policy loss over vocab-sharded logits.

    L = L_policy + c_v·L_value − c_H·H + β·KL

- L_policy: by default the clipped surrogate (``functional.clipped_pg_loss``) with asymmetric
  clip (DAPO clip-higher), optional dual clip, token- or sequence-level (GSPO) ratios; or the
  objective ``policy_loss`` names (CISPO, Clip-Cov, KL-Cov, GMPO, SAPO, GPG, REINFORCE: formulas
  and sources in ``mrl.losses.policy_objectives``); optional importance-sampling correction
  w = exp(old − behaviour) for off-policy / asynchronous data, and an on-policy ratio switch.
- L_value: ½(V − R)² with optional PPO value clipping, V from the model's value head.
- H: exact entropy of the full (sharded) distribution, with its gradient. c_H > 0 REWARDS
  entropy (the PPO convention: L contains −c_H·H); the design notes write the entropy term with
  the opposite sign convention, so a coefficient taken from them must be negated.
- KL: KL(π || π_ref), from sampled log-probs (k1/k2/k3/abs and the straight-through k1+/k3+)
  or exact over the vocabulary from the reference logits.

Every term is aggregated with the same mode (``agg``) and divided by the step's global counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import torch

from mrl.config.checks import require_optional_positive_ints
from mrl.losses import covariance as COV
from mrl.losses import functional as LF
from mrl.losses import policy_objectives as PO
from mrl.losses.base import BatchNeeds, GlobalCounts, Loss, LossConfigBase, LossInputs, check_shape, masked_fill_invalid
from mrl.losses.metrics import Metric, Metrics, masked_max
from mrl.ops import vocab_parallel_kl, vocab_parallel_logprobs_and_entropy


@dataclass
class PolicyLossConfig(LossConfigBase):
    """GRPO / PPO loss settings."""

    kind: Literal["grpo", "ppo"] = "grpo"
    """Loss name: "grpo" or "ppo" (one loss; the name selects it in ``build_loss``)."""

    clip_low: float = 0.2
    """Lower clip ε_low: the ratio is clipped below at 1 − ε_low."""

    clip_high: float = 0.2
    """Upper clip ε_high: the ratio is clipped above at 1 + ε_high (> clip_low: DAPO clip-higher)."""

    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens (ℓ ≤ −c·A); null disables."""

    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    """Aggregation of every per-token term (see ``functional.aggregate``)."""

    norm_length: int | None = None
    """Constant length L of "seq-mean-token-sum-norm" (e.g. the maximum response length); null uses
    the micro-batch's padded length S, which is layout-invariant only if every micro-batch has one S."""

    policy_loss: Literal["ppo-clip", "cispo", "clip-cov", "kl-cov", "gmpo", "sapo", "gpg", "reinforce"] = "ppo-clip"
    """Policy objective (formulas and sources in ``mrl.losses.policy_objectives``): "ppo-clip"
    (PPO's clipped surrogate); "cispo" (MiniMax-M1: −sg(clip(r))·A·log π); "clip-cov" (ppo-clip
    with the gradient of a hashed-random fraction ``clip_cov_ratio`` of the tokens whose
    covariance lies in (clip_cov_lb, clip_cov_ub) stopped); "kl-cov" (−A·r plus kl_cov_coef·|log r|
    on the top ``kl_cov_ratio`` of tokens by covariance); "gmpo" (geometric mean of the token
    ratios, clipped in log space to [−clip_low, clip_high], one term per sequence); "sapo"
    (sigmoid gate with temperatures sapo_tau_pos / sapo_tau_neg); "gpg" (−α·A·log π, α =
    B/(B − M) over the step's zero-advantage rows M); "reinforce" (−A·log π)."""

    force_on_policy_ratio: bool = False
    """Take the ratio against the current policy itself: r = exp(log π − sg(log π)) = 1 in value,
    with the policy gradient ∇r = ∇log π. For batches whose old log-probs are by construction the
    current policy's (one update per rollout batch); ``old_logprobs`` is then not read (unless
    is_correction, clip-cov or kl-cov needs it)."""

    sapo_tau_pos: float = 1.0
    """SAPO's gate temperature τ for tokens with A > 0 (paper: 1.0)."""

    sapo_tau_neg: float = 1.05
    """SAPO's gate temperature τ for tokens with A <= 0 (paper: 1.05; larger = faster decay)."""

    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of the step's valid tokens whose gradient is stopped (verl's default)."""

    clip_cov_lb: float = 1.0
    """Clip-Cov: lower bound of the covariance band the tokens are drawn from."""

    clip_cov_ub: float = 5.0
    """Clip-Cov: upper bound of the covariance band the tokens are drawn from."""

    cov_seed: int = 0
    """Clip-Cov: seed of the hash that draws the tokens (see ``mrl.losses.covariance``)."""

    kl_cov_ratio: float = 2e-4
    """KL-Cov: fraction of the step's valid tokens (largest covariance first) given the penalty."""

    kl_cov_coef: float = 1.0
    """KL-Cov: weight k of the |log r| penalty on the selected tokens."""

    ratio_level: Literal["token", "sequence"] = "token"
    """"token": PPO ratios per token; "sequence": GSPO, one length-normalised ratio per sequence
    (exp of the MEAN token log-ratio) shared by its tokens."""

    kl_coef: float = 0.0
    """β, weight of KL(π || π_ref); 0 disables the term (and its batch keys)."""

    kl_estimator: Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "full"] = "k3"
    """KL estimator from sampled log-probs (needs ``ref_logprobs``): "k1" (log π − log π_ref),
    "k2" (½(log π − log π_ref)²), "k3" (π_ref/π − 1 − log(π_ref/π)), "abs" (|log π − log π_ref|),
    or verl's straight-through "k1+" / "k3+" (the value of k1 / k3, the gradient of k2); or
    "full": exact KL over the whole vocabulary from ``ref_logits``. The clamps below are opt-in
    (verl clamps k3 at ±20 in and ±10 out always)."""

    kl_log_ratio_clamp: float | None = None
    """Clamp of log(π_ref/π) to ±this before a sampled estimator; null disables."""

    kl_output_clamp: float | None = None
    """Clamp of a sampled per-token KL estimate to ±this; null disables."""

    entropy_coef: float = 0.0
    """c_H: the loss contains −c_H·H, so c_H > 0 rewards entropy (PPO sign convention)."""

    value_coef: float = 0.0
    """c_v, weight of the value loss; > 0 needs the model output (logits, values), ``returns``
    and (with value_clip) ``old_values``."""

    value_clip: float | None = None
    """PPO value clipping: V is kept within ±this of ``old_values``; null disables."""

    is_correction: Literal["none", "truncate", "mask", "seq-mask-truncate"] = "none"
    """Off-policy importance sampling with w = exp(old_logprobs − behaviour_logprobs) per token
    (in online GRPO the behaviour log-probs are the rollout engine's): "truncate" clamps the weight
    to [is_low, is_high] (TIS); "mask" drops tokens with a weight outside it (MIS/icepop; weight 0,
    denominators unchanged); "seq-mask-truncate" truncates token weights and drops whole sequences
    whose geometric-mean weight lies outside [is_seq_low, is_seq_high] (seq-mask-TIS); "none"
    disables."""

    is_level: Literal["token", "sequence", "geometric"] = "token"
    """Weight of truncate/mask: "token" (each token's own w), "sequence" (the product of the
    sequence's token weights), "geometric" (their geometric mean); a sequence weight is shared by
    the sequence's tokens."""

    is_low: float = 0.0
    """Lower bound of the importance weight (see is_correction)."""

    is_high: float = 2.0
    """Upper bound of the importance weight (see is_correction)."""

    is_seq_low: float = 0.99
    """Lower bound of a sequence's geometric-mean weight under "seq-mask-truncate"."""

    is_seq_high: float = 1.01
    """Upper bound of a sequence's geometric-mean weight under "seq-mask-truncate"."""

    temperature: float = 1.0
    """Sampling temperature: the logits are divided by it before every softmax."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("kind", self.kind, ("grpo", "ppo"))
        _check_choice("agg", self.agg, LF.AGG_MODES)
        _check_choice("policy_loss", self.policy_loss, PO.POLICY_LOSSES)
        _check_choice("ratio_level", self.ratio_level, ("token", "sequence"))
        _check_choice("kl_estimator", self.kl_estimator, LF.KL_KINDS + ("full",))
        _check_choice("is_correction", self.is_correction, LF.IS_CORRECTIONS)
        _check_choice("is_level", self.is_level, LF.IS_LEVELS)
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or null, got {self.dual_clip}")
        require_optional_positive_ints(self, ("norm_length",))
        for name in ("kl_coef", "entropy_coef", "value_coef"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("kl_log_ratio_clamp", "kl_output_clamp", "value_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0.0:
                raise ValueError(f"{name} must be > 0 or null, got {value}")
        if not 0.0 <= self.is_low < self.is_high:
            raise ValueError(
                f"is_low must be >= 0 and < is_high, got is_low={self.is_low}, is_high={self.is_high}"
            )
        if not 0.0 <= self.is_seq_low < self.is_seq_high:
            raise ValueError(f"is_seq_low must be >= 0 and < is_seq_high, got is_seq_low="
                             f"{self.is_seq_low}, is_seq_high={self.is_seq_high}")
        if self.dual_clip is not None and self.policy_loss not in ("ppo-clip", "clip-cov"):
            raise ValueError(f"dual_clip applies to policy_loss ppo-clip and clip-cov only, got "
                             f"policy_loss={self.policy_loss!r}")
        if self.ratio_level == "sequence" and self.policy_loss != "ppo-clip":
            raise ValueError(f"ratio_level 'sequence' (GSPO) applies to policy_loss ppo-clip only, got "
                             f"policy_loss={self.policy_loss!r}")
        if not isinstance(self.force_on_policy_ratio, bool):
            raise ValueError(f"force_on_policy_ratio must be true or false, got {self.force_on_policy_ratio!r}")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, "
                             f"clip_cov_ub={self.clip_cov_ub}")
        if self.kl_cov_coef < 0.0:
            raise ValueError(f"kl_cov_coef must be >= 0, got {self.kl_cov_coef}")
        if not isinstance(self.cov_seed, int) or isinstance(self.cov_seed, bool):
            raise ValueError(f"cov_seed must be an integer, got {self.cov_seed!r}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class PolicyLoss(Loss):
    """GRPO / PPO loss (module docstring). Normalised by tokens ("token-mean") or sequences."""

    kind = "grpo"

    def __init__(self, config: PolicyLossConfig, *, vocab_size: int | None = None) -> None:
        super().__init__(config, vocab_size=vocab_size)
        self.kind = config.kind
        self.normalizer = "tokens" if config.agg == "token-mean" else "seqs"
        keys = ["labels", "advantages"] + (["old_logprobs"] if self.reads_old_logprobs else [])
        if config.kl_coef > 0:
            keys.append("ref_logits" if config.kl_estimator == "full" else "ref_logprobs")
        if config.is_correction != "none":
            keys.append("behaviour_logprobs")
        if config.value_coef > 0:
            keys.append("returns")
            if config.value_clip is not None:
                keys.append("old_values")
        self.required_keys = tuple(keys)

    @property
    def reads_old_logprobs(self) -> bool:
        """Whether the batches must carry ``old_logprobs``: the ratio's denominator (unless the
        objective has no ratio or ``force_on_policy_ratio``), the importance weights' numerator,
        the step statistics of clip-cov / kl-cov."""
        cfg = self.config
        ratio = cfg.policy_loss not in PO.RATIO_FREE_LOSSES and not cfg.force_on_policy_ratio
        return ratio or cfg.is_correction != "none" or cfg.policy_loss in ("clip-cov", "kl-cov")

    def step_keys(self) -> tuple[str, ...]:
        """Batch keys written by ``prepare_step`` that this config reads."""
        return {"clip-cov": (COV.SELECT_KEY,), "kl-cov": (COV.SELECT_KEY,),
                "gpg": (COV.GPG_SCALE_KEY,)}.get(self.config.policy_loss, ())

    def prepare_step(self, micro_batches: Sequence[dict], dp_group=None, tp_group=None) -> None:
        """The step statistics of clip-cov / kl-cov (token selection by covariance) and gpg (α),
        over the step's micro-batches on every DP rank (``mrl.losses.covariance``). A no-op for
        the other objectives, and on ranks whose batches carry no advantages (pipeline stages
        before the last, where no loss runs)."""
        cfg = self.config
        if not self.step_keys() or not micro_batches or "advantages" not in micro_batches[0]:
            return
        if cfg.policy_loss == "gpg":
            COV.gpg_scale(micro_batches, ignore_index=cfg.ignore_index, dp_group=dp_group)
            return
        if "old_logprobs" not in micro_batches[0]:
            return
        cov = cfg.policy_loss
        ratio = cfg.clip_cov_ratio if cov == "clip-cov" else cfg.kl_cov_ratio
        COV.covariance_selection(micro_batches, cov, ratio=ratio, lower=cfg.clip_cov_lb, upper=cfg.clip_cov_ub,
                                 seed=cfg.cov_seed, ignore_index=cfg.ignore_index, dp_group=dp_group)

    @property
    def batch_needs(self) -> BatchNeeds:
        """Old-policy log-probs unless the objective reads none (``reads_old_logprobs``); the
        reference's with a KL term (its logits for the exact KL); a PPO loss trains the value
        head as a critic."""
        cfg = self.config
        return BatchNeeds(keys=self.required_keys, temperature=cfg.temperature, old_logprobs=self.reads_old_logprobs,
                          reference_logprobs=cfg.kl_coef > 0,
                          reference_logits=cfg.kl_coef > 0 and cfg.kl_estimator == "full",
                          value_targets=cfg.kind == "ppo")

    def compute(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, values, batch, mask = inputs.logits, inputs.values, inputs.batch, inputs.mask
        counts, group = inputs.counts, inputs.group
        logprobs, entropy = vocab_parallel_logprobs_and_entropy(
            logits, inputs.safe_labels, group, cfg.ignore_index,
            vocab_size=self.vocab_size, chunk_size=cfg.chunk_size, temperature=cfg.temperature,
        )  # [B, S] fp32 each
        data = {k: masked_fill_invalid(v.to(logprobs.dtype), mask) for k, v in inputs.checked.items()}

        def agg(per_token: torch.Tensor) -> torch.Tensor:
            return LF.aggregate(
                per_token, mask, cfg.agg, counts.num_tokens, counts.num_seqs, norm_length=cfg.norm_length
            )

        def token_mean(per_token: torch.Tensor) -> Metric:
            return Metric.mean_fragment(LF.masked_mean(per_token.detach(), mask, counts.num_tokens))

        weights, metrics = self._importance_weights(data, mask, token_mean, counts)
        policy_loss, pg_metrics = self._policy_term(logprobs, data, mask, counts, weights)
        metrics.update(pg_metrics)
        metrics["policy_loss"] = Metric.mean_fragment(policy_loss)
        metrics["advantage_mean"] = token_mean(LF.broadcast_advantages(data["advantages"], logprobs))
        total = policy_loss

        entropy_term = agg(entropy if cfg.entropy_coef > 0 else entropy.detach())
        metrics["entropy"] = Metric.mean_fragment(entropy_term)
        if cfg.entropy_coef > 0:
            total = total - cfg.entropy_coef * entropy_term

        if cfg.kl_coef > 0:
            kl_term = agg(self._kl(logits, logprobs, data, batch, group))
            metrics["kl"] = Metric.mean_fragment(kl_term)
            total = total + cfg.kl_coef * kl_term

        if cfg.value_coef > 0:
            value_term, value_metrics = self._value_loss(values, data, mask, agg, token_mean)
            metrics.update(value_metrics)
            total = total + cfg.value_coef * value_term

        metrics["loss"] = Metric.mean_fragment(total)
        return total, metrics

    def _policy_term(self, logprobs, data, mask, counts, weights) -> tuple[torch.Tensor, Metrics]:
        """L_policy of the objective ``policy_loss`` names (``mrl.losses.policy_objectives``)."""
        cfg = self.config
        adv = data["advantages"]
        common = dict(num_tokens=counts.num_tokens, num_seqs=counts.num_seqs)
        per_token = dict(common, agg=cfg.agg, norm_length=cfg.norm_length, weights=weights)
        kind = cfg.policy_loss
        if kind == "reinforce":
            return PO.reinforce_loss(logprobs, adv, mask, **per_token)
        if kind == "gpg":
            return PO.reinforce_loss(logprobs, adv, mask, scale=data[COV.GPG_SCALE_KEY], **per_token)
        old = logprobs.detach() if cfg.force_on_policy_ratio else data["old_logprobs"]  # [B, S]
        clip = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        if kind == "cispo":
            return PO.cispo_loss(logprobs, old, adv, mask, **clip, **per_token)
        if kind == "sapo":
            return PO.sapo_loss(logprobs, old, adv, mask, tau_pos=cfg.sapo_tau_pos, tau_neg=cfg.sapo_tau_neg,
                                **per_token)
        if kind == "gmpo":
            return PO.gmpo_loss(logprobs, old, adv, mask, **clip, weights=weights, **common)
        if kind == "clip-cov":
            return PO.clip_cov_loss(logprobs, old, adv, mask, data[COV.SELECT_KEY], dual_clip=cfg.dual_clip,
                                    **clip, **per_token)
        if kind == "kl-cov":
            return PO.kl_cov_loss(logprobs, old, adv, mask, data[COV.SELECT_KEY], coef=cfg.kl_cov_coef, **per_token)
        if cfg.ratio_level == "sequence":
            old = LF.sequence_level_old_logprobs(logprobs, old, mask)
        return LF.clipped_pg_loss(logprobs, old, adv, mask, dual_clip=cfg.dual_clip, **clip, **per_token)

    def check_inputs(self, batch, logits, values, counts: GlobalCounts) -> dict[str, torch.Tensor]:
        """The float batch tensors this config uses, shape-checked; checks the value-head output too."""
        cfg = self.config
        shape = tuple(batch["labels"].shape)
        inputs = {"advantages": check_shape(batch, "advantages", shape, shape[:1])}
        missing = [key for key in self.step_keys() if key not in batch]
        if missing:
            raise ValueError(f"{cfg.kind} loss: loss.policy_loss {cfg.policy_loss!r} reads step statistics {missing}; "
                             "call PolicyLoss.prepare_step on the step's micro-batches first (the trainer does)")
        for key in self.step_keys():
            inputs[key] = check_shape(batch, key, shape[:1] if key == COV.GPG_SCALE_KEY else shape)
        for key in self.required_keys:
            if key not in ("labels", "advantages", "ref_logits"):
                inputs[key] = check_shape(batch, key, shape)
        if "ref_logits" in self.required_keys and batch["ref_logits"].shape != logits.shape:
            raise ValueError(f"batch['ref_logits'] must be sharded like the logits {tuple(logits.shape)}, "
                             f"got {tuple(batch['ref_logits'].shape)}")
        if cfg.value_coef > 0:
            if values is None:
                raise ValueError(f"{cfg.kind} loss: value_coef > 0 needs the model output (logits, values)")
            if tuple(values.shape) != shape:
                raise ValueError(f"values from the value head must be [B, S] = {shape}, got {tuple(values.shape)}")
        return inputs

    def _importance_weights(self, data, mask, token_mean, counts) -> tuple[torch.Tensor | None, Metrics]:
        """w = exp(old − behaviour), truncated or masked to [is_low, is_high] (detached)."""
        cfg = self.config
        if cfg.is_correction == "none":
            return None, {}
        log_w = data["old_logprobs"] - data["behaviour_logprobs"]
        weights, outside, seq_outside = LF.importance_weights(
            log_w, mask, correction=cfg.is_correction, level=cfg.is_level, low=cfg.is_low, high=cfg.is_high,
            seq_low=cfg.is_seq_low, seq_high=cfg.is_seq_high)
        raw = torch.exp(log_w.clamp(-LF.MAX_LOG_RATIO, LF.MAX_LOG_RATIO)).detach()  # [B, S]
        metrics: Metrics = {
            "is_weight_mean": token_mean(weights),
            "is_weight_max": masked_max(raw, mask),
            "is_outside_frac": token_mean(outside.to(raw.dtype)),
            "is_outside_seq_frac": Metric.mean_fragment(
                LF.masked_mean(seq_outside.to(raw.dtype), mask.any(-1), counts.num_seqs)),
        }
        return weights, metrics

    def _kl(self, logits, logprobs, data, batch, group) -> torch.Tensor:
        """Per-token KL(π || π_ref) [B, S]."""
        cfg = self.config
        if cfg.kl_estimator == "full":
            return vocab_parallel_kl(
                logits, batch["ref_logits"].detach(), group,
                vocab_size=self.vocab_size, chunk_size=cfg.chunk_size, temperature=cfg.temperature,
            )
        return LF.kl_estimate(
            logprobs, data["ref_logprobs"], cfg.kl_estimator,
            log_ratio_clamp=cfg.kl_log_ratio_clamp, output_clamp=cfg.kl_output_clamp,
        )

    def _value_loss(self, values, data, mask, agg, token_mean) -> tuple[torch.Tensor, Metrics]:
        """½(V − R)², or with clipping ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)."""
        cfg = self.config
        values = torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32))  # [B, S]
        returns = data["returns"]
        per_token = 0.5 * (values - returns).square()
        metrics: Metrics = {"value_mean": token_mean(values)}
        if cfg.value_clip is not None:
            old_values = data["old_values"]
            clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
            clipped_loss = 0.5 * (clipped - returns).square()
            metrics["value_clip_frac"] = token_mean((clipped_loss > per_token).float())
            per_token = torch.maximum(per_token, clipped_loss)
        value_term = agg(per_token)
        metrics["value_loss"] = Metric.mean_fragment(value_term)
        return value_term, metrics
