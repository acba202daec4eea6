"""Offline RL: GRPO / PPO updates on rollout files (prompts, responses, rewards) instead of online
rollouts.

The data loader gives each DP rank its rows of the global batch, whole groups (the responses to one
prompt) together. Before the step:

  1. advantages from the rollout rewards, with the groups of the whole global batch (gathered
     across DP ranks, so the result does not depend on the DP size);
  2. the rollout's behaviour log-probs, when the file has them, become the old-policy log-probs of
     the PPO ratio (else the trainer computes them, like the reference log-probs, in ``prepare``);
  3. with loss.kind ppo and a value head: the critic's targets (returns R, advantages R − V_old).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mrl.losses import functional as LF
from mrl.rl.targets import outcome_value_targets
from mrl.train.trainer import Trainer


class OfflineRLTrainer(Trainer):
    """``Trainer`` whose batches carry rollout rewards; their advantages are computed per step."""

    def next_batches(self) -> tuple[list[dict], dict[str, float]]:
        batches, extra = super().next_batches()
        return batches, dict(extra, **self._offline_advantages(batches))

    def prepare(self, micro_batches: list[dict]) -> None:
        """The base class's log-probs, then the critic's targets where the loss uses a value head."""
        super().prepare(micro_batches)
        if self.cfg.loss.kind == "ppo" and self.cfg.model.value_head:
            for batch in micro_batches:
                outcome_value_targets(batch)

    def _offline_advantages(self, batches: list[dict]) -> dict[str, float]:
        """GRPO advantages from the rollout rewards, groups gathered across DP ranks."""
        rewards = torch.cat([b["rewards"] for b in batches]).float()  # [rows]
        groups = torch.cat([b["group_ids"] for b in batches])  # [rows]
        all_rewards, all_groups = _all_gather_rows(rewards, self.layout.dp_group), _all_gather_rows(groups, self.layout.dp_group)
        advantages, _ = LF.group_advantages(all_rewards, group_ids=all_groups,
                                            normalize_std=self.cfg.rollout.normalize_std,
                                            leave_one_out=self.cfg.rollout.leave_one_out)
        local = advantages.view(self.layout.dp, -1)[self.layout.dp_rank]
        offset = 0
        for batch in batches:
            rows = batch["rewards"].shape[0]
            batch["advantages"] = local[offset: offset + rows]
            if "behaviour_logprobs" in batch and self.cfg.loss.kind in ("grpo", "ppo"):
                batch.setdefault("old_logprobs", batch["behaviour_logprobs"])
            offset += rows
        return {"reward_mean": float(all_rewards.mean())}


def _all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate equally sized 1-d tensors of every rank of ``group`` in rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)
