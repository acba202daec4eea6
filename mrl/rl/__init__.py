"""Online RL: rollouts sampled from the policy, rewards, group advantages (GRPO)."""
