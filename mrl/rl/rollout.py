"""The rollout seam: what produces completions for online RL, and how one is chosen.

A ``RolloutSource`` turns prompts (token ids) into completions (token ids), each token with its
log-prob under the distribution it was drawn from. ``rollout.engine`` picks the source from
``ROLLOUT_ENGINES``; ``megatron`` (KV-cached decoding of the policy's own weights, on its own
layout) is the default; ``vllm`` (``mrl.rl.vllm_engine``) runs a vLLM engine per data-parallel
replica, refit in place from the policy before every rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class Rollout:
    """Completions of one batch of prompts, in prompt order."""

    completions: list[list[int]]
    """Token ids of each completion (ending with eos unless cut at max_new_tokens)."""

    logprobs: list[list[float]]
    """log-prob of each completion token under the distribution it was sampled from (after
    temperature, top-k and top-p)."""

    stats: dict[str, float] = field(default_factory=dict)
    """How the batch was generated: seconds, generated tokens, waves."""


class RolloutSource(Protocol):
    """Produces completions for prompts; every rank of a DP replica returns the same ``Rollout``."""

    def generate(self, prompts: list[list[int]], seed: int, *, greedy: bool = False) -> Rollout:
        """Completions of ``prompts``; ``greedy``: the most likely token at every step (after
        temperature, top-k and top-p) instead of a draw (ReMax's baseline rollouts)."""
        ...


def _megatron_source(cfg, chunks, layout, tokenizer, log) -> RolloutSource:
    from mrl.rl.sampler import PolicySampler

    return PolicySampler.from_config(cfg, chunks, layout, tokenizer, log=log)


def _vllm_source(cfg, chunks, layout, tokenizer, log) -> RolloutSource:
    from mrl.rl.vllm_engine import VLLMRolloutSource

    return VLLMRolloutSource(cfg, chunks, layout, tokenizer, log=log)


ROLLOUT_ENGINES: dict[str, Callable[..., RolloutSource]] = {"megatron": _megatron_source, "vllm": _vllm_source}
"""``rollout.engine`` name -> ``builder(cfg, chunks, layout, tokenizer, log)``."""


def build_rollout_source(cfg, chunks: list, layout, tokenizer, log: Callable[[str], None] = print) -> RolloutSource:
    """The rollout source ``cfg.rollout.engine`` names, over the policy ``chunks`` on ``layout``."""
    try:
        builder = ROLLOUT_ENGINES[cfg.rollout.engine]
    except KeyError:
        raise ValueError(f"rollout.engine must be one of {sorted(ROLLOUT_ENGINES)}, got {cfg.rollout.engine!r}") from None
    return builder(cfg, chunks, layout, tokenizer, log)
