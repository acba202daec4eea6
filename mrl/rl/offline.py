"""Offline RL: GRPO / PPO updates on rollout files (prompts, responses, rewards) instead of online
rollouts.

The data loader gives each DP rank its rows of the global batch, whole groups (the responses to one
prompt) together. Before the step:

  1. the rollout's behaviour log-probs, when the file has them, become the old-policy log-probs of
     the PPO ratio (else the trainer computes them, like the reference log-probs, in ``annotate``);
  2. advantages from the rollout rewards by the estimator rollout.advantage_estimator names, on
     the whole global batch gathered across DP ranks, so the result does not depend on the DP size
     (``mrl.rl.advantage_batches``): a sequence-level estimator (GRPO, RLOO, OPO, pass@k) when the
     batches arrive, a token-level one (GAE, REINFORCE++, ...) after the log-prob passes, on the
     last pipeline stage;
  3. with a critic (loss.kind ppo) and a value head: its targets (``mrl.rl.targets.value_targets``:
     returns R and advantages R − V_old under the default estimator).
"""

from __future__ import annotations

import torch

from mrl.losses.base import BatchNeeds
from mrl.rl.advantage_batches import assign_advantages, gather_rows, with_reward_kl
from mrl.rl.advantages import get_estimator
from mrl.rl.targets import value_targets
from mrl.train.trainer import Trainer


class OfflineRLTrainer(Trainer):
    """``Trainer`` whose batches carry rollout rewards; their advantages are computed per step."""

    def batch_needs(self) -> BatchNeeds:
        """The loss's needs, and the reference log-probs of a KL penalty in the reward."""
        return with_reward_kl(super().batch_needs(), self.cfg.rollout)

    def next_batches(self) -> tuple[list[dict], dict[str, float]]:
        batches, extra = super().next_batches()
        return batches, dict(extra, **self._offline_advantages(batches))

    def annotate(self, micro_batches: list[dict]) -> None:
        """The base class's log-prob passes, then a token-level estimator's advantages and the
        critic's targets."""
        super().annotate(micro_batches)
        name = self.cfg.rollout.advantage_estimator
        if get_estimator(name).token_level and self.layout.is_last_stage:
            assign_advantages(micro_batches, self.cfg.rollout, group=self.layout.dp_group, rank=self.layout.dp_rank)
        if self.batch_needs().value_targets and self.cfg.model.value_head:
            for batch in micro_batches:
                value_targets(batch, name)

    def _offline_advantages(self, batches: list[dict]) -> dict[str, float]:
        """Behaviour log-probs as old ones; a sequence-level estimator's advantages (module docstring)."""
        if self.batch_needs().old_logprobs:
            for batch in batches:
                if "behaviour_logprobs" in batch:
                    batch.setdefault("old_logprobs", batch["behaviour_logprobs"])
        group, rank = self.layout.dp_group, self.layout.dp_rank
        if get_estimator(self.cfg.rollout.advantage_estimator).token_level:
            rewards = gather_rows(torch.cat([b["rewards"] for b in batches]).float(), group)  # [N]
        else:
            rewards = assign_advantages(batches, self.cfg.rollout, group=group, rank=rank)
        return {"reward_mean": float(rewards.mean())}
