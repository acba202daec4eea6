"""``build_loss``: the loss object for a config, selected by its ``kind`` name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Union

from mrl.config.convert import qualify
from mrl.losses.base import Loss, LossConfigBase
from mrl.losses.distill import DistillLoss, DistillLossConfig
from mrl.losses.dpo import DPOLoss, DPOLossConfig
from mrl.losses.policy import PolicyLoss, PolicyLossConfig
from mrl.losses.sft import SFTLoss, SFTLossConfig

LossConfig = Union[PolicyLossConfig, DPOLossConfig, SFTLossConfig, DistillLossConfig]
"""Any loss config; as a config field type it reads a YAML mapping by its ``kind``."""

LOSSES: dict[str, tuple[type[LossConfigBase], type[Loss]]] = {
    "grpo": (PolicyLossConfig, PolicyLoss),
    "ppo": (PolicyLossConfig, PolicyLoss),
    "dpo": (DPOLossConfig, DPOLoss),
    "sft": (SFTLossConfig, SFTLoss),
    "distill": (DistillLossConfig, DistillLoss),
}
"""Loss kind name -> (config class, loss class)."""


def loss_config_from_dict(data: Mapping) -> LossConfigBase:
    """The typed config for a mapping with a ``kind`` key (unknown fields raise ``ValueError``)."""
    kind = data.get("kind")
    if kind not in LOSSES:
        raise ValueError(f"loss.kind must be one of {sorted(LOSSES)}, got {kind!r}")
    config_cls = LOSSES[kind][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown loss field(s) {unknown} for loss.kind={kind!r}; known: {sorted(names)}")
    try:
        return config_cls(**dict(data))
    except ValueError as exc:  # the fields' own checks name them bare; here they are loss.<field>
        raise ValueError(qualify(str(exc), ("loss",), names)) from None


def build_loss(config: LossConfigBase | Mapping, *, vocab_size: int | None = None) -> Loss:
    """The loss object for ``config`` (a loss config dataclass, or a mapping with ``kind``).

    ``vocab_size``: the unpadded vocabulary size (padded logit columns are excluded from every
    softmax, and labels must lie below it); None treats every column as a real token.
    """
    if isinstance(config, Mapping):
        config = loss_config_from_dict(config)
    kind = getattr(config, "kind", None)
    if kind not in LOSSES:
        raise ValueError(f"loss.kind must be one of {sorted(LOSSES)}, got {kind!r}")
    config_cls, loss_cls = LOSSES[kind]
    if not isinstance(config, config_cls):
        raise ValueError(f"loss.kind={kind!r} needs a {config_cls.__name__}, got {type(config).__name__}")
    return loss_cls(config, vocab_size=vocab_size)
