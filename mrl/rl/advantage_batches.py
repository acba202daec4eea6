"""Advantages of a step's micro-batches: the global batch gathered over DP, one estimator call.

``assign_advantages`` concatenates this rank's micro-batches, all-gathers every input over the DP
group (rank order; per-token tensors right-padded to the longest row of any rank), runs the
estimator ``rollout.advantage_estimator`` names on the whole global batch, and writes this rank's
rows back as ``batch["advantages"]`` ([B] or [B, S]) and, when the estimator has them,
``batch["returns"]``. Every rank computes the same numbers from the same rows, so group statistics
and batch whitening do not depend on the DP size or the micro-batch split.

Sequence-level estimators read ``rewards`` (and the label mask for lengths) and can run on every
rank before any forward pass; token-level ones read the old-policy log-probs, reference log-probs
or values, which exist on the last pipeline stage after ``annotate_logprobs`` — call it there.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mrl.data.sequences import IGNORE_INDEX
from mrl.losses.base import BatchNeeds
from mrl.rl.advantages import AdvantageInputs, estimate, get_estimator


_WHERE = {
    "old_values": "the value head's outputs of the old-policy pass (model.value_head: true; the pass runs "
                  "when the batches do not bring their own old log-probs)",
    "old_logprobs": "the old-policy pass runs before the estimator, on the last pipeline stage",
    "ref_logprobs": "the reference pass runs when a reference model exists (reference.source)",
}


def with_reward_kl(needs: BatchNeeds, rollout) -> BatchNeeds:
    """A loss's batch needs plus the reference log-probs that a KL penalty in the reward
    (``rollout.kl_in_reward_coef`` > 0) reads at advantage time."""
    if rollout.kl_in_reward_coef > 0:
        return dataclasses.replace(needs, reference_logprobs=True)
    return needs


def gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``tensor`` ([n] or [n, T], the same n on every rank) concatenated in rank order.

    A per-token tensor is right-padded with zeros to the largest T of any rank first.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return tensor
    if tensor.dim() == 2:
        width = torch.tensor([tensor.shape[1]], device=tensor.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        tensor = F.pad(tensor, (0, int(width.item()) - tensor.shape[1]))
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _concat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B_i, S_i] tensors stacked into [Σ B_i, max S_i], right-padded with zeros."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])


def assign_advantages(batches: list[dict], settings, *, group, rank: int, group_ids: torch.Tensor | None = None,
                      group_size: int | None = None, token_rewards: torch.Tensor | None = None,
                      greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Set ``advantages`` (and ``returns``) of this rank's ``batches`` (module docstring); returns
    the rewards [N] of the whole global batch.

    ``settings``: the rollout config; ``group``/``rank``: the DP group and this rank's place in it.
    Per row, in the order of the micro-batches: ``group_ids`` [rows] (default: the batches'
    ``group_ids``; must be unique across ranks), ``token_rewards`` [rows, T ≤ S] per-token credits
    at the label positions, ``greedy_rewards`` [rows] (ReMax). ``group_size``: groups are consecutive
    runs of this many rows of the global batch.
    """
    name = settings.advantage_estimator
    estimator = get_estimator(name)
    rewards = torch.cat([b["rewards"] for b in batches]).float()  # [rows]
    rows = rewards.numel()
    ids = group_ids if group_ids is not None else torch.cat([b["group_ids"] for b in batches])  # [rows]
    fields: dict[str, torch.Tensor] = {"rewards": rewards, "group_ids": ids.to(rewards.device)}
    needs = set(estimator.needs)
    if settings.kl_in_reward_coef > 0:
        needs |= {"old_logprobs", "ref_logprobs"}
    if estimator.token_level or "lengths" in needs:
        fields["mask"] = _concat_tokens([(b["labels"] != IGNORE_INDEX).float() for b in batches])  # [rows, S]
    for field, key in (("values", "old_values"), ("old_logprobs", "old_logprobs"), ("ref_logprobs", "ref_logprobs")):
        if field in needs:
            if any(key not in b for b in batches):
                raise ValueError(f"rollout.advantage_estimator={name} (kl_in_reward_coef="
                                 f"{settings.kl_in_reward_coef}) needs '{key}' in every micro-batch: "
                                 f"{_WHERE[key]}")
            fields[field] = _concat_tokens([b[key].float() for b in batches])  # [rows, S]
    if token_rewards is not None and estimator.token_level:
        fields["token_rewards"] = F.pad(token_rewards.float(), (0, fields["mask"].shape[1] - token_rewards.shape[1]))
    if greedy_rewards is not None:
        fields["greedy_rewards"] = greedy_rewards.float().to(rewards.device)
    full = {key: gather_rows(value, group) for key, value in fields.items()}
    if "mask" in full:
        full["mask"] = full["mask"].bool()
        if "lengths" in needs:
            full["lengths"] = full["mask"].sum(-1)
    result = estimate(name, AdvantageInputs(**full, group_size=group_size), settings)
    mine = slice(rank * rows, (rank + 1) * rows)
    advantages = result.advantages[mine]  # [rows] or [rows, S_max]
    returns = None if result.returns is None else result.returns[mine]
    offset = 0
    for batch in batches:
        count, length = batch["labels"].shape
        part = advantages[offset: offset + count]
        batch["advantages"] = (part[:, :length] if part.dim() == 2 else part).contiguous()
        if returns is not None:
            batch["returns"] = returns[offset: offset + count, :length].contiguous()
        offset += count
    return full["rewards"]
