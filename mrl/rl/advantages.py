"""Advantage estimators: one function each, and the registry ``rollout.advantage_estimator`` names.

Two kinds of estimator:

- **sequence-level** (``grpo``, ``rloo``, ``remax``, ``opo``, ``passk``): one advantage per
  response ``[N]`` from the responses' rewards and their groups (the responses to one prompt);
  the loss broadcasts it over the response's tokens. They need nothing from the model.
- **token-level** (``gae``, ``reinforce++``, ``reinforce++-baseline``, ``optimal-token-baseline``):
  one advantage per token ``[N, T]``. Their per-token rewards are the reward function's token
  credits when it returns them, else the sequence reward on the last valid token
  (``outcome_token_rewards``), minus ``β·(log π_old − log π_ref)`` per token with
  ``rollout.kl_in_reward_coef`` = β > 0 (``kl_penalized_rewards``). They run where the old-policy
  log-probs / values are (the last pipeline stage), on the global batch.

Tensors: ``[N]`` per response, ``[N, T]`` per token with a 0/1 ``mask`` of the valid (response)
tokens; masked positions are ignored (their values may be anything) and come back as 0. Groups
are given by ``group_ids`` [N] (any order, any sizes) or, for consecutive equal groups, a size.
Results do not depend on how the rows are split over micro-batches or DP ranks as long as the
call site hands every estimator the rows of the whole global batch (``mrl.rl.advantage_batches``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from mrl.losses.metrics import Metric, Metrics

# Whitening adds this to the variance (OpenRLHF and verl use the same constant).
WHITEN_EPS = 1e-8


# ---- groups -----------------------------------------------------------------------------------


def _groups(n: int, group_size: int | None, group_ids: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse [N]: group index of each row, sizes [G]) of consecutive groups or of ``group_ids``."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size and group_ids")
    if group_ids is None:
        if not isinstance(group_size, int) or group_size < 1 or n % group_size != 0:
            raise ValueError(f"group_size must be a positive integer dividing the number of rewards {n}, "
                             f"got {group_size!r}")
        group_ids = torch.arange(n, device=device) // group_size
    elif group_ids.shape != (n,):
        raise ValueError(f"group_ids must have the shape of rewards ({n},), got {tuple(group_ids.shape)}")
    _, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)  # [N], [G]
    return inverse, sizes


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-d float tensor, got {rewards.dtype} {tuple(rewards.shape)}")


def _check_tokens(mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [N, T], got shape {tuple(mask.shape)}")
    for name, value in tensors.items():
        if value is not None and value.shape != mask.shape:
            raise ValueError(f"{name} {tuple(value.shape)} and mask {tuple(mask.shape)} differ in shape")


# ---- GRPO / RLOO --------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO advantages for ``rewards`` [N] grouped by prompt (DeepSeekMath, Shao et al. 2024).

    Groups: consecutive runs of ``group_size`` rows, or the rows sharing a value of ``group_ids``
    [N] (any order, any group sizes); give exactly one. A_i = r_i − b_i with b_i the group mean,
    or with ``leave_one_out`` the mean of the OTHER members (RLOO, Ahmadian et al. 2024:
    A_i = n/(n−1)·(r_i − mean)); with ``normalize_std`` A_i /= (std_g + eps), std_g the unbiased
    group standard deviation (``normalize_std`` off is Dr. GRPO). Groups whose rewards are all
    equal (single-member groups included) get advantage exactly 0.
    Metrics: ``groups`` and ``zero_variance_groups`` (counts).
    """
    _check_rewards(rewards)
    inverse, sizes = _groups(rewards.numel(), group_size, group_ids, rewards.device)
    sizes = sizes.to(rewards.dtype)

    def group_sum(x: torch.Tensor) -> torch.Tensor:  # [N] -> [G]
        return torch.zeros_like(sizes).index_add_(0, inverse, x)

    mean = (group_sum(rewards) / sizes)[inverse]  # [N]
    if leave_one_out:
        baseline = (group_sum(rewards)[inverse] - rewards) / (sizes[inverse] - 1).clamp_min(1)
    else:
        baseline = mean
    advantages = rewards - baseline  # [N]
    if normalize_std:
        variance = group_sum((rewards - mean).square()) / (sizes - 1).clamp_min(1)  # [G]
        advantages = advantages / (variance.sqrt()[inverse] + eps)
    high = torch.full_like(sizes, -math.inf).scatter_reduce(0, inverse, rewards, "amax")  # [G]
    low = torch.full_like(sizes, math.inf).scatter_reduce(0, inverse, rewards, "amin")  # [G]
    zero_variance = high == low  # [G]
    advantages = torch.where(zero_variance[inverse], torch.zeros_like(advantages), advantages)
    metrics: Metrics = {
        "groups": Metric.count(torch.tensor(sizes.numel(), device=rewards.device)),
        "zero_variance_groups": Metric.count(zero_variance.sum()),
    }
    return advantages, metrics


def token_group_advantages(credits: torch.Tensor, present: torch.Tensor, group_size: int, *,
                           normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Token-level GRPO: per-token advantages [N, T] from per-token credits [N, T].

    Column t is token t of each response (positions within the response), ``present`` [N, T]
    the 0/1 mask of existing tokens, groups are consecutive runs of ``group_size`` rows. With
    G_t the responses of a group that have a token t: A[i, t] = (r[i, t] − mean_{G_t} r[·, t]) /
    (std_{G_t} r[·, t] + ε) (unbiased std; no division without ``normalize_std``). Positions
    that only one response reaches, or where all responses agree, get 0 (see ``mrl.rl.credit``).
    """
    n, length = credits.shape
    groups = credits.view(n // group_size, group_size, length)  # [P, G, T]
    mask = present.view_as(groups).to(credits.dtype)
    count = mask.sum(1, keepdim=True)  # [P, 1, T]
    mean = (groups * mask).sum(1, keepdim=True) / count.clamp_min(1)
    centred = (groups - mean) * mask
    if normalize_std:
        var = centred.square().sum(1, keepdim=True) / (count - 1).clamp_min(1)
        centred = centred / (var.sqrt() + eps)
    centred = torch.where(count > 1, centred, torch.zeros_like(centred))
    return centred.view(n, length)


# ---- per-token rewards, returns, whitening ------------------------------------------------------


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] rewards with the sequence reward ``rewards`` [N] on each row's last valid token
    (0 elsewhere; a row without valid tokens gets none)."""
    _check_tokens(mask)
    valid = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [N, T]
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(-1)  # [N]
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)  # [N, T]
    rows = (last >= 0).nonzero().squeeze(-1)
    out[rows, last[rows]] = rewards[rows]
    return out


def kl_penalized_rewards(token_rewards: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, coef: float) -> torch.Tensor:
    """KL as a reward penalty: r_t − β·(log π_old(y_t) − log π_ref(y_t)) on valid tokens [N, T].

    The k1 estimate of KL(π_old || π_ref) per sampled token, subtracted from the reward before the
    estimator (InstructGPT, Ouyang et al. 2022; OpenRLHF/verl ``use_kl_in_reward``, NeMo RL
    ``use_kl_in_reward``) instead of a β·KL term in the loss.
    """
    _check_tokens(mask, token_rewards=token_rewards, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    valid = mask.bool()
    kl = torch.where(valid, old_logprobs - ref_logprobs, torch.zeros_like(token_rewards))  # [N, T]
    return torch.where(valid, token_rewards, torch.zeros_like(token_rewards)) - coef * kl


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + γ·G_{t'} over the valid tokens of each row (t' the next valid token; G = 0
    after the last one). Masked positions are skipped (not discounted) and come back as 0. [N, T]"""
    _check_tokens(mask, token_rewards=token_rewards)
    valid = mask.bool()
    out = torch.zeros_like(token_rewards)  # [N, T]
    carry = torch.zeros_like(token_rewards[:, 0])  # [N]
    for t in range(mask.shape[1] - 1, -1, -1):
        carry = torch.where(valid[:, t], token_rewards[:, t] + gamma * carry, carry)
        out[:, t] = torch.where(valid[:, t], carry, torch.zeros_like(carry))
    return out


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) for the value-head PPO.

    Over the valid tokens of each row, t' the next valid token (V(t') = 0 after the last one):
    δ_t = r_t + γ·V(t') − V(t), A_t = δ_t + γλ·A_{t'}; returns R_t = A_t + V(t) (the value
    targets). With γ = λ = 1, A_t = Σ_{k ≥ t} r_k − V(t) (return-to-go minus value); with λ = 0,
    A_t = δ_t. Masked positions are skipped and come back as 0. Returns (advantages, returns) [N, T].
    """
    _check_tokens(mask, token_rewards=token_rewards, values=values)
    valid = mask.bool()
    zeros = torch.zeros_like(token_rewards)
    values = torch.where(valid, values, zeros)
    advantages = torch.zeros_like(token_rewards)  # [N, T]
    next_value = torch.zeros_like(token_rewards[:, 0])  # [N]
    next_advantage = torch.zeros_like(next_value)
    for t in range(mask.shape[1] - 1, -1, -1):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * next_advantage
        next_advantage = torch.where(valid[:, t], step, next_advantage)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(valid[:, t], step, torch.zeros_like(step))
    return advantages, torch.where(valid, advantages + values, zeros)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, group=None, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) with μ, σ² the mean and population variance of x over the valid
    tokens of the batch, and of every rank of ``group`` (summed in float64, two all-reduces).

    The population variance (÷N) is OpenRLHF's; verl's ``masked_whiten`` uses the unbiased one
    (÷(N−1)), a factor sqrt(N/(N−1)) larger in the result. Masked positions come back as 0.
    """
    valid = mask.bool()
    x = torch.where(valid, values, torch.zeros_like(values)).double()
    sums = torch.stack([x.sum(), valid.sum().double()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    mean = sums[0] / sums[1].clamp_min(1)
    squares = torch.where(valid, (x - mean).square(), torch.zeros_like(x)).sum().reshape(1)
    if group is not None:
        dist.all_reduce(squares, group=group)
    variance = squares[0] / sums[1].clamp_min(1)
    out = (x - mean) / torch.sqrt(variance + eps)
    return torch.where(valid, out, torch.zeros_like(out)).to(values.dtype)


# ---- REINFORCE++ ------------------------------------------------------------------------------


def reinforce_pp(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, whiten_batch: bool = True,
                 group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262; OpenRLHF ``reinforce``, verl ``reinforce_plus_plus``).

    G_t = Σ_{k ≥ t} γ^{k−t} r_k over the valid tokens (the per-token rewards already hold the
    sequence reward on the last token and −β·KL_t with KL in the reward); A = whiten(G) over the
    valid tokens of the global batch (``whiten``). Returns (advantages, returns G) [N, T].
    """
    returns = returns_to_go(token_rewards, mask, gamma)
    advantages = whiten(returns, mask, group=group) if whiten_batch else returns
    return advantages, returns


def group_mean_baseline(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[N] mean reward of each row's group (the row itself included)."""
    _check_rewards(rewards)
    inverse, sizes = _groups(rewards.numel(), None, group_ids, rewards.device)
    sums = torch.zeros(sizes.shape, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    return (sums / sizes.to(rewards.dtype))[inverse]


# ---- ReMax, OPO, pass@k --------------------------------------------------------------------------


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax (Li et al. 2023, arXiv:2310.10505): A_i = r_i − r(greedy response to i's prompt).

    The baseline is the reward of the prompt's greedy (argmax) completion, one per prompt, shared
    by all its sampled responses. verl's ``remax`` subtracts it from every token's return-to-go;
    with an outcome reward that is the same number on every token. [N]
    """
    _check_rewards(rewards)
    if greedy_rewards.shape != rewards.shape:
        raise ValueError(f"greedy_rewards {tuple(greedy_rewards.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    return rewards - greedy_rewards.to(rewards.dtype)


def opo_advantages(rewards: torch.Tensor, lengths: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline", arXiv:2505.23585).

    The length-weighted baseline b_g = Σ_j |o_j|·r_j / Σ_j |o_j| over the group (all members,
    |o_j| the response's token count; the variance-optimal baseline when the squared gradient
    norm of a response grows with its length): A_i = r_i − b_g. A group whose lengths are all 0
    falls back to the plain mean. A single-member group gets 0 (verl's ``opo`` sets its baseline
    to 0 instead, so A = r there). [N]
    """
    _check_rewards(rewards)
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    inverse, sizes = _groups(rewards.numel(), None, group_ids, rewards.device)
    weights = lengths.to(rewards.dtype)
    zeros = torch.zeros(sizes.shape, dtype=rewards.dtype, device=rewards.device)
    weighted = zeros.clone().index_add_(0, inverse, weights * rewards)  # [G]
    total = zeros.clone().index_add_(0, inverse, weights)  # [G]
    plain = zeros.clone().index_add_(0, inverse, rewards) / sizes.to(rewards.dtype)
    baseline = torch.where(total > 0, weighted / torch.where(total > 0, total, torch.ones_like(total)), plain)
    advantages = rewards - baseline[inverse]
    return torch.where(sizes[inverse] > 1, advantages, torch.zeros_like(advantages))


def passk_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Pass@k / max@k advantages: PKPO's ``s^(loo−1)`` weights (Walder & Karkhanis 2025,
    "Pass@K Policy Optimization", arXiv:2505.15201, eq. 33), for binary or continuous rewards.

    For response i of a group of n (k' = min(k, n)), over the k'-subsets K of the group that
    contain i: A_i = mean_K [max_{j∈K} r_j − max_{j∈K∖i} r_j], i.e. how much i raises the best
    reward of a random k'-subset containing it. With the rewards sorted ascending,
    r_(1) ≤ … ≤ r_(n): A_(i) = Σ_{j<i} C(j−1, k'−2)·(r_(i) − r_(j)) / C(n−1, k'−1).

    Every A_i ≥ 0; the lowest reward gets 0. k' = n gives r_max − r_second to the best response
    and 0 to the others (verl's ``grpo_passk`` without its std division); k' = 2 gives
    A_i = mean_{j≠i} max(0, r_i − r_j). Scale: PKPO's s_i (a sum over samples whose policy
    gradient is that of max@k) equals A_i·k/n; A differs by the constant n/k. For binary rewards
    the correct responses get C(n_wrong, k'−1)/C(n−1, k'−1) (the chance that i is the only correct
    one of its subset) and the wrong ones 0 — "Pass@k Training" (Chen et al. 2025,
    arXiv:2508.10751) derives a different, signed analytic advantage. Groups of one get 0. [N]
    """
    _check_rewards(rewards)
    if k < 2:
        raise ValueError(f"pass@k advantages need k >= 2, got {k}")
    inverse, sizes = _groups(rewards.numel(), None, group_ids, rewards.device)
    advantages = torch.zeros_like(rewards)
    for g, size in enumerate(sizes.tolist()):
        if size < 2:
            continue
        rows = (inverse == g).nonzero().squeeze(-1)
        kk = min(k, size)
        sorted_rewards, order = torch.sort(rewards[rows].double(), stable=True)  # [n] ascending
        denominator = math.comb(size - 1, kk - 1)
        weights = torch.tensor([math.comb(j, kk - 2) / denominator for j in range(size)],
                               dtype=torch.float64, device=rewards.device)  # [n]: C(j−1, k'−2) for 1-based j
        below_weight = torch.cumsum(weights, 0) - weights  # Σ_{j<i} w_j
        below_sum = torch.cumsum(weights * sorted_rewards, 0) - weights * sorted_rewards  # Σ_{j<i} w_j r_j
        advantages[rows[order]] = (sorted_rewards * below_weight - below_sum).to(rewards.dtype)
    return advantages


# ---- optimal token baseline ----------------------------------------------------------------------


def score_norm_proxy(old_logprobs: torch.Tensor, sum_pi_squared: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ||∇_z log π(y_t)||² = ||e_y − π||² of the logits z: 1 − 2π_y + Σ_v π_v² (OTB's
    logit-gradient proxy) when Σ_v π_v² is given, else its lower bound (1 − π_y)², which is
    within a factor 2 of it (Σ_{v≠y} π_v² ≤ (1 − π_y)²). π_y = exp(old log-prob). [N, T]"""
    pi = old_logprobs.exp()
    if sum_pi_squared is None:
        return (1.0 - pi).square()
    return 1.0 - 2.0 * pi + sum_pi_squared


def optimal_token_baseline(returns: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                           group_ids: torch.Tensor) -> torch.Tensor:
    """Optimal token baseline (OTB; Li et al. 2026, arXiv:2602.07078, verl ``optimal_token_baseline``).

    The variance-minimising baseline b* = E[||∇log π||²·G] / E[||∇log π||²], per token: with
    W_t = Σ_{j ≤ t} w_j (the "realized energy" of the response up to its token t, w from
    ``score_norm_proxy``) and G_t the return-to-go, over the members of a group that have a t-th
    response token: B_t = Σ_i W_t^i·G_t^i / Σ_i W_t^i, A_t^i = G_t^i − B_t. Column index t counts
    VALID tokens of each row (the t-th response token, wherever the prompt ends). Positions that
    one member alone reaches get 0 (verl's ``handle_zero_tail`` keeps G_t there instead); a
    position whose weights are all 0 uses the plain mean. [N, T]
    """
    _check_tokens(mask, returns=returns, weights=weights)
    valid = mask.bool()
    n, length = mask.shape
    rank = (valid.long().cumsum(-1) - 1).clamp_min(0)  # [N, T] index among the row's valid tokens
    zeros = torch.zeros_like(returns)
    w = torch.where(valid, weights, zeros)
    energy = w.cumsum(-1)  # [N, T] W_t
    inverse, sizes = _groups(n, None, group_ids, returns.device)
    slots = inverse[:, None] * length + rank  # [N, T] (group, position) slot of each token
    flat = slots[valid]

    def slot_sum(x: torch.Tensor) -> torch.Tensor:  # [N, T] -> [G·T]
        return torch.zeros(sizes.numel() * length, dtype=returns.dtype, device=returns.device).index_add_(0, flat, x[valid])

    count = slot_sum(torch.ones_like(returns))
    weighted = slot_sum(energy * returns)
    total = slot_sum(energy)
    plain = slot_sum(returns) / count.clamp_min(1)
    baseline = torch.where(total > 0, weighted / torch.where(total > 0, total, torch.ones_like(total)), plain)
    advantages = torch.zeros_like(returns)
    advantages[valid] = torch.where(count[flat] > 1, returns[valid] - baseline[flat], torch.zeros_like(baseline[flat]))
    return advantages


# ---- the registry ------------------------------------------------------------------------------


@dataclass
class AdvantageInputs:
    """What an estimator may read; every row of the global batch (or of one DP rank, see above)."""

    rewards: torch.Tensor
    """[N] sequence reward of each response."""

    group_ids: torch.Tensor
    """[N] prompt of each response; equal ids form a group."""

    group_size: Optional[int] = None
    """Groups are consecutive runs of this many rows (online rollouts), when known."""

    mask: Optional[torch.Tensor] = None
    """[N, T] 0/1 valid (response) tokens; token-level estimators need it."""

    token_rewards: Optional[torch.Tensor] = None
    """[N, T] per-token rewards (token credits); None: the sequence reward on the last valid token."""

    lengths: Optional[torch.Tensor] = None
    """[N] response lengths in tokens (OPO); None: counted from ``mask``."""

    values: Optional[torch.Tensor] = None
    """[N, T] old value-head outputs V(t) (GAE)."""

    old_logprobs: Optional[torch.Tensor] = None
    """[N, T] log-probs of the response tokens under the policy that sampled them."""

    ref_logprobs: Optional[torch.Tensor] = None
    """[N, T] reference-model log-probs (KL in the reward)."""

    greedy_rewards: Optional[torch.Tensor] = None
    """[N] reward of the greedy response to each row's prompt (ReMax)."""

    sum_pi_squared: Optional[torch.Tensor] = None
    """[N, T] Σ_v π_v² per token (the exact OTB proxy); None: its lower bound (see score_norm_proxy)."""


class AdvantageResult(NamedTuple):
    advantages: torch.Tensor
    """[N] per response or [N, T] per token."""

    returns: Optional[torch.Tensor] = None
    """[N, T] value targets (GAE) or discounted returns; None: none of its own."""


def _token_rewards(inputs: AdvantageInputs, settings, shift: torch.Tensor | None = None) -> torch.Tensor:
    """[N, T] token rewards: the credits, or the sequence reward on the last valid token; minus
    ``shift`` [N] on the last valid token (a baseline); with KL in the reward."""
    if inputs.mask is None:
        raise ValueError("a token-level advantage estimator needs the token mask")
    if inputs.token_rewards is not None:
        base = torch.where(inputs.mask.bool(), inputs.token_rewards, torch.zeros_like(inputs.token_rewards))
    else:
        base = outcome_token_rewards(inputs.rewards, inputs.mask)
    if shift is not None:
        base = base - outcome_token_rewards(shift.to(base.dtype), inputs.mask)
    coef = settings.kl_in_reward_coef
    if coef > 0:
        if inputs.old_logprobs is None or inputs.ref_logprobs is None:
            raise ValueError("rollout.kl_in_reward_coef > 0 needs old-policy and reference log-probs")
        base = kl_penalized_rewards(base, inputs.old_logprobs, inputs.ref_logprobs, inputs.mask, coef)
    return base


class _NoKL:
    kl_in_reward_coef = 0.0


_NO_KL = _NoKL()


def _grpo(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    if inputs.token_rewards is not None:  # token-level GRPO of per-token credits
        if inputs.group_size is None:
            raise ValueError("token-level GRPO needs consecutive groups of rollout.group_size rows")
        return AdvantageResult(token_group_advantages(inputs.token_rewards, inputs.mask, inputs.group_size,
                                                      normalize_std=settings.normalize_std))
    by = {"group_size": inputs.group_size} if inputs.group_size is not None else {"group_ids": inputs.group_ids}
    advantages, _ = group_advantages(inputs.rewards, **by, normalize_std=settings.normalize_std,
                                     leave_one_out=settings.leave_one_out)
    return AdvantageResult(advantages)


def _rloo(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    advantages, _ = group_advantages(inputs.rewards, group_ids=inputs.group_ids, normalize_std=False,
                                     leave_one_out=True)
    return AdvantageResult(advantages)


def _gae(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    if inputs.values is None:
        raise ValueError("rollout.advantage_estimator=gae needs the value head's old values (model.value_head: true)")
    advantages, returns = gae(_token_rewards(inputs, settings), inputs.values, inputs.mask,
                              gamma=settings.gamma, lam=settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, inputs.mask, group=group)
    return AdvantageResult(advantages, returns)


def _reinforce_pp(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    return AdvantageResult(*reinforce_pp(_token_rewards(inputs, settings), inputs.mask, gamma=settings.gamma,
                                         whiten_batch=settings.whiten_advantages, group=group))


def _reinforce_pp_baseline(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF ``reinforce_baseline``, verl
    ``reinforce_plus_plus_baseline``): the group mean of the responses' total reward (the sequence
    reward, or the sum of the token credits) is subtracted on the last token, then KL in the
    reward, discounted returns and batch whitening as in REINFORCE++."""
    totals = inputs.rewards
    if inputs.token_rewards is not None:
        totals = _token_rewards(inputs, _NO_KL).sum(-1)
    return AdvantageResult(*reinforce_pp(_token_rewards(inputs, settings, group_mean_baseline(totals, inputs.group_ids)),
                                         inputs.mask, gamma=settings.gamma, whiten_batch=settings.whiten_advantages,
                                         group=group))


def _remax(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    if inputs.greedy_rewards is None:
        raise ValueError("rollout.advantage_estimator=remax needs the rewards of greedy rollouts (online GRPO)")
    return AdvantageResult(remax_advantages(inputs.rewards, inputs.greedy_rewards))


def _opo(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    lengths = inputs.lengths if inputs.lengths is not None else inputs.mask.sum(-1)
    return AdvantageResult(opo_advantages(inputs.rewards, lengths, inputs.group_ids))


def _passk(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    return AdvantageResult(passk_advantages(inputs.rewards, inputs.group_ids, settings.pass_k))


def _optimal_token_baseline(inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    if inputs.old_logprobs is None:
        raise ValueError("rollout.advantage_estimator=optimal-token-baseline needs the old-policy log-probs")
    returns = returns_to_go(_token_rewards(inputs, settings), inputs.mask, settings.gamma)
    weights = score_norm_proxy(inputs.old_logprobs, inputs.sum_pi_squared)
    return AdvantageResult(optimal_token_baseline(returns, weights, inputs.mask, inputs.group_ids), returns)


@dataclass(frozen=True)
class Estimator:
    """A registry entry: the function and what its call site must provide."""

    fn: Callable[..., AdvantageResult]
    """``fn(inputs, settings, group=None) -> AdvantageResult``; settings: the rollout config."""

    token_level: bool
    """Per-token advantages from per-token inputs: runs after the old-policy pass, on the last stage."""

    needs: tuple[str, ...] = ()
    """``AdvantageInputs`` fields it reads beyond rewards and groups."""

    kl_in_reward: bool = False
    """Takes per-token rewards, so rollout.kl_in_reward_coef applies."""

    online_only: bool = False
    """Needs generations of its own (online GRPO only)."""


ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(_grpo, token_level=False),
    "rloo": Estimator(_rloo, token_level=False),
    "gae": Estimator(_gae, token_level=True, needs=("values",), kl_in_reward=True),
    "reinforce++": Estimator(_reinforce_pp, token_level=True, kl_in_reward=True),
    "reinforce++-baseline": Estimator(_reinforce_pp_baseline, token_level=True, kl_in_reward=True),
    "remax": Estimator(_remax, token_level=False, needs=("greedy_rewards",), online_only=True),
    "opo": Estimator(_opo, token_level=False, needs=("lengths",)),
    "passk": Estimator(_passk, token_level=False),
    "optimal-token-baseline": Estimator(_optimal_token_baseline, token_level=True, needs=("old_logprobs",),
                                        kl_in_reward=True),
}
"""``rollout.advantage_estimator`` name -> estimator (module docstring; each function's docstring
gives its formula and source)."""


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"rollout.advantage_estimator must be one of {sorted(ESTIMATORS)}, got {name!r}") from None


def estimate(name: str, inputs: AdvantageInputs, settings, group=None) -> AdvantageResult:
    """Run the estimator ``name`` on ``inputs`` with the rollout config ``settings``; ``group``: the
    DP group whose ranks hold the rest of the batch (batch whitening), None when ``inputs`` is all."""
    estimator = get_estimator(name)
    if settings.kl_in_reward_coef > 0 and not estimator.kl_in_reward:
        raise ValueError(f"rollout.kl_in_reward_coef applies to the estimators with per-token rewards "
                         f"({', '.join(n for n, e in ESTIMATORS.items() if e.kl_in_reward)}), not {name!r}")
    return estimator.fn(inputs, settings, group)
