"""Process trees: signal or kill a process and its descendants, name how a process ended.

A rank starts helper processes of its own (Megatron-Core's checkpoint writer, multiprocessing's
resource tracker). When a rank dies, those helpers are re-parented and would outlive the job; the
local spawner therefore makes itself a child subreaper (Linux), so that they are re-parented to it
and ``kill_descendants`` finds them. Imports nothing from mrl.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=5)
    return [p.pid for p in family]


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
