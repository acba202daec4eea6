"""One run per output directory: ``<output_dir>/run.lock`` names the run that holds it.

The lock file is created with an exclusive create and holds the holder's host, process id, the
process's start time and its SLURM job id. A second run is refused with the holder named. A lock
whose holder is gone is taken over with a warning: on the same host, a holder whose process id is
not running (or runs another program since, told by its start time); on any host, a holder from
this same SLURM job (a requeued job restarts with the lock its first attempt left behind).
A holder on another host is never presumed dead. Imports nothing from mrl.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil

LOCK_NAME = "run.lock"


class RunLocked(ValueError):
    """The output directory belongs to a running job."""


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    """``acquire`` before writing anything to the directory; ``release`` when the run ends."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.pid = os.getpid()
        self.held = False

    def _identity(self) -> dict:
        started = _process_start(self.pid) or time.time()
        return {"host": socket.gethostname(), "pid": self.pid, "process_start": started,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def holder(self) -> dict | None:
        """The lock file's holder, or None when there is no lock."""
        for _ in range(20):  # a lock being written is empty for a moment
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                time.sleep(0.05)
        return {}

    def is_stale(self, holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        started = _process_start(holder["pid"])
        return started is None or abs(started - float(holder.get("process_start") or 0)) > 1.0

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a stale lock was taken over. Raises ``RunLocked``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if not holder or not self.is_stale(holder):
                    raise RunLocked(
                        f"{self.path.parent} is in use by another mrl run ({_describe(holder or {})}); wait "
                        f"for it to end or choose another log.output_dir (the lock is {self.path}: delete it "
                        "only if that run is gone)"
                    )
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.pid}")
                try:
                    os.replace(self.path, stale)  # one taker wins; the others find the new lock
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                warning = f"took over the lock of a run that is gone ({_describe(holder)})"
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self._identity(), handle)
            self.held = True
            return warning
        raise RunLocked(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if not self.held:
            return
        holder = self.holder()
        if holder and holder.get("pid") == self.pid and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
