"""Data files and optional packages are checked before any rank starts, every problem in one pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrl.config import load_config
from mrl.job import JobConfig
from mrl.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/sft-tiny-cpu.yaml"


def recipe(*overrides: str) -> JobConfig:
    return load_config(str(REPO / RECIPE), JobConfig, list(overrides))


@pytest.fixture()
def bad_data(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "ab", "response": "ba"}), "{oops", json.dumps({"prompt": "x"}), "",
             json.dumps({"prompt": "z" * 100, "response": "y"}), json.dumps({"prompt": "cd", "response": "dc"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_malformed_record_is_reported_in_one_pass(bad_data):
    with pytest.raises(ValueError) as error:
        preflight(recipe(f"data.path={bad_data}"))
    assert str(error.value).splitlines() == [
        f"data: {bad_data}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{bad_data}:3: missing field 'response'",
        f"{bad_data}:5: sequence of 103 tokens exceeds data.seq_length=32 (data.truncation=error)",
    ]


@pytest.mark.parametrize("name, content, message", [("missing.jsonl", None, "data file not found"),
                                                     ("empty.jsonl", "", "the file holds no records"),
                                                     ("blank.jsonl", "\n  \n", "the file holds no records")])
def test_a_missing_or_empty_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"^data: {path}: {message}$"):
        preflight(recipe(f"data.path={path}"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_missing_optional_package_is_named_with_the_setting_and_the_extra(bad_data):
    with pytest.raises(ValueError) as error:
        preflight(recipe("log.tensorboard=true", f"data.path={bad_data}"))
    lines = str(error.value).splitlines()
    assert lines[0] == (f"log.tensorboard=true needs the 'tensorboard' package, which this Python ({sys.executable}) "
                        "lacks: pip install 'mrl[tensorboard]'")
    assert lines[1].startswith(f"data: {bad_data}:2: ")  # reported together with the data problems


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_a_vllm_recipe_without_vllm_says_how_to_install_it_on_gpu_and_on_cpu():
    cfg = load_config(str(REPO / "configs/grpo-tiny-cpu-vllm.yaml"), JobConfig, [])
    with pytest.raises(ValueError) as error:
        preflight(cfg)
    line = str(error.value).splitlines()[0]
    assert line.startswith(f"rollout.engine=vllm needs the 'vllm' package, which this Python ({sys.executable}) lacks")
    assert "pip install 'mrl[vllm]' on a GPU machine" in line and "make venv-vllm" in line


def test_mrl_train_stops_on_bad_data_before_any_rank_in_seconds(tmp_path, bad_data):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mrl", "train", RECIPE, f"data.path={bad_data}",
                           f"log.output_dir={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"mrl train: error: data: {bad_data}:2: invalid JSON") and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 3
    assert time.monotonic() - started < 30  # about 2 s on an idle machine: no rank is started
    assert not (tmp_path / "out" / "config.yaml").exists()
