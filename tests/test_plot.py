"""`mrl plot`: real metrics.jsonl files in, a PNG with one panel per logged quantity out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]


def write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mrl_plot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mrl", "plot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_two_runs_overlaid_one_panel_per_quantity(tmp_path):
    grpo = write_run(tmp_path / "grpo", [
        {"step": s, "loss": 0.1 / s, "policy_loss": 0.08 / s, "kl": 0.01 * s, "reward_mean": 0.2 + 0.01 * s,
         "entropy": 3 - 0.1 * s, "lr": 1e-4, "grad_norm": 1.5, "skipped": False} for s in range(1, 11)])
    sft = write_run(tmp_path / "sft", [{"step": s, "loss": 5.0 - s, "nll_loss": 5.0 - s, "lr": 1e-3 * s,
                                        "grad_norm": "nan"} for s in range(1, 4)])
    proc = mrl_plot(str(grpo), str(sft), "--out", "plots/both.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "wrote plots/both.png (loss, reward, KL, entropy, learning rate, grad norm)\n"
    assert (tmp_path / "plots" / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = mrl_plot(str(sft), cwd=tmp_path)  # one run: the picture goes beside its metrics
    assert proc.stdout == f"wrote {sft}/curves.png (loss, learning rate)\n"  # its grad norms were NaN
    assert (sft / "curves.png").stat().st_size > 1000


def test_a_run_without_metrics_is_named(tmp_path):
    proc = mrl_plot(str(tmp_path / "nothing"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"mrl plot: error: {tmp_path / 'nothing'}: no metrics.jsonl (expected a run directory or a metrics.jsonl file)\n"
