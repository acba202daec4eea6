"""Step statistics of the policy losses that read the whole step: Clip-Cov / KL-Cov token selection
and GPG's scale. ``PolicyLoss.prepare_step`` calls these once per step on the step's micro-batches
(before the first forward) and writes the results into the batches, so every micro-batch, DP rank
and TP rank sees statistics of the GLOBAL batch and the loss does not depend on the layout.

Covariance (Cui et al., arXiv 2505.22617; verl ``clip_cov`` / ``kl_cov``): over the valid tokens of
the global batch, cov_t = (log π_t − mean log π)·(A_t − mean A), means over all of them. The step
statistics read log π from ``old_logprobs``: the policy's log-probs for the step, before its update
(equal in value to log π at the step's forward when the step is the first update on its rollout
batch; verl takes the detached log-probs of the forward, per micro-batch).

- KL-Cov selects the top k = max(1, ⌊ratio·N⌋) tokens by cov (N valid tokens of the step): every
  token with cov ≥ the k-th largest value (ties at that value are all kept).
- Clip-Cov selects k = max(1, ⌊ratio·N⌋) tokens at random among those with lb < cov < ub. The
  "random" choice is a hash: each candidate's priority is a 62-bit hash of the float32 bit patterns
  of its (old log-prob, advantage) and of ``seed``, and the k highest priorities are kept. It
  depends on the tokens' values only, never on their positions, micro-batch or rank, so it is
  deterministic and the same for every layout; it changes from step to step with the values.
  (verl draws ``torch.randperm`` on each micro-batch and also leaves out tokens whose ratio is
  clipped at the forward: they lose their gradient to the clip anyway, so here they may take a
  place of the budget.)
- GPG's α = B/(B − M): B sequences of the step with a valid token, M of them whose advantage is 0
  at every valid token (α = 1 when B = M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from mrl.losses import functional as LF
from mrl.losses.base import token_mask

SELECT_KEY = "cov_select"
"""[B, S] float 0/1: the tokens Clip-Cov / KL-Cov act on (written by ``prepare_step``)."""
GPG_SCALE_KEY = "gpg_scale"
"""[B] float: GPG's α on every row (written by ``prepare_step``)."""

_MASK31 = 0x7FFFFFFF


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _kth_largest(local: torch.Tensor, k: int, floor, group):
    """The k-th largest value of the union of every rank's 1-d ``local`` (or ``floor`` when the
    union holds fewer than k values): each rank contributes its own top k, one all-gather."""
    top = torch.full((k,), floor, dtype=local.dtype, device=local.device)
    n = min(k, local.numel())
    if n:
        top[:n] = torch.topk(local, n).values
    if _world(group) > 1:
        parts = [torch.empty_like(top) for _ in range(_world(group))]
        dist.all_gather(parts, top, group=group)
        top = torch.cat(parts)
    return torch.topk(top, k).values[-1]


def _mix31(h: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (no int64 overflow: operands stay below 2^31 · 2^27)."""
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK31
    return h ^ (h >> 16)


def token_priority(logprobs: torch.Tensor, advantages: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, S] int64 in [0, 2^62): a hash of each token's float32 (log-prob, advantage) bits and ``seed``."""
    a = logprobs.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = advantages.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    s = seed & _MASK31
    h = _mix31((a & _MASK31) ^ s)
    h = _mix31(h ^ (a >> 31) ^ (b & _MASK31))
    h = _mix31(h ^ (b >> 31) ^ 0x2545F491)
    low = _mix31(h ^ 0x68E31DA4 ^ s)
    return (h << 31) | low


def _step_tokens(micro_batches: Sequence[dict], ignore_index: int):
    """Per micro-batch: (mask [B, S] bool, old log-probs [B, S] f64, advantages [B, S] f64)."""
    out = []
    for batch in micro_batches:
        mask = token_mask(batch, ignore_index)
        lp = batch["old_logprobs"].double()
        adv = LF.broadcast_advantages(batch["advantages"].double(), lp)
        zeros = torch.zeros_like(lp)
        out.append((mask, torch.where(mask, lp, zeros), torch.where(mask, adv, zeros)))
    return out


def covariance_selection(micro_batches: Sequence[dict], mode: str, *, ratio: float, lower: float = 1.0,
                         upper: float = 5.0, seed: int = 0, ignore_index: int = -100, dp_group=None) -> None:
    """Write ``SELECT_KEY`` into each micro-batch: KL-Cov's top-k (``mode="kl-cov"``) or Clip-Cov's
    hashed choice in the band (lower, upper) (``mode="clip-cov"``), over the global step (module
    docstring). Reads ``old_logprobs`` and ``advantages``."""
    if mode not in ("kl-cov", "clip-cov"):
        raise ValueError(f"covariance selection mode must be 'kl-cov' or 'clip-cov', got {mode!r}")
    with torch.no_grad():
        tokens = _step_tokens(micro_batches, ignore_index)
        device = tokens[0][1].device
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # Σ log π, Σ A, N
        for mask, lp, adv in tokens:
            sums += torch.stack([lp.sum(), adv.sum(), mask.sum().double()])
        lp_sum, adv_sum, count = _all_reduce(sums, dp_group).tolist()
        if count == 0:
            for batch, (mask, lp, _) in zip(micro_batches, tokens):
                batch[SELECT_KEY] = torch.zeros_like(lp, dtype=torch.float32)
            return
        k = max(1, int(ratio * count))
        covs = [torch.where(m, (lp - lp_sum / count) * (adv - adv_sum / count), torch.zeros_like(lp))
                for m, lp, adv in tokens]  # [B, S] each
        if mode == "kl-cov":
            keys = [torch.where(m, c, torch.full_like(c, -torch.inf)) for (m, _, _), c in zip(tokens, covs)]
            flat = torch.cat([key[m] for key, (m, _, _) in zip(keys, tokens)])
            threshold = _kth_largest(flat, k, -torch.inf, dp_group)
            selects = [m & (key >= threshold) for key, (m, _, _) in zip(keys, tokens)]
        else:
            cands = [m & (c > lower) & (c < upper) for c, (m, _, _) in zip(covs, tokens)]
            prios = [token_priority(batch["old_logprobs"], LF.broadcast_advantages(batch["advantages"],
                                                                                   batch["old_logprobs"]), seed)
                     for batch in micro_batches]
            flat = torch.cat([p[c] for p, c in zip(prios, cands)])
            threshold = _kth_largest(flat, k, -1, dp_group)
            selects = [c & (p >= threshold) for p, c in zip(prios, cands)]
        for batch, sel in zip(micro_batches, selects):
            batch[SELECT_KEY] = sel.to(torch.float32)


def gpg_scale(micro_batches: Sequence[dict], *, ignore_index: int = -100, dp_group=None) -> None:
    """Write GPG's α = B/(B − M) as ``GPG_SCALE_KEY`` [B] into each micro-batch (module docstring)."""
    with torch.no_grad():
        tokens = _step_tokens(micro_batches, ignore_index)
        counts = torch.zeros(2, dtype=torch.float64, device=tokens[0][1].device)  # B, M
        for mask, _, adv in tokens:
            rows = mask.any(-1)
            zero = rows & ~((adv != 0) & mask).any(-1)
            counts += torch.stack([rows.sum().double(), zero.sum().double()])
        rows, zero = _all_reduce(counts, dp_group).tolist()
        alpha = rows / (rows - zero) if rows > zero else 1.0
        for batch, (mask, lp, _) in zip(micro_batches, tokens):
            batch[GPG_SCALE_KEY] = torch.full(lp.shape[:1], alpha, dtype=torch.float32, device=lp.device)
