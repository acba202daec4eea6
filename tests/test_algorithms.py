"""The algorithm registry: one entry per algorithm names its data, losses and trainer; the runner
and the config's checks read it instead of comparing names."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from mrl.algorithms import ALGORITHMS, Algorithm, algorithms_with, get_algorithm
from mrl.job import JobConfig


def test_every_entry_names_a_trainer_class():
    from mrl.train.trainer import Trainer

    for name, entry in ALGORITHMS.items():
        cls = entry.trainer_class()
        assert issubclass(cls, Trainer), name
    assert ALGORITHMS["grpo"].trainer_class().__name__ == "GRPOTrainer"
    assert ALGORITHMS["offline-rl"].trainer_class().__name__ == "OfflineRLTrainer"


def test_the_config_accepts_exactly_the_registered_names():
    assert typing.get_args(typing.get_type_hints(JobConfig)["algorithm"]) == tuple(ALGORITHMS)
    with pytest.raises(ValueError, match="algorithm must be one of sft, dpo, grpo, offline-rl, distill, got 'ppo'"):
        get_algorithm("ppo")
    with pytest.raises(TypeError):
        ALGORITHMS["new"] = ALGORITHMS["sft"]  # read-only: no module-level mutable state
    assert algorithms_with(rewards=True) == ("grpo", "offline-rl")
    assert algorithms_with(rewards=True, online=False) == ("offline-rl",)


def test_importing_the_registry_and_mrl_stays_light():
    code = "import sys, mrl, mrl.algorithms; print('torch' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


class _RecordingTrainer:
    def __init__(self, cfg, layout) -> None:
        self.cfg, self.layout = cfg, layout


def test_build_trainer_builds_the_registered_class(monkeypatch):
    import mrl.runner

    entry = Algorithm(("sft",), ("sft",), f"{__name__}:_RecordingTrainer")
    monkeypatch.setattr(mrl.runner, "get_algorithm", lambda name: entry)
    cfg, layout = JobConfig(), object()
    trainer = mrl.runner.build_trainer(cfg, layout)
    assert isinstance(trainer, _RecordingTrainer) and trainer.cfg is cfg and trainer.layout is layout


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "sft", "loss": {"kind": "ppo", "value_coef": 0.5}, "model": {"value_head": True}},
     "loss.kind"),
    ({"algorithm": "dpo", "loss": {"kind": "dpo"}, "data": {"kind": "preference"}},
     "needs a reference model"),
    ({"algorithm": "distill", "loss": {"kind": "distill"}, "reference": {"source": "initial"}},
     "needs reference.keep_logits"),
    ({"algorithm": "offline-rl", "loss": {"kind": "grpo", "kl_coef": 0.1, "kl_estimator": "full"},
      "data": {"kind": "rollout"}, "reference": {"source": "initial"}}, "needs reference.keep_logits"),
    ({"algorithm": "dpo", "loss": {"kind": "dpo"}, "data": {"kind": "preference"},
      "reference": {"source": "initial"}, "train": {"micro_batch_size": 3, "global_batch_size": 12}},
     "pairs stay together"),
])
def test_checks_read_the_registry_and_the_loss_needs(overrides, message):
    from mrl.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(overrides, JobConfig).validate(1)
