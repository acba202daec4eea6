"""Per-pair preference losses: functions of the chosen / rejected log-ratios → a loss per pair.

Notation, per pair i (row 2i chosen, row 2i + 1 rejected), with sequence log-probs π (policy) and
ρ (reference), both reduced over a row's valid tokens the same way:

    c = π_c − ρ_c        r = π_r − ρ_r        Δ = c − r        (implicit rewards β·c, β·r)

Every function returns ``[P]`` losses (fp32 or fp64, as its inputs); the caller masks padding
pairs and divides by the step's global pair count. The formulas follow TRL's ``DPOTrainer``
(``loss_type``) unless a docstring says otherwise; each names its paper.

Two losses use statistics of the whole step's batch, which mrl computes once per step over every
micro-batch and DP rank (``step_statistics``), so the loss is the same for any layout:

- ``aot`` / ``aot_unpaired`` sort the batch's margins; TRL sorts within one device's micro-batch,
  which makes the loss depend on how the batch is split. Here the sort runs over the global batch
  of valid pairs, and each pair receives its sort partner (``sort_partners``).
- ``bco_pair`` shifts the rewards by δ, a running mean of the reward means. TRL updates a running
  mean with each device micro-batch's mean (averaged over DP devices). Here δ is updated once per
  step with the mean over the step's global batch (2P rewards, chosen and rejected) and each step
  counts once: δ_t = mean(m_1, …, m_t), the current step included (as TRL includes the current batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES: tuple[str, ...] = (
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
)
"""Every ``loss_type`` of the DPO loss."""

SMOOTHED_LOSSES: tuple[str, ...] = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
"""Loss types that read ``label_smoothing`` (ε)."""

STEP_STATISTIC_LOSSES: tuple[str, ...] = ("aot", "aot_unpaired", "bco_pair")
"""Loss types that need ``step_statistics`` over the whole step (and the policy's log-probs before it)."""

EXO_DEFAULT_EPS = 1e-3
"""ε of ``exo_pair`` when ``label_smoothing`` is 0 (TRL's choice: the loss needs ε > 0)."""


def sigmoid_loss(delta: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), conservative with ε (cDPO, Mitchell 2023):
    ℓ = −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)."""
    return -(1.0 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, β the regulariser τ): ℓ = (Δ − 1/(2β))²."""
    return (delta - 1.0 / (2.0 * beta)).square()


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): ℓ = max(0, 1 − βΔ)."""
    return torch.relu(1.0 - beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024), unbiased under label flips with rate ε < 1/2:
    ℓ = [−(1 − ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)."""
    return (-(1.0 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1.0 - 2.0 * eps)


def exo_pair_loss(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """EXO, pairwise (Ji et al. 2024, eq. 16): the reverse KL from the model's pair distribution
    σ(±βΔ) to the ε-smoothed label distribution (1 − ε, ε):
    ℓ = σ(βΔ)·(log σ(βΔ) − log(1 − ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε); ε = 0 reads as 1e-3 (TRL)."""
    eps = eps if eps > 0.0 else EXO_DEFAULT_EPS
    z = beta * delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, noise-contrastive alignment):
    ℓ = −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr)."""
    return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)


def bco_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, shift: torch.Tensor) -> torch.Tensor:
    """BCO, pairwise (Jung et al. 2024, binary classifier optimisation): chosen rewards classified
    positive, rejected negative, around the reward shift δ (``shift``, detached, ``[P]`` or scalar):
    ℓ = −log σ(βc − δ) − log σ(−(βr − δ))."""
    return -F.logsigmoid(beta * chosen - shift) - F.logsigmoid(-(beta * rejected - shift))


def sppo_hard_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P = 1 for the winner, 0 for
    the loser): ℓ = (c − 1/(2β))² + (r + 1/(2β))²."""
    half = 0.5 / beta
    return (chosen - half).square() + (rejected + half).square()


def aot_loss(policy_margin: torch.Tensor, ref_partner: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, alignment via optimal transport): the sorted policy margins
    π_c − π_r are matched with the sorted reference margins ρ_c − ρ_r, d_(j) = h_(j) − g_(j), and
    ℓ = sigmoid_loss(d). Pair i holds h_i and ``ref_partner`` = g at h_i's rank in the global
    batch (``sort_partners``), so Σ_i ℓ_i = Σ_j ℓ(h_(j) − g_(j)) and its gradient is exact."""
    return sigmoid_loss(policy_margin - ref_partner, beta, eps)


def aot_unpaired_loss(chosen: torch.Tensor, rejected: torch.Tensor, rejected_partner: torch.Tensor,
                      chosen_partner: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the sorted chosen log-ratios are matched with the sorted
    rejected ones, ℓ = Σ_j sigmoid_loss(c_(j) − r_(j)).

    Both sides are live, so pair i carries two parts: ``ℓ(c_i − sg(r*_i))`` (r*_i = ``rejected_partner``,
    the rejected log-ratio at c_i's rank) holds the value and c_i's gradient, and
    ``ℓ(sg(c*_i) − r_i) − sg(·)`` (c*_i = ``chosen_partner``, the chosen log-ratio at r_i's rank) is 0
    in value and carries r_i's gradient. Summed over the batch: the sorted loss, value and gradient.
    """
    value = sigmoid_loss(chosen - rejected_partner.detach(), beta, eps)
    through_rejected = sigmoid_loss(chosen_partner.detach() - rejected, beta, eps)
    return value + (through_rejected - through_rejected.detach())


def apo_zero_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7; chosen outputs better than the model's):
    ℓ = (1 − σ(βc)) + σ(βr)."""
    return torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8; chosen outputs worse than the model's):
    ℓ = σ(βc) + (1 − σ(βΔ))."""
    return torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - rejected))


def discopop_loss(delta: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024, eq. 5; log-ratio modulated loss), with L = βΔ and m = σ(L/τ):
    ℓ = (1 − m)·(−log σ(L)) + m·e^{−L}. The second product is evaluated as exp(log σ(L/τ) − L),
    finite wherever the product is (e^{−L} alone overflows for very negative L)."""
    z = beta * delta
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def pair_loss(
    kind: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    policy_margin: torch.Tensor | None = None,
    aot_partner: torch.Tensor | None = None,
    aot_unpaired_partners: tuple[torch.Tensor, torch.Tensor] | None = None,
    bco_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[P]`` losses of loss type ``kind`` from the chosen / rejected log-ratios ``[P]``.

    ``policy_margin`` (π_c − π_r) and ``aot_partner`` are needed by ``aot``; ``aot_unpaired_partners``
    (rejected partner of each chosen, chosen partner of each rejected) by ``aot_unpaired``;
    ``bco_shift`` (δ) by ``bco_pair``: see ``step_statistics``.
    """
    delta = chosen - rejected  # [P]
    eps = label_smoothing
    if kind == "sigmoid":
        return sigmoid_loss(delta, beta, eps)
    if kind == "ipo":
        return ipo_loss(delta, beta)
    if kind == "hinge":
        return hinge_loss(delta, beta)
    if kind == "robust":
        return robust_loss(delta, beta, eps)
    if kind == "exo_pair":
        return exo_pair_loss(delta, beta, eps)
    if kind == "nca_pair":
        return nca_pair_loss(chosen, rejected, beta)
    if kind == "bco_pair":
        return bco_pair_loss(chosen, rejected, beta, _need(bco_shift, kind, "bco_shift"))
    if kind == "sppo_hard":
        return sppo_hard_loss(chosen, rejected, beta)
    if kind == "aot":
        return aot_loss(_need(policy_margin, kind, "policy_margin"), _need(aot_partner, kind, "aot_partner"), beta, eps)
    if kind == "aot_unpaired":
        rejected_partner, chosen_partner = _need(aot_unpaired_partners, kind, "aot_unpaired_partners")
        return aot_unpaired_loss(chosen, rejected, rejected_partner, chosen_partner, beta, eps)
    if kind == "apo_zero":
        return apo_zero_loss(chosen, rejected, beta)
    if kind == "apo_down":
        return apo_down_loss(chosen, rejected, beta)
    if kind == "discopop":
        return discopop_loss(delta, beta, discopop_tau)
    raise ValueError(f"preference loss type must be one of {list(PREFERENCE_LOSSES)}, got {kind!r}")


def _need(value, kind: str, name: str):
    if value is None:
        raise ValueError(f"preference loss {kind!r} needs {name} (from step_statistics)")
    return value


# Step statistics -------------------------------------------------------------------------------


def sort_partners(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sort(values)[rank of keys[i]]`` ``[N]``: the value matched with each key when both are sorted.

    Ranks come from a stable sort, so ties keep the order of the (global) batch.
    """
    order = torch.sort(keys, stable=True).indices  # [N]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return torch.sort(values, stable=True).values[rank]


def step_statistics(
    kinds: Sequence[str],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    policy_margin: torch.Tensor,
    ref_margin: torch.Tensor,
    valid: torch.Tensor,
    *,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Batch-level inputs of the loss types ``kinds`` from the step's whole (global) batch of pairs.

    Inputs ``[N]`` (detached, every pair of every micro-batch and DP rank): c, r, π_c − π_r,
    ρ_c − ρ_r and which pairs are valid. Returns ``[N]`` tensors (0 at invalid pairs):

    - ``aot_partner``: ρ-margin at the rank of each pair's π-margin among valid pairs;
    - ``aot_rejected_partner`` / ``aot_chosen_partner``: r at the rank of c, c at the rank of r;
    - ``bco_batch_mean``: a 0-d tensor, the mean of the 2·N_valid rewards β·c, β·r (NaN if none).
    """
    out: dict[str, torch.Tensor] = {}
    zeros = torch.zeros_like(chosen)
    if "aot" in kinds:
        partner = zeros.clone()
        partner[valid] = sort_partners(policy_margin[valid], ref_margin[valid])
        out["aot_partner"] = partner
    if "aot_unpaired" in kinds:
        rejected_partner, chosen_partner = zeros.clone(), zeros.clone()
        rejected_partner[valid] = sort_partners(chosen[valid], rejected[valid])
        chosen_partner[valid] = sort_partners(rejected[valid], chosen[valid])
        out["aot_rejected_partner"], out["aot_chosen_partner"] = rejected_partner, chosen_partner
    if "bco_pair" in kinds:
        count = valid.sum()
        total = beta * (chosen[valid].sum() + rejected[valid].sum())
        out["bco_batch_mean"] = total / (2 * count) if int(count) > 0 else torch.full_like(total, math.nan)
    return out


class RunningMean:
    """The running mean of BCO's reward shift δ: each update (one per step) counts once."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        """Fold in one step's mean (NaN: a step without valid pairs, skipped); return δ."""
        if not math.isnan(value):
            self.count += 1
            self.mean += (value - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


# Weighting -------------------------------------------------------------------------------------


def wpo_log_weights(logprobs: torch.Tensor, log_sum_p2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2) per-row log-weight ``[B]`` (detached): the mean over the row's
    valid tokens of log p(y_t) − log Σ_v p_v², the policy's own length-normalised probability of the
    response, adjusted by its sampling sharpness. Per-token inputs ``[B, S]``."""
    per_token = torch.where(mask, (logprobs - log_sum_p2).detach(), torch.zeros_like(logprobs))
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1).to(per_token.dtype)


def wpo_pair_weights(log_w: torch.Tensor) -> torch.Tensor:
    """``[P]`` pair weights from ``wpo_log_weights`` ``[B]``: min(1, exp(ω_c + ω_r)), as TRL's
    ``use_weighting`` (the clip at 1 bounds the weight of a pair the policy already prefers)."""
    return torch.exp(log_w[0::2] + log_w[1::2]).clamp(max=1.0).detach()


def length_desensitized_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024) token weights ``[B, S]``: 1 on a row's first l_p valid tokens and α
    after them, with l_p = min(valid tokens of the chosen row, of the rejected row) of its pair; 0 at
    invalid tokens. A row's weighted log-prob Σ_t w_t·log p(y_t) is the paper's π̂(y|x): the tokens
    beyond the shorter response (the "verbose" part) count with weight α."""
    mask = mask.bool()
    lengths = mask.sum(-1)  # [B]
    public = torch.minimum(lengths[0::2], lengths[1::2]).repeat_interleave(2)  # [B] l_p of each row's pair
    rank = mask.cumsum(-1)  # [B, S] 1-based rank of a valid token within its row
    inside = rank <= public.unsqueeze(-1)
    weights = torch.where(inside, torch.ones_like(rank, dtype=torch.float32), torch.full_like(rank, alpha, dtype=torch.float32))
    return torch.where(mask, weights, torch.zeros_like(weights))


# The preference term of a step -----------------------------------------------------------------


def preference_term(
    kinds: Sequence[str],
    weights: Sequence[float],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    valid: torch.Tensor,
    num_pairs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    policy_margin: torch.Tensor | None = None,
    aot_partner: torch.Tensor | None = None,
    aot_unpaired_partners: tuple[torch.Tensor, torch.Tensor] | None = None,
    bco_shift: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k · Σ_i ω_i·ℓ_k(i) / P over the valid pairs, and each term's own value.

    A mix of several loss types with weights ``w_k`` is TRL's MPO (``loss_type`` list with
    ``loss_weights``); ``pair_weights`` ω ``[P]`` (detached, e.g. WPO's) multiply every term. Inputs
    at invalid pairs are replaced by 0 before any arithmetic, so padding never reaches the backward.
    Returns ``(loss, {kind: term})``, each term already divided by ``num_pairs`` (P).
    """
    valid = valid.bool()
    zeros = torch.zeros_like(chosen)

    def clean(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.where(valid, x, zeros)

    chosen, rejected = clean(chosen), clean(rejected)  # [P]
    partners = None if aot_unpaired_partners is None else tuple(clean(x) for x in aot_unpaired_partners)
    count = valid.sum() if num_pairs is None else num_pairs
    # A count of 0 means no valid pair anywhere: every sum is 0, and so is the term.
    count = count.clamp_min(1).to(chosen.dtype) if isinstance(count, torch.Tensor) else max(count, 1)
    total = torch.zeros((), dtype=chosen.dtype, device=chosen.device)
    terms: dict[str, torch.Tensor] = {}
    for kind, weight in zip(kinds, weights):
        per_pair = pair_loss(
            kind, chosen, rejected, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
            policy_margin=clean(policy_margin), aot_partner=clean(aot_partner),
            aot_unpaired_partners=partners, bco_shift=clean(bco_shift),
        )  # [P]
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        summed = torch.where(valid, per_pair, zeros).sum()
        term = summed / count
        terms[kind] = term
        total = total + weight * term
    return total, terms
