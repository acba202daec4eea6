"""The training algorithms a recipe's ``algorithm`` names: one registry entry each.

An entry says which ``data.kind`` the algorithm reads and which ``loss.kind`` it trains with,
whether its batches carry rewards (reinforcement learning: advantages come from them) and whether
it samples them from the policy itself (online: the ``rollout.*`` sampling settings apply), and
names its trainer class as ``"module:Class"``. The class is imported only when a job builds its
trainer, so ``import mrl`` and config validation stay free of the training stack.

A new algorithm is one trainer module (a ``mrl.train.trainer.Trainer`` subclass, or ``Trainer``
itself when the loss's ``batch_needs`` say everything) plus one entry in ``ALGORITHMS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True)
class Algorithm:
    """One training algorithm: what it reads, what it trains with, and its trainer."""

    data_kinds: tuple[str, ...]
    """``data.kind`` values it reads."""

    loss_kinds: tuple[str, ...]
    """``loss.kind`` values it trains with."""

    trainer: str
    """Its trainer class as ``"module:Class"`` (imported by ``trainer_class``)."""

    rewards: bool = False
    """Its batches carry rewards: advantages (``rollout.advantage_estimator``) and the critic's
    targets come from them."""

    online: bool = False
    """It samples its batches from the policy (``rollout.*`` sampling and group settings)."""

    def trainer_class(self) -> type:
        """The trainer class, imported now."""
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


ALGORITHMS: Mapping[str, Algorithm] = MappingProxyType({
    "sft": Algorithm(("sft",), ("sft",), "mrl.train.trainer:Trainer"),
    "dpo": Algorithm(("preference",), ("dpo",), "mrl.train.trainer:Trainer"),
    "grpo": Algorithm(("prompt",), ("grpo", "ppo"), "mrl.rl.grpo:GRPOTrainer", rewards=True, online=True),
    "offline-rl": Algorithm(("rollout",), ("grpo", "ppo"), "mrl.rl.offline:OfflineRLTrainer", rewards=True),
    "distill": Algorithm(("sft",), ("distill",), "mrl.train.trainer:Trainer"),
})
"""Algorithm name -> ``Algorithm`` (read-only)."""

AlgorithmName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]
"""The names of ``ALGORITHMS``, as the type of ``JobConfig.algorithm``."""


def get_algorithm(name: str) -> Algorithm:
    """The registry entry of ``name``; ``ValueError`` naming the field and the choices otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]


def algorithms_with(**flags: bool) -> tuple[str, ...]:
    """Names of the algorithms whose entries have every given flag value, e.g. ``rewards=True``."""
    return tuple(name for name, entry in ALGORITHMS.items()
                 if all(getattr(entry, flag) == value for flag, value in flags.items()))
