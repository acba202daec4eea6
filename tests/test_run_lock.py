"""The output-directory lock with real holder processes: refused while alive, taken over once gone."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from mrl.run_lock import LOCK_NAME, RunLock, RunLocked

HOLD = "import sys, time; from mrl.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


@pytest.fixture()
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(RunLocked) as error:
        RunLock(tmp_path).acquire()
    message = str(error.value)
    assert f"{tmp_path} is in use by another mrl run (pid {holder.pid} on host {socket.gethostname()}, started " in message
    assert f"the lock is {tmp_path / LOCK_NAME}" in message


def test_the_lock_of_a_dead_holder_is_taken_over_with_a_warning(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path)
    warning = lock.acquire()
    assert warning.startswith(f"took over the lock of a run that is gone (pid {holder.pid} on host ")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == lock.pid
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert RunLock(tmp_path).acquire() is None  # a released lock is simply taken


def test_a_holder_on_another_host_counts_as_alive_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "process_start": 0,
                                                  "started": "2026-01-01T00:00:00Z", "slurm_job_id": "77"}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunLocked, match="pid 1 on host node-elsewhere, SLURM job 77"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: its first attempt is gone
    assert "SLURM job 77" in RunLock(tmp_path).acquire()


def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_stops_with_one_message(tmp_path, holder):
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TORCHELASTIC"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "mrl", "train", "configs/sft-tiny-cpu.yaml", "parallel.tp=1", "parallel.pp=1",
                           f"log.output_dir={tmp_path}"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    message = f"mrl train: error: {tmp_path} is in use by another mrl run (pid {holder.pid} on host "
    assert proc.stderr.count(message) == 1, proc.stderr
    assert not (tmp_path / "config.yaml").exists()
