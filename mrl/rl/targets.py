"""PPO critic targets for outcome rewards (one reward per response, no intermediate rewards).

With γ = λ = 1 and a single terminal reward R, the return of every response token is R and the
GAE advantage is ``A_t = R − V_old(t)``. Both are computed where ``old_values`` exist (the last
pipeline stage, where the loss runs).
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
