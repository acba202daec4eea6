"""Typed configuration of online GRPO: sampling, rewards, advantages, warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mrl.data.config import DataConfig


@dataclass
class RolloutConfig:
    """Online rollouts: G responses per prompt sampled from the policy itself, then rewarded."""

    group_size: int = 4
    """Responses sampled per prompt (G); train.global_batch_size counts responses, so prompts per
    step = global_batch_size / group_size."""

    max_new_tokens: int = 8
    """Longest response, in tokens (generation also stops at eos)."""

    temperature: float = 1.0
    """Sampling temperature; the training log-probs use the same temperature."""

    reward: str = "mrl.data.tasks:reverse_word_reward"
    """Reward function as 'module:function', called as f(prompt, completion[, answer]); it returns
    one number (outcome reward, GRPO advantages per response) or a list of per-character credits
    (one per character plus one for the end: token-level advantages, see mrl.rl.credit)."""

    normalize_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); false gives Dr. GRPO."""

    leave_one_out: bool = False
    """Baseline each response with the mean of the other responses of its group (RLOO)."""

    updates_per_rollout: int = 1
    """Mini-batches each rollout batch is split into, one optimizer step each; 1 with epochs 1 is
    strictly on-policy (ratio exactly 1)."""

    epochs: int = 1
    """Passes over each rollout batch (PPO epochs); every pass takes updates_per_rollout steps with
    the ratio taken against the log-probs from before the first pass."""

    sft_warmup_steps: int = 0
    """SFT steps on warmup_data before GRPO starts (gives a tiny random model a reward signal)."""

    warmup_lr: Optional[float] = None
    """Constant learning rate of the SFT warm-up; None uses optim.lr."""

    warmup_data: DataConfig = field(default_factory=lambda: DataConfig(kind="sft"))
    """SFT data for the warm-up steps."""

    def __post_init__(self) -> None:
        for name in ("group_size", "max_new_tokens", "updates_per_rollout", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 for group advantages, got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if self.sft_warmup_steps < 0:
            raise ValueError(f"rollout.sft_warmup_steps must be >= 0, got {self.sft_warmup_steps}")
        if self.warmup_lr is not None and not self.warmup_lr > 0:
            raise ValueError(f"rollout.warmup_lr must be > 0 or null, got {self.warmup_lr}")
        if ":" not in self.reward:
            raise ValueError(f"rollout.reward must be 'module:function', got {self.reward!r}")
        if self.warmup_data.kind != "sft":
            raise ValueError(f"rollout.warmup_data.kind must be 'sft', got {self.warmup_data.kind!r}")
