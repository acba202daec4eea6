"""Policy-gradient objectives beside PPO's clipped surrogate, selected by ``loss.policy_loss``.

Each function takes the current log-probs ``logprobs`` [B, S] (with their gradient), the
advantages ([B, S] or per-sequence [B]), the bool ``mask`` [B, S] of valid tokens, and, for
the ratio-based objectives, the log-probs ``old`` [B, S] the ratio r = exp(logprobs − old) is
taken against (``old = logprobs.detach()`` gives the on-policy ratio: 1 in value, ∇r = ∇log π).
They return ``(loss, metrics)``: the loss aggregated like ``functional.aggregate`` with the
step's global counts (so micro-batch / DP splits sum to the global loss) and token-mean metrics.
``weights`` (detached importance weights [B, S], e.g. ``functional.importance_weights``)
multiply each token's term. log r is bounded by ±``MAX_LOG_RATIO`` before exp.

Objectives (ℓ_t per token; the loss is ``aggregate(ℓ)`` unless said otherwise):

- ``ppo-clip`` (``functional.clipped_pg_loss``): max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)).
- ``cispo`` (MiniMax-M1, arXiv 2506.13585; NeMo RL ``use_cispo``):
  ℓ = −sg(clip(r, 1−ε_low, 1+ε_high))·A·log π. The weight is clipped and stopped, so every
  token keeps the gradient −clip(r)·A·∇log π (PPO drops the clipped tokens' gradient).
- ``reinforce`` (REINFORCE; NeMo RL ``disable_ppo_ratio``): ℓ = −A·log π, no ratio, no clip.
- ``gpg`` (Group Policy Gradient, Chu et al., arXiv 2504.02546; verl ``gpg``):
  ℓ = −α·A·log π with α = B/(B − M): B sequences of the step, M of them with zero advantage
  (groups whose rewards are all equal), so the gradient is not diluted by rows that carry none.
- ``sapo`` (Soft Adaptive Policy Optimization, Gao et al., arXiv 2511.20347):
  ℓ = −(4/τ)·σ(τ·(r − 1))·A with τ = τ_pos where A > 0 and τ_neg otherwise: a smooth gate in
  place of the hard clip; ∇ℓ = −4·σ(1 − σ)·r·A·∇log π, equal to PPO's −r·A·∇log π at r = 1 and
  decaying smoothly away from it (faster for the larger τ).
- ``gmpo`` (Geometric-Mean Policy Optimization, Zhao et al., arXiv 2507.20673; verl
  ``geo_mean``): a SEQUENCE objective. Per token the log-ratio l_t = log r_t is clipped in log
  space, pessimistically for the sign of the token's advantage:
  l̃_t = sgn(A_t)·min(sgn(A_t)·l_t, sgn(A_t)·clip(l_t, −ε_low, ε_high));
  ρ_i = exp(mean_t l̃_t) (the geometric mean of the clipped token ratios), and
  ℓ_i = −Â_i·ρ_i with Â_i the mean advantage over the row's valid tokens; the loss is
  Σ_i ℓ_i / (number of sequences), whatever ``agg`` says. ε are log-space bounds here (the paper
  uses ε = 0.4, i.e. ratios in (e^−0.4, e^0.4)).
- ``clip-cov`` (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617;
  verl ``clip_cov``): ppo-clip, with the gradient of the step's selected high-covariance tokens
  stopped (``functional.clipped_pg_loss`` on ``where(select, sg(log π), log π)``): see
  ``mrl.losses.covariance`` for the selection.
- ``kl-cov`` (same paper; verl ``kl_cov``): the UNCLIPPED surrogate −A·r on every token, plus
  k·|log r| on the step's top-k fraction of tokens by covariance (``select``).
"""

from __future__ import annotations

import torch

from mrl.losses import functional as LF
from mrl.losses.metrics import Metric, Metrics, masked_max, masked_min

POLICY_LOSSES: tuple[str, ...] = ("ppo-clip", "cispo", "clip-cov", "kl-cov", "gmpo", "sapo", "gpg", "reinforce")
RATIO_FREE_LOSSES: tuple[str, ...] = ("reinforce", "gpg")
"""Objectives without an importance ratio: they never read ``old_logprobs``."""


def _aligned(logprobs, old, advantages, mask):
    """(mask [B, S] bool, advantages [B, S] zero outside it, log r [B, S] bounded, zero outside)."""
    if old is not None and old.shape != logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old log-probs and mask {tuple(mask.shape)} "
                         "must have the same shape")
    mask = mask.bool()
    zeros = torch.zeros_like(logprobs)
    advantages = torch.where(mask, LF.broadcast_advantages(advantages, logprobs), zeros)  # [B, S]
    log_ratio = None
    if old is not None:
        log_ratio = torch.where(mask, logprobs - old, zeros).clamp(-LF.MAX_LOG_RATIO, LF.MAX_LOG_RATIO)
    return mask, advantages, log_ratio


def _weighted(per_token, mask, weights):
    return per_token if weights is None else per_token * torch.where(mask, weights, torch.zeros_like(per_token))


def ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, num_tokens) -> Metrics:
    """``ratio_mean`` / ``ratio_min`` / ``ratio_max`` and ``approx_kl`` (k3 of KL(π_old || π))."""
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        return {
            "ratio_mean": Metric.mean_fragment(LF.masked_mean(ratio, mask, num_tokens)),
            "ratio_min": masked_min(ratio, mask),
            "ratio_max": masked_max(ratio, mask),
            "approx_kl": Metric.mean_fragment(LF.masked_mean(torch.expm1(log_ratio) - log_ratio, mask, num_tokens)),
        }


def _frac(flag: torch.Tensor, mask: torch.Tensor, num_tokens) -> Metric:
    return Metric.mean_fragment(LF.masked_mean(flag.to(torch.float32), mask, num_tokens))


def cispo_loss(logprobs, old, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg="token-mean",
               num_tokens=None, num_seqs=None, norm_length=None, weights=None) -> tuple[torch.Tensor, Metrics]:
    """CISPO: ℓ = −sg(clip(r, 1 − clip_low, 1 + clip_high))·A·log π (module docstring).

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` (r below / above the bounds, whatever the sign
    of A: CISPO clips the weight of every token) and the ratio metrics."""
    mask, adv, log_ratio = _aligned(logprobs, old, advantages, mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()  # [B, S]
    lp = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    per_token = _weighted(-weight * adv * lp, mask, weights)
    loss = LF.aggregate(per_token, mask, agg, num_tokens, num_seqs, norm_length=norm_length)
    metrics = ratio_metrics(log_ratio, mask, num_tokens)
    metrics["clip_frac_low"] = _frac(ratio.detach() < 1.0 - clip_low, mask, num_tokens)
    metrics["clip_frac_high"] = _frac(ratio.detach() > 1.0 + clip_high, mask, num_tokens)
    return loss, metrics


def reinforce_loss(logprobs, advantages, mask, *, scale=None, agg="token-mean", num_tokens=None, num_seqs=None,
                   norm_length=None, weights=None) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE / GPG: ℓ = −s·A·log π, s = ``scale`` (per sequence [B], GPG's α) or 1."""
    mask, adv, _ = _aligned(logprobs, None, advantages, mask)
    if scale is not None:
        adv = adv * scale.to(adv.dtype).unsqueeze(-1)
    lp = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    per_token = _weighted(-adv * lp, mask, weights)
    return LF.aggregate(per_token, mask, agg, num_tokens, num_seqs, norm_length=norm_length), {}


def sapo_loss(logprobs, old, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="token-mean", num_tokens=None,
              num_seqs=None, norm_length=None, weights=None) -> tuple[torch.Tensor, Metrics]:
    """SAPO: ℓ = −(4/τ)·σ(τ(r − 1))·A, τ = tau_pos where A > 0 else tau_neg (module docstring).

    Metric ``sapo_gate_mean``: mean of the gradient weight 4σ(1 − σ) (1 on-policy, → 0 far off)."""
    mask, adv, log_ratio = _aligned(logprobs, old, advantages, mask)
    ratio = torch.exp(log_ratio)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # [B, S]
    gate = torch.sigmoid(tau * (ratio - 1.0))
    per_token = _weighted(-(4.0 / tau) * gate * adv, mask, weights)
    loss = LF.aggregate(per_token, mask, agg, num_tokens, num_seqs, norm_length=norm_length)
    metrics = ratio_metrics(log_ratio, mask, num_tokens)
    g = gate.detach()
    metrics["sapo_gate_mean"] = Metric.mean_fragment(LF.masked_mean(4.0 * g * (1.0 - g), mask, num_tokens))
    return loss, metrics


def gmpo_loss(logprobs, old, advantages, mask, *, clip_low=0.4, clip_high=0.4, num_tokens=None, num_seqs=None,
              weights=None) -> tuple[torch.Tensor, Metrics]:
    """GMPO: Σ_i −Â_i·exp(mean_t l̃_t) / num_seqs with log-space clipping (module docstring).

    ``weights`` [B, S]: a row's weight is the mean of its tokens' (the shared weight of the
    "sequence"/"geometric" levels). Metrics: ``clip_frac_low`` (A < 0, l < −clip_low: the clip is
    active) and ``clip_frac_high`` (A > 0, l > clip_high), the ratio metrics of the token ratios."""
    mask, adv, log_ratio = _aligned(logprobs, old, advantages, mask)
    sign = torch.sign(adv)  # [B, S]
    clipped = log_ratio.clamp(-clip_low, clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)  # [B, S]
    lengths = mask.sum(-1).clamp_min(1).to(logprobs.dtype)  # [B]
    rows = mask.any(-1)  # [B]
    seq_log_ratio = torch.where(mask, pessimistic, torch.zeros_like(pessimistic)).sum(-1) / lengths  # [B]
    seq_adv = adv.sum(-1) / lengths  # [B]
    per_seq = -seq_adv * torch.exp(seq_log_ratio)  # [B]
    if weights is not None:
        per_seq = per_seq * torch.where(mask, weights, torch.zeros_like(weights)).sum(-1) / lengths
    per_seq = torch.where(rows, per_seq, torch.zeros_like(per_seq))
    loss = LF._safe_div(per_seq.sum(), rows.sum() if num_seqs is None else num_seqs)
    metrics = ratio_metrics(log_ratio, mask, num_tokens)
    with torch.no_grad():
        metrics["clip_frac_low"] = _frac((adv < 0) & (log_ratio < -clip_low), mask, num_tokens)
        metrics["clip_frac_high"] = _frac((adv > 0) & (log_ratio > clip_high), mask, num_tokens)
    return loss, metrics


def clip_cov_loss(logprobs, old, advantages, mask, select, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                  agg="token-mean", num_tokens=None, num_seqs=None, norm_length=None,
                  weights=None) -> tuple[torch.Tensor, Metrics]:
    """Clip-Cov: ppo-clip with the gradient of the ``select`` [B, S] tokens stopped.

    The selected tokens keep their loss VALUE (the paper detaches their gradient); verl's
    ``clip_cov`` multiplies their term by 0 instead, which gives the same gradient and a loss
    smaller by the selected tokens' terms. Metric ``cov_select_frac``: the selected fraction."""
    mask = mask.bool()
    select = select.bool() & mask
    stopped = torch.where(select, logprobs.detach(), logprobs)
    loss, metrics = LF.clipped_pg_loss(stopped, old, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                       dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                       norm_length=norm_length, weights=weights)
    metrics["cov_select_frac"] = _frac(select, mask, num_tokens)
    return loss, metrics


def kl_cov_loss(logprobs, old, advantages, mask, select, *, coef=1.0, agg="token-mean", num_tokens=None,
                num_seqs=None, norm_length=None, weights=None) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov: ℓ = −A·r + coef·|log r|·[token selected] (no clipping), as the paper and verl.

    Metrics: ``cov_select_frac`` and ``kl_cov_abs`` (token mean of |log r| over all tokens)."""
    mask, adv, log_ratio = _aligned(logprobs, old, advantages, mask)
    select = select.bool() & mask
    ratio = torch.exp(log_ratio)
    penalty = torch.where(select, log_ratio.abs(), torch.zeros_like(log_ratio))
    per_token = _weighted(-adv * ratio + coef * penalty, mask, weights)
    loss = LF.aggregate(per_token, mask, agg, num_tokens, num_seqs, norm_length=norm_length)
    metrics = ratio_metrics(log_ratio, mask, num_tokens)
    metrics["cov_select_frac"] = _frac(select, mask, num_tokens)
    metrics["kl_cov_abs"] = Metric.mean_fragment(LF.masked_mean(log_ratio.detach().abs(), mask, num_tokens))
    return loss, metrics
