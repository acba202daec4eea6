"""A rerun of an output directory is compared with the run there before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrl.config import dump_yaml, load_config
from mrl.job import JobConfig
from mrl.resume_guard import inspect_rerun, write_run_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/sft-tiny-cpu.yaml"


def recipe(output_dir: Path, *overrides: str) -> JobConfig:
    return load_config(str(REPO / RECIPE), JobConfig, [*overrides, f"log.output_dir={output_dir}"])


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run's directory as training leaves it: its config.yaml and a latest checkpoint at step 30."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000030\n")
    (out / "config.yaml").write_text(dump_yaml(recipe(out)))
    return out


def test_an_unchanged_resume_passes_and_bookkeeping_changes_are_only_printed(run_dir):
    assert inspect_rerun(recipe(run_dir)).notes() == []
    rerun = inspect_rerun(recipe(run_dir, "train.steps=90", "parallel.tp=1", "log.progress=false"))
    assert rerun.step == 30 and rerun.changed == {}
    assert rerun.notes() == [f"resuming {run_dir} at step 30 with changed settings:", "  log.progress: True -> False",
                             "  parallel.tp: 2 -> 1", "  train.steps: 60 -> 90"]


@pytest.mark.parametrize("override, key", [("model.hidden_size=64", "model.hidden_size"),
                                           ("data.tokenizer=/models/other", "data.tokenizer"),
                                           ("optim.distributed=false", "optim.distributed")])
def test_changes_the_checkpoint_cannot_take_are_refused_even_with_the_flag(run_dir, override, key):
    with pytest.raises(ValueError) as error:
        inspect_rerun(recipe(run_dir, override, "train.allow_config_changes=true"))
    message = str(error.value)
    assert message.startswith(f"{run_dir} holds a run at step 30 whose checkpoints cannot take these changes:\n  {key}: ")
    assert f"train.init_checkpoint={run_dir}" in message


def test_other_changes_need_the_flag_and_are_recorded(run_dir):
    with pytest.raises(ValueError) as error:
        inspect_rerun(recipe(run_dir, "optim.lr=0.0003"))
    assert str(error.value) == (
        f"resuming {run_dir} (step 30) with settings that differ from its config.yaml:\n  optim.lr: 0.001 -> 0.0003\n"
        f"rerun with train.allow_config_changes=true to resume with them (they are recorded in "
        f"{run_dir}/config_changes.jsonl), or without these overrides")
    cfg = recipe(run_dir, "optim.lr=0.0003", "train.allow_config_changes=true")
    rerun = inspect_rerun(cfg)
    write_run_config(cfg, rerun)
    (entry,) = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert entry["step"] == 30 and entry["changes"] == {"optim.lr": {"old": 0.001, "new": 0.0003}}
    assert "lr: 0.0003" in (run_dir / "config.yaml").read_text()


def mrl(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "mrl", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_refused_resume_leaves_config_yaml_as_it_was(run_dir):
    before = (run_dir / "config.yaml").read_text()
    proc = mrl("train", RECIPE, "model.hidden_size=64", f"log.output_dir={run_dir}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"mrl train: error: {run_dir} holds a run at step 30 whose checkpoints cannot "
                                  "take these changes:\n  model.hidden_size: 128 -> 64\n"), proc.stderr
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / "run.lock").exists()
    proc = mrl("validate", RECIPE, "optim.lr=0.0003", f"log.output_dir={run_dir}")  # validate says so too
    assert proc.returncode == 1 and "optim.lr: 0.001 -> 0.0003" in proc.stderr


def test_a_rerun_of_a_finished_run_says_so_in_seconds(run_dir):
    started = time.monotonic()
    proc = mrl("train", RECIPE, "train.steps=30", f"log.output_dir={run_dir}")
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"[mrl] {run_dir} is already complete: its latest checkpoint is step 30 (train.steps=30); "
                           "nothing to train. Raise train.steps to train further.\n")
    assert seconds < 30  # about 2 s on an idle machine: no rank is started
