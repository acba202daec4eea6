"""ProcessGuard: helpers of a process that is SIGKILLed are killed, with their descendants, and their
files removed; a released guard touches nothing. Real processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    import psutil
    from mrl.processes import ProcessGuard

    helper = subprocess.Popen(["bash", "-c", "sleep 600 & wait"])  # a helper with a child of its own
    while not psutil.Process(helper.pid).children():
        time.sleep(0.01)
    scratch = Path(sys.argv[1]); scratch.mkdir(); (scratch / "buffer").write_bytes(b"x" * 1024)
    guard = ProcessGuard([helper.pid], [scratch])
    print(helper.pid, guard.watcher.pid, flush=True)
    if sys.argv[2] == "release":
        helper.kill(); helper.wait()
        guard.release()
        print("released", flush=True)
    time.sleep(600)
""")


def start_owner(tmp_path: Path, mode: str):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "scratch"), mode], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    helper, watcher = map(int, owner.stdout.readline().split())
    return owner, helper, watcher


def gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_a_sigkilled_owner_takes_its_guarded_helpers_and_their_files_with_it(tmp_path):
    owner, helper, watcher = start_owner(tmp_path, "kill")
    family = [helper] + [p.pid for p in psutil.Process(helper).children(recursive=True)]
    assert len(family) == 2  # bash and its sleep
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert gone(family + [watcher]), "the helper, its child or the watcher outlived the owner"
        assert not (tmp_path / "scratch").exists()
    finally:
        for pid in family + [watcher]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_released_guard_exits_and_touches_nothing(tmp_path):
    owner, helper, watcher = start_owner(tmp_path, "release")
    try:
        assert owner.stdout.readline().strip() == "released"
        assert gone([watcher], timeout=10)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        time.sleep(0.5)
        assert (tmp_path / "scratch" / "buffer").stat().st_size == 1024
    finally:
        if owner.poll() is None:
            owner.kill()
