"""tools/gpu_check.py without a GPU: the dry run end to end, the failure paths, the parsers."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
STEP_NAMES = ["setup", "gpu-tests", "vocab-ops", "fused-head", "train-step", "rollout"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run_check(out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    # Roomy time boxes: a shared CPU machine can be many times slower than a quiet one.
    argv = [sys.executable, str(TOOLS / "gpu_check.py"), "--out", str(out), "--time-scale", "4",
            "--budget-s", "1800", *args]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    return done, summary


def test_dry_run_records_every_step_and_the_tiny_train_step(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_name = "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
    (wheels / wheel_name).write_bytes(b"not a real wheel")
    out = tmp_path / "out"

    done, summary = _run_check(out, "--dry-run", "--wheels", str(wheels))

    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["dry_run"] is True and summary["ok"] is True
    steps = {step["name"]: step for step in summary["steps"]}
    assert [step["name"] for step in summary["steps"]] == STEP_NAMES
    for step in summary["steps"]:
        assert 0 <= step["seconds"] <= step["box_s"] + 10 and step["box_s"] <= step["budget_s"]

    setup = steps["setup"]
    assert setup["status"] == "ok", setup["reason"]
    assert setup["numbers"]["cuda"] is False  # a dry run hides the GPU from every step
    assert setup["numbers"]["wheels_found"] == 1
    assert setup["details"]["wheels"][0]["file"] == wheel_name
    assert summary["environment"]["megatron_core"] == "0.16.1"

    tests = steps["gpu-tests"]
    assert tests["status"] == "skipped" and "needs a CUDA GPU" in tests["reason"]
    assert tests["numbers"]["tests"] >= 1 and tests["numbers"]["passed"] == 0
    assert (out / tests["log"]).is_file()

    assert steps["vocab-ops"]["status"] == "skipped" and steps["vocab-ops"]["reason"].startswith("dry run")
    assert steps["vocab-ops"]["numbers"] == {}
    for name, script in (("fused-head", "tools/bench_fused_head.py"), ("rollout", "tools/bench_rollout.py")):
        step = steps[name]
        assert step["status"] == "skipped" and step["numbers"] == {}
        expected = "dry run" if (REPO / script).is_file() else f"{script} not present"
        assert step["reason"].startswith(expected)

    train = steps["train-step"]
    assert train["status"] == "ok", train["reason"]
    numbers = train["numbers"]
    assert numbers["size"] == "tiny" and numbers["dtype"] == "bf16" and numbers["device"].startswith("cpu")
    for key in ("params", "tokens_per_step", "step_s", "tokens_per_s", "model_tflops", "gemm_tflops",
                "vs_gemm", "peak_memory_gib"):
        assert numbers[key] > 0 and math.isfinite(numbers[key]), key
    assert math.isfinite(numbers["loss_first"]) and math.isfinite(numbers["loss_last"])
    assert numbers["mfu"] is None  # no nominal peak on a CPU: not made up
    assert numbers["timed_steps"] == 3 and numbers["finite"] is True

    table = (out / "summary.txt").read_text()
    assert "dry run" in table and all(name in table for name in STEP_NAMES)
    assert "tools/bench_rollout.py" in table or (REPO / "tools/bench_rollout.py").is_file()


def test_without_a_gpu_a_real_run_fails_at_setup_and_says_why(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done, summary = _run_check(tmp_path / "out", "--wheels", str(tmp_path / "none"), env=env)

    assert done.returncode == 1
    setup, *rest = summary["steps"]
    assert setup["status"] == "failed" and "no CUDA device" in setup["reason"] and "--dry-run" in setup["reason"]
    assert all(step["status"] == "skipped" and step["reason"] == "setup failed" for step in rest)
    assert "FAILED" in done.stdout


def test_a_step_past_its_time_box_is_stopped_with_its_children(tmp_path):
    check = _load("gpu_check")
    ctx = check.Context(out=tmp_path, wheels=tmp_path, site=tmp_path, dry_run=True,
                        deadline=time.monotonic() + 60, env=dict(os.environ))
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    argv = [sys.executable, "-c", script]

    started = time.monotonic()
    done = check.run_command(ctx, "sleepy", argv, box_s=2.0)

    assert done.timed_out and time.monotonic() - started < 15
    outcome = check.command_outcome(done, argv, 2.0, {}, True, "")
    assert outcome.status == "timeout" and "2 s" in outcome.reason and outcome.numbers == {}
    assert not _running(int(pid_file.read_text()))


def _running(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie waiting to be reaped."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_the_step_budgets_fit_in_eight_minutes():
    check = _load("gpu_check")
    assert [step.name for step in check.STEPS] == STEP_NAMES
    assert sum(step.budget_s for step in check.STEPS) <= 480 - 2 * check.MIN_BOX_S


def test_install_plan_says_what_is_missing_and_how_to_get_it(tmp_path):
    check = _load("gpu_check")
    info = {"python": "3.12.3", "megatron_core": None, "megatron_error": "ModuleNotFoundError: No module named 'megatron'"}
    message = check.install_plan(info, [], tmp_path)
    assert "megatron-core 0.16.1" in message and "make gpu-wheels" in message and "No module named" in message

    wheel = dict(file="megatron_core-0.16.1-x.whl", path=str(tmp_path / "m.whl"), project="megatron-core",
                 version="0.16.1", usable=True)
    assert check.install_plan(info, [wheel], tmp_path) == [wheel["path"]]
    older = dict(wheel, file="megatron_core-0.15.0-x.whl", version="0.15.0")
    assert "more than one wheel" in check.install_plan(info, [wheel, older], tmp_path)
    foreign = dict(wheel, usable=False)
    assert "not for this interpreter" in check.install_plan(info, [foreign], tmp_path)


def test_wheel_discovery_reads_names_and_tags(tmp_path):
    check = _load("gpu_check")
    (tmp_path / "pure_pkg-1.0-py3-none-any.whl").write_bytes(b"x" * 2048)
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    found = {w["project"]: w for w in check.discover_wheels(tmp_path)}
    assert found["pure-pkg"]["usable"] is True and found["pure-pkg"]["version"] == "1.0"
    assert found["megatron-core"]["version"] == "0.16.1"
    if sys.version_info[:2] != (3, 12):
        assert found["megatron-core"]["usable"] is False
    assert check.discover_wheels(tmp_path / "absent") == []


def test_vocab_ops_numbers_are_read_from_the_benchmarks_own_report():
    bench, parse = _load("bench_vocab_ops"), _load("gpu_check_parse")
    cfg = bench.BenchConfig(device="cuda", tp=1, tokens=16384, vocab=152064, dtype="bfloat16", repeats=15,
                            warmup=2, chunk_size=None, peak_gbps=None, port=0)
    names = ["mrl logprobs", "megatron-core", "gather+log_softmax", "mrl fused", "mrl two calls"]
    times = dict(zip(names, (0.030, 0.040, 0.120, 0.035, 0.060)))
    peaks = dict(zip(names, (1.0, 1.0, 6.0, 1.02, 3.0)))
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        bench._report(cfg, times, times, peaks, shard_bytes=2**30, copy_gbps=4000.0)

    numbers = parse.parse_vocab_ops(buffer.getvalue())

    floor_s = 3 * 2**30 / 4000e9
    assert numbers["copy_gbps"] == 4000.0
    assert numbers["mrl_logprobs_x_floor"] == pytest.approx(0.030 / floor_s, abs=0.01)
    assert numbers["megatron_core_gbps"] == pytest.approx(3 * 2**30 / 0.040 / 1e9, abs=1)
    assert numbers["gather_log_softmax_wall_ms"] == pytest.approx(120.0)
    assert numbers["mrl_fused_peak_extra_shards"] == pytest.approx(1.02)
    assert numbers["ratio_mrl_fused_vs_mrl_two_calls_wall"] == pytest.approx(0.58, abs=0.01)


def test_numbers_from_a_benchmark_without_a_summary_line():
    parse = _load("gpu_check_parse")
    text = "decode tokens/s: 15234.5\nprefill 812.0 tokens/s\nfused head TFLOP/s 412.3\nnoise 12 apples\n"
    assert parse.parse_unit_numbers(text) == {"decode_tokens_s": 15234.5, "prefill_tokens_s": 812.0,
                                              "fused_head_tflop_s": 412.3}
    assert parse.parse_summary_line("x\nSUMMARY {\"a\": 1}\n") == {"a": 1}
    assert parse.last_error_line("$ cmd\nTraceback (most recent call last):\nValueError: bad\nexit\n") == "ValueError: bad"
