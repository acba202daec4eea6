"""Soak: every tiny CPU recipe trains to the end through the CLI, learns, and resumes.

Slow (minutes each): run with ``make soak`` / ``pytest -m soak``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak
ROOT = Path(__file__).resolve().parents[1]


def _train(recipe: str, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "mrl", "train", recipe, f"log.output_dir={output_dir}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize("recipe,metric,direction", [
    ("configs/sft-tiny-cpu.yaml", "loss", -1),
    ("configs/dpo-tiny-cpu.yaml", "loss", -1),
    # A mix of preference losses (sigmoid + BCO-pair + SFT): its preference margin grows.
    ("configs/dpo-mpo-tiny-cpu.yaml", "reward_margin", +1),
    # Offline GRPO's loss at ratio 1 is -mean(advantage): a property of the data, not of learning.
    # What moves is the policy: its entropy falls as it concentrates on the rewarded responses.
    ("configs/offline-grpo-tiny-cpu.yaml", "entropy", -1),
    ("configs/grpo-tiny-cpu.yaml", "reward_mean", +1),
    # REINFORCE++ with KL in the reward: reward_mean 0.242 (first 5 steps) -> 0.345 (last 5), 6:20 on 4 CPU ranks.
    ("configs/grpo-tiny-reinforcepp-cpu.yaml", "reward_mean", +1),
    # CISPO: reward_mean 0.241 (first 5 steps) -> 0.332 (last 5), 7:52 of training on 2 shared CPU cores.
    ("configs/grpo-tiny-cispo-cpu.yaml", "reward_mean", +1),
])
def test_recipe_trains_learns_and_resumes(tmp_path, recipe, metric, direction):
    first = _train(recipe, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = _records(tmp_path)
    steps = records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(not r["skipped"] for r in records)
    head, tail = _mean(r[metric] for r in records[:5]), _mean(r[metric] for r in records[-5:])
    assert (tail - head) * direction > 0, (metric, head, tail)
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"

    again = _train(recipe, tmp_path)  # the same command again: the run is complete, nothing to do
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"is already complete: its latest checkpoint is step {steps}" in again.stdout + again.stderr
    assert len(_records(tmp_path)) == steps
