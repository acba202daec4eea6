"""Process trees: signal or kill a process and its descendants, name how a process ended.

A rank starts helper processes of its own (Megatron-Core's checkpoint writer, multiprocessing's
resource tracker). When a rank dies, those helpers are re-parented and would outlive the job; the
local spawner therefore makes itself a child subreaper (Linux), so that they are re-parented to it
and ``kill_descendants`` finds them. A rank's own long-lived helpers that live outside that tree's
reach (a rollout engine, started by a rank that a launcher may SIGKILL) are watched by a
``ProcessGuard``: a small process that kills them, and removes their files, when the rank dies.
Imports nothing from mrl.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it (Linux); True when that holds."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux)."""
    return _prctl(PR_SET_PDEATHSIG, int(signum))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` and all its descendants, descendants first."""
    try:
        family = descendants(pid) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        family = descendants(pid)
    for process in family:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def kill_descendants(pid: int | None = None, *, spare: tuple[int, ...] = ()) -> list[int]:
    """SIGKILL every descendant of ``pid`` (default: this process) except ``spare``; reap them.

    Returns the killed process ids."""
    family = [p for p in descendants(os.getpid() if pid is None else pid) if p.pid not in spare]
    kill_all(family, wait_s=5)
    return [p.pid for p in family]


def kill_all(processes: list[psutil.Process], wait_s: float) -> None:
    """SIGKILL ``processes`` and reap them (waiting at most ``wait_s``)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=wait_s)


def describe_exit(exitcode: int | None) -> str:
    """'exited with status 1', 'was killed by SIGKILL' for a ``multiprocessing`` exit code."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class ProcessGuard:
    """Kills ``pids`` (each with its descendants) and removes ``paths`` when this process dies.

    A watcher process (``python -m mrl.processes``) reads what to guard from a pipe and then waits
    on it: the pipe closes when this process ends, however it ends (SIGKILL included). ``release``
    tells the watcher that this process cleaned up itself, and it exits without touching anything.
    A pid is killed only if it is still the process that was registered (same start time).
    """

    def __init__(self, pids, paths=()) -> None:
        guarded = []
        for pid in pids:
            try:
                guarded.append([pid, psutil.Process(pid).create_time()])
            except psutil.NoSuchProcess:
                pass
        self.watcher = subprocess.Popen([sys.executable, "-m", "mrl.processes"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.watcher.stdin.write((json.dumps({"pids": guarded, "paths": [str(p) for p in paths]}) + "\n").encode())
        self.watcher.stdin.flush()

    def release(self) -> None:
        """This process cleaned up what the guard watched: the watcher exits and does nothing."""
        if self.watcher.poll() is None:
            try:
                self.watcher.stdin.write(b"release\n")
                self.watcher.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
                self.watcher.wait()


def _watch(stream) -> None:
    """The watcher: wait until the owner releases the guard or dies; in the latter case clean up."""
    guarded = json.loads(stream.readline() or "{}")
    if stream.readline().strip() == "release":
        return
    family = []
    for pid, started in guarded.get("pids", []):
        try:
            root = psutil.Process(pid)
            if abs(root.create_time() - started) < 1e-3:
                family += descendants(pid) + [root]
        except psutil.NoSuchProcess:
            pass
    kill_all(family, wait_s=10)
    for path in map(Path, guarded.get("paths", [])):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the terminal is the owner's to handle
    _watch(sys.stdin)
