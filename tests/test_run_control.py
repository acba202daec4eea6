"""Whole runs of ``mrl train`` under real signals: the lock, stop with a checkpoint, a killed rank.

Each test starts ``mrl train`` as its own session (2 CPU ranks, DP=2), waits for real training
steps, sends a real signal and then checks the message, the files, and that no process of that
session is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/sft-tiny-cpu.yaml"
TWO_RANKS = ("nproc=2", "parallel.tp=1", "parallel.pp=1", "train.global_batch_size=8",
             "train.micro_batch_size=4", "log.progress=true")


def clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM", "TORCHELASTIC"))}


def session_processes(sid: int, settle_s: float = 5.0) -> list[str]:
    """The processes of session ``sid`` still alive ``settle_s`` after its leader ended (a
    multiprocessing resource tracker exits on its own once its owner has gone)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class Run:
    """``mrl train`` in a session of its own, output in a file."""

    def __init__(self, tmp: Path, output_dir: Path, *overrides: str, name: str = "run") -> None:
        self.output_dir = output_dir
        self.log = tmp / f"{name}.out"
        command = [sys.executable, "-m", "mrl", "train", RECIPE, *TWO_RANKS, *overrides,
                   f"log.output_dir={output_dir}"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def steps(self) -> list[int]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"mrl train ended ({self.proc.returncode}) early:\n{self.output}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting:\n{self.output}")
            time.sleep(0.2)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mrl train did not exit within {timeout} s:\n{self.output}")

    def session(self) -> list[str]:
        return session_processes(self.proc.pid)

    def ranks(self) -> list[psutil.Process]:
        """The rank processes, in rank order (they are started in that order)."""
        children = psutil.Process(self.proc.pid).children()
        return sorted((p for p in children if "spawn_main" in " ".join(p.cmdline())), key=lambda p: p.pid)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text().strip()


def test_a_second_run_is_refused_and_sigterm_saves_the_current_step_and_stops_every_process(tmp_path):
    out = tmp_path / "out"
    run = Run(tmp_path, out, "train.steps=500")
    run.wait_for(lambda: len(run.steps()) >= 2)

    second = Run(tmp_path, out, "train.steps=500", name="second")
    assert second.wait() == 1, second.output
    assert f"mrl train: error: {out} is in use by another mrl run (pid {run.proc.pid} on host " in second.output
    assert second.output.count("\n") == 1  # one line, before any rank started

    run.proc.send_signal(signal.SIGTERM)
    status = run.wait()
    assert status == 128 + signal.SIGTERM, run.output
    step = run.steps()[-1]
    assert f"stopped by SIGTERM at step {step}/500: saved {out}/checkpoints/step_{step:08d}" in run.output
    assert "[mrl] SIGTERM: the ranks finish their step and save a checkpoint" in run.output
    assert f"[mrl] trained steps 1-{step} of 500 in " in run.output  # the summary follows the stop
    assert f"[mrl] metrics: {out}/metrics.jsonl; checkpoints: {out}/checkpoints (latest: step_{step:08d})" in run.output
    assert latest(out) == f"step_{step:08d}" and "Traceback" not in run.output
    assert run.steps() == list(range(1, step + 1))  # one curve: the refused run wrote nothing
    assert run.session() == [] and not (out / "run.lock").exists()


def test_a_killed_rank_is_named_nothing_is_left_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    run = Run(tmp_path, out, "train.steps=500", "train.save_interval=2")
    run.wait_for(lambda: (out / "checkpoints" / "latest").exists() and len(run.steps()) >= 3)
    victim = run.ranks()[1]
    started = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    status = run.wait()
    seconds = time.monotonic() - started
    assert status == 128 + signal.SIGKILL, run.output
    assert f"mrl train: error: rank 1 (pid {victim.pid}) was killed by SIGKILL; stopped the other rank" in run.output
    assert "Traceback" not in run.output and "Connection closed" not in run.output
    assert seconds < 30
    assert run.session() == []

    saved = int(latest(out).split("_")[1])
    rerun = Run(tmp_path, out, f"train.steps={saved + 1}", name="rerun")
    assert rerun.wait() == 0, rerun.output
    assert f"resumed from {out}/checkpoints/step_{saved:08d} at step {saved}" in rerun.output
    assert rerun.steps()[-1] == saved + 1


def test_an_error_on_the_ranks_is_printed_once_with_the_tracebacks_in_the_log_directory(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-checkpoint"
    run = Run(tmp_path, out, "train.steps=2", f"train.init_checkpoint={missing}")  # found only once the model is built
    status = run.wait()
    assert status == 1, run.output
    assert run.output.count("[mrl] error on rank") == 1 and "Traceback" not in run.output
    assert f"CheckpointError: no checkpoint at {missing}" in run.output
    assert f"[mrl] full tracebacks: {out}/logs/rank*.log" in run.output
    assert "exited with status 1; stopped the other rank (its error is above)" in run.output
    for rank in (0, 1):
        assert "Traceback" in (out / "logs" / f"rank{rank}.log").read_text()
    assert run.session() == []


def test_a_rank_that_cannot_stop_in_time_is_killed_after_the_timeout(tmp_path):
    out = tmp_path / "out"
    run = Run(tmp_path, out, "train.steps=500", "train.stop_timeout_s=2")
    run.wait_for(lambda: len(run.steps()) >= 1)
    stuck = run.ranks()[1]
    stuck.suspend()  # SIGSTOP: it can neither finish its step nor answer the stop
    started = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    status = run.wait()
    seconds = time.monotonic() - started
    assert status == 128 + signal.SIGTERM, run.output
    assert "[mrl] rank 0: not stopped 2 s after SIGTERM (train.stop_timeout_s); exiting without a checkpoint" in run.output
    assert ("mrl train: error: the ranks did not stop within 2 s of SIGTERM and were killed; "
            "the current step was not saved") in run.output
    assert seconds < 2 + 15 + 10  # the timeout, the spawner's margin, and slack for a loaded machine
    assert run.session() == []
