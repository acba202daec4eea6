"""Masked arithmetic over per-token log-probs: the functional core of every loss.

Nothing here communicates. Layout invariance comes from the denominators: a caller that passes the
GLOBAL counts (``num_tokens``, ``num_seqs``: totals over every micro-batch and DP rank of the step)
gets back ``local_sum / global_count``, so the sum of the results over micro-batches and ranks is
the global mean. Without them the local counts are used. A count of 0 (all-masked input) gives 0,
never NaN.

Shapes: per-token tensors are ``[B, S]`` (leading dims count as sequences, the last dim is tokens)
with a 0/1 ``mask`` of the same shape; advantages are ``[B, S]`` or ``[B]``. Metrics come back as
``dict[str, Metric]`` (``mrl.losses.metrics``); token metrics are token means (divided by
``num_tokens``) whatever the loss's aggregation mode.
"""

from __future__ import annotations

import math

import torch

from mrl.losses.metrics import Metric, Metrics, masked_max, masked_min

AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "abs", "k1+", "k3+")

# |log-ratio| bound before exp() in the policy ratio: exp(20) ≈ 5e8 lies far outside any clip
# range, and the bound keeps inf out of the backward pass (0·inf = NaN).
MAX_LOG_RATIO = 20.0


def _safe_div(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count`` with a count of 0 read as 1 (the total is then 0 too)."""
    if isinstance(count, torch.Tensor):
        count = count.to(total.dtype)
        return total / torch.where(count > 0, count, torch.ones_like(count))
    return total / (count if count > 0 else 1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values·mask, with values at masked positions ignored even when they are inf/NaN."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count=None) -> torch.Tensor:
    """Σ values·mask / N, N = ``count`` (e.g. the global number of tokens) if given else Σ mask."""
    return _safe_div(masked_sum(values, mask), mask.sum() if count is None else count)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_tokens=None,
    num_seqs=None,
    *,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [B, S] to a scalar under ``mask``.

    - ``token-mean``: Σ x·m / N (N = ``num_tokens`` or Σ m);
    - ``seq-mean-token-mean``: Σ_i (Σ_t x·m / Σ_t m) / M (M = ``num_seqs`` or the number of rows
      with a valid token);
    - ``seq-mean-token-sum``: Σ x·m / M;
    - ``seq-mean-token-sum-norm``: Σ x·m / (M·L), a constant normaliser with L = ``norm_length``
      (default: S). Pass the same L for every micro-batch, e.g. the maximum response length.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))  # [B, S]
    if mode == "token-mean":
        return _safe_div(masked.sum(), mask.sum() if num_tokens is None else num_tokens)
    tokens_per_seq = mask.sum(-1)  # [B]
    seqs = (tokens_per_seq > 0).sum() if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / tokens_per_seq.clamp_min(1).to(values.dtype)  # [B]
        return _safe_div(per_seq.sum(), seqs)
    if mode == "seq-mean-token-sum":
        return _safe_div(masked.sum(), seqs)
    length = values.shape[-1] if norm_length is None else norm_length
    return _safe_div(masked.sum(), seqs) / length


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str,
    *,
    log_ratio_clamp: float | None = None,
    output_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π.

    With logr = ref − logprobs (optionally clamped to ±``log_ratio_clamp``):
    k1 = −logr, k2 = logr²/2, k3 = exp(logr) − 1 − logr, abs = |logr| (verl's "abs"); the result
    is optionally clamped to ±``output_clamp``.

    Straight-through variants (verl's ``kl_penalty`` with a "+" suffix): "k1+" and "k3+" take the
    VALUE of k1 / k3 (with the clamps above) and the GRADIENT of k2 on the unclamped log-ratio,
    value = sg(k) + k2 − sg(k2), so ∇ = (log π − log π_ref)·∇log π: k2's gradient is the
    gradient of KL(π || π_ref) in expectation over samples of π, which k1's and k3's are not.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"KL estimator must be one of {KL_KINDS}, got {kind!r}")
    base = kind.rstrip("+")
    raw_log_ratio = ref_logprobs - logprobs
    log_ratio = raw_log_ratio
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if base == "k1":
        kl = -log_ratio
    elif base == "k2":
        kl = 0.5 * log_ratio.square()
    elif base == "abs":
        kl = log_ratio.abs()
    else:
        kl = torch.expm1(log_ratio) - log_ratio
    if output_clamp is not None:
        kl = kl.clamp(-output_clamp, output_clamp)
    if kind.endswith("+"):
        k2 = 0.5 * raw_log_ratio.square()
        kl = kl.detach() + (k2 - k2.detach())
    return kl


def broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages [B] expanded to ``like``'s [B, S]; per-token ones unchanged."""
    if advantages.shape == like.shape:
        return advantages
    if advantages.shape == like.shape[:-1]:
        return advantages.unsqueeze(-1).expand_as(like)
    raise ValueError(
        f"advantages must have shape {tuple(like.shape)} or {tuple(like.shape[:-1])}, "
        f"got {tuple(advantages.shape)}"
    )


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, aggregated with ``agg``.

    r = exp(logprobs − old), ℓ = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)); with
    ``dual_clip`` = c > 1, ℓ = min(ℓ, −c·A) where A < 0. ``weights`` (detached, e.g. importance
    weights) multiply ℓ per token. log r is bounded by ±20 before exp.

    Metrics (token means): ``clip_frac_low`` (A < 0 and r < 1 − clip_low: the lower bound is
    active), ``clip_frac_high`` (A > 0 and r > 1 + clip_high), ``dual_clip_frac`` (with
    ``dual_clip``), ``ratio_mean``/``ratio_min``/``ratio_max`` and ``approx_kl`` = mean of
    r − 1 − log r, the k3 estimate of KL(π_old || π).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    mask = mask.bool()
    zeros = torch.zeros_like(logprobs)
    # Values at masked positions are replaced, so NaN/inf padding cannot reach the backward.
    advantages = torch.where(mask, broadcast_advantages(advantages, logprobs), zeros)  # [B, S]
    log_ratio = torch.where(mask, logprobs - old_logprobs, zeros).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    metrics: Metrics = {}
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
        metrics["dual_clip_frac"] = Metric.mean_fragment(masked_mean(dual_active.to(ratio.dtype), mask, num_tokens))
    if weights is not None:
        per_token = per_token * torch.where(mask, weights, zeros)
    loss = aggregate(per_token, mask, agg, num_tokens, num_seqs, norm_length=norm_length)

    with torch.no_grad():
        low = (advantages < 0) & (ratio < 1.0 - clip_low)
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
        metrics["clip_frac_low"] = Metric.mean_fragment(masked_mean(low.to(ratio.dtype), mask, num_tokens))
        metrics["clip_frac_high"] = Metric.mean_fragment(masked_mean(high.to(ratio.dtype), mask, num_tokens))
        metrics["ratio_mean"] = Metric.mean_fragment(masked_mean(ratio, mask, num_tokens))
        metrics["ratio_min"] = masked_min(ratio, mask)
        metrics["ratio_max"] = masked_max(ratio, mask)
        metrics["approx_kl"] = Metric.mean_fragment(masked_mean(torch.expm1(log_ratio) - log_ratio, mask, num_tokens))
    return loss, metrics


def sequence_level_old_logprobs(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Old log-probs that turn ``clipped_pg_loss``'s token ratios into GSPO sequence ratios.

    Returns o with logprobs − o = sg(s_i) + logprobs − sg(logprobs), where
    s_i = mean_t (logprobs − old) over the valid tokens of sequence i (a length-normalised
    sequence log-ratio): every token of sequence i gets ratio exp(s_i), and its gradient is
    exp(s_i)·∇log π(y_t) (the GSPO-token form; with per-sequence advantages it equals GSPO).
    """
    mask = mask.bool()
    with torch.no_grad():
        diff = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, S]
        seq_log_ratio = diff.sum(-1) / mask.sum(-1).clamp_min(1).to(logprobs.dtype)  # [B]
        return logprobs - seq_log_ratio.unsqueeze(-1)


IS_LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")
IS_CORRECTIONS: tuple[str, ...] = ("none", "truncate", "mask", "seq-mask-truncate")


def importance_weights(
    log_w: torch.Tensor, mask: torch.Tensor, *, correction: str, level: str = "token",
    low: float = 0.0, high: float = 2.0, seq_low: float = 0.0, seq_high: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Off-policy importance weights from per-token log w = old − behaviour log-probs [B, S].

    level: "token" (w per token), "sequence" (a sequence's weight is the product of its token
    weights, exp Σ log w), "geometric" (their geometric mean, exp mean log w); a sequence's weight
    is shared by its tokens. correction: "truncate" clamps the weight to [low, high]; "mask" sets
    it to 0 outside; "seq-mask-truncate" truncates token weights to [low, high] and masks whole
    sequences whose geometric-mean weight lies outside [seq_low, seq_high]; "none" keeps w.

    Returns (weights [B, S], token_outside [B, S] bool, seq_outside [B] bool): which tokens and
    sequences had their weight truncated or masked. Masked positions get weight 0.
    """
    mask = mask.bool()
    log_w = torch.where(mask, log_w, torch.zeros_like(log_w)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    lengths = mask.sum(-1).clamp_min(1).to(log_w.dtype)  # [B]
    if level == "token" or correction == "seq-mask-truncate":
        level_log_w = log_w
    elif level == "sequence":
        level_log_w = log_w.sum(-1, keepdim=True).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).expand_as(log_w)
    elif level == "geometric":
        level_log_w = (log_w.sum(-1) / lengths).unsqueeze(-1).expand_as(log_w)
    else:
        raise ValueError(f"importance-weight level must be one of {list(IS_LEVELS)}, got {level!r}")
    raw = torch.exp(level_log_w)
    outside = ((raw < low) | (raw > high)) & mask
    if correction in ("truncate", "seq-mask-truncate"):
        weights = raw.clamp(low, high)
    elif correction == "mask":
        weights = torch.where(outside, torch.zeros_like(raw), raw)
    elif correction == "none":
        weights = raw
    else:
        raise ValueError(f"importance-sampling correction must be one of {list(IS_CORRECTIONS)}, got {correction!r}")
    seq_outside = outside.any(-1)
    if correction == "seq-mask-truncate":
        geometric = torch.exp(log_w.sum(-1) / lengths)  # [B]
        dropped = (geometric < seq_low) | (geometric > seq_high)
        weights = torch.where(dropped.unsqueeze(-1), torch.zeros_like(weights), weights)
        outside = outside | (dropped.unsqueeze(-1) & mask)
        seq_outside = seq_outside | (dropped & mask.any(-1))
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    return weights.detach(), outside, seq_outside
