"""PPO critic targets for outcome rewards (one reward per response, no intermediate rewards).

With γ = λ = 1 and a single terminal reward R, the return of every response token is R and the
GAE advantage is ``A_t = R − V_old(t)``. Both are computed where ``old_values`` exist (the last
pipeline stage, where the loss runs). Other advantage estimators keep their own advantages; the
value loss then regresses on their returns, or on R when they have none (``value_targets``).
"""

from __future__ import annotations

import torch


def outcome_value_targets(batch: dict) -> None:
    """Set ``returns`` and ``advantages`` ([B, S]) of a micro-batch holding ``rewards`` and ``old_values``."""
    if "old_values" not in batch:
        return  # not the last pipeline stage: no loss is computed here
    rewards = batch["rewards"].float()  # [B]
    returns = rewards[:, None].expand_as(batch["old_values"]).contiguous()  # [B, S]
    batch["returns"] = returns
    batch["advantages"] = returns - batch["old_values"]


def value_targets(batch: dict, estimator: str) -> None:
    """Critic targets of a micro-batch under ``rollout.advantage_estimator`` = ``estimator``.

    grpo (the default): ``outcome_value_targets`` (its advantages become R − V_old); any other
    estimator keeps its advantages, and ``returns`` is R on every token unless it set its own
    (gae: A + V; reinforce++ and the optimal token baseline: the discounted return).
    """
    if "old_values" not in batch:
        return
    if estimator == "grpo":
        outcome_value_targets(batch)
    elif "returns" not in batch:
        batch["returns"] = batch["rewards"].float()[:, None].expand_as(batch["old_values"]).contiguous()  # [B, S]
