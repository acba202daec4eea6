"""The local ranks of ``mrl train``: start them, pass signals on, stop them all when one fails.

What the user sees and what is left behind, case by case:

- SIGTERM or SIGINT to ``mrl train``: the ranks get SIGTERM, finish the current step, save a
  checkpoint and exit; a second signal (a second Ctrl-C) kills them at once. Ranks still running
  ``stop_timeout_s`` (plus a short margin) after the first signal are killed. Exit status 128 +
  the signal number.
- A rank dies or fails: the message names it and how it ended (its exit status or the signal that
  killed it). The other ranks get a few seconds to notice (their collectives fail) and are then
  killed. A rank's own error is printed once, by that rank (``mrl.rank_errors``).
- In every case no process of the job is left: this process is made a child subreaper, so the
  helper processes of a rank that died (checkpoint writers, resource trackers) are re-parented to
  it and killed at the end.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing import get_context
from pathlib import Path

from mrl.processes import become_subreaper, describe_exit, kill_descendants, signal_tree
from mrl.rank_errors import first_error

PARENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_MARGIN_S = 15.0  # beyond the ranks' own timeout: their watchdog exits first
FAILURE_GRACE_S = 5.0  # after a rank failed, how long the others get to exit on their own
POLL_S = 0.2


def run_local_ranks(target, args_of_rank, world_size: int, *, stop_timeout_s: float, log_dir: Path) -> int:
    """Run ``target(*args_of_rank(rank))`` on ``world_size`` spawned processes; the exit status."""
    become_subreaper()
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in PARENT_SIGNALS}
    ctx = get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(rank)) for rank in range(world_size)]
    try:
        for proc in procs:
            if received:
                break
            proc.start()
        return _Watch(procs, received, stop_timeout_s, log_dir).run()
    finally:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                signal_tree(proc.pid, signal.SIGKILL)
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=10)
        kill_descendants(spare=_own_helpers())
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _own_helpers() -> tuple[int, ...]:
    """This process's multiprocessing resource tracker (it exits with us; killing it makes noise)."""
    try:
        from multiprocessing import resource_tracker

        pid = resource_tracker._resource_tracker._pid  # noqa: SLF001 - no public accessor
        return (pid,) if pid else ()
    except AttributeError:
        return ()


class _Watch:
    """The polling loop of ``run_local_ranks``."""

    def __init__(self, procs: list, received: list[int], stop_timeout_s: float, log_dir: Path) -> None:
        self.procs = procs
        self.received = received
        self.handled = 0
        self.stop_timeout_s = stop_timeout_s
        self.log_dir = log_dir
        self.stop_signal: int | None = None
        self.failed: tuple[int, object] | None = None  # (rank, process)
        self.deadline: float | None = None
        self.killed_at_deadline = False

    def run(self) -> int:
        while any(proc.pid is not None and proc.exitcode is None for proc in self.procs):
            self._on_signals()
            if self.stop_signal is None and self.failed is None:
                self._on_failure()
            if self.deadline is not None and time.monotonic() > self.deadline and not self.killed_at_deadline:
                self.killed_at_deadline = True
                self._kill_all()
            time.sleep(POLL_S)
        self._on_signals()
        if self.stop_signal is None and self.failed is None:
            self._on_failure()
        return self._verdict()

    def _alive(self) -> list:
        return [proc for proc in self.procs if proc.pid is not None and proc.exitcode is None]

    def _kill_all(self) -> None:
        for proc in self._alive():
            signal_tree(proc.pid, signal.SIGKILL)

    def _on_signals(self) -> None:
        if len(self.received) == self.handled:
            return
        self.handled = len(self.received)
        if self.stop_signal is None:
            self.stop_signal = self.received[0]
            name = signal.Signals(self.stop_signal).name
            for proc in self._alive():
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.deadline = time.monotonic() + self.stop_timeout_s + STOP_MARGIN_S
            _say(f"{name}: the ranks finish their step and save a checkpoint (at most {self.stop_timeout_s} s, "
                 "train.stop_timeout_s); send the signal again to stop them at once")
            if self.stop_timeout_s == 0:
                self.deadline = time.monotonic() + STOP_MARGIN_S
        else:
            _say("stopping the ranks now, without a checkpoint")
            self._kill_all()

    def _on_failure(self) -> None:
        failed = [(rank, proc) for rank, proc in enumerate(self.procs) if proc.exitcode not in (None, 0)]
        if not failed:
            return
        # A rank killed by a signal is the cause; the others only lost their peer.
        self.failed = min(failed, key=lambda item: (item[1].exitcode >= 0, item[0]))
        self.deadline = time.monotonic() + FAILURE_GRACE_S

    def _verdict(self) -> int:
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            if self.killed_at_deadline:
                _error(f"the ranks did not stop within {self.stop_timeout_s} s of {name} and were killed; "
                       "the current step was not saved")
            latest = self.log_dir.parent / "checkpoints" / "latest"
            saved = latest.read_text().strip() if latest.is_file() else None
            _say(f"stopped by {name}; " + (f"the latest checkpoint is {latest.parent / saved}, which a rerun resumes from"
                                          if saved else "no checkpoint was written yet"))
            return 128 + self.stop_signal
        if self.failed is None:
            return 0
        rank, proc = self.failed
        others = len(self.procs) - 1
        printed = first_error(self.log_dir)
        if printed and proc.exitcode > 0:
            # The rank printed its own error; name the rank it came from.
            match = printed.split(":", 1)[0].rsplit(" ", 1)[-1]
            rank = int(match) if match.isdigit() else rank
            proc = self.procs[rank]
        where = ""
        if printed and proc.exitcode > 0:
            where = " (its error is above)"
        elif any(self.log_dir.glob("rank*.log")):
            where = f" (tracebacks: {self.log_dir}/rank*.log)"
        _error(f"rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}; "
               + ("stopped the other rank" if others == 1 else f"stopped the other {others} ranks") + where)
        return proc.exitcode if proc.exitcode > 0 else 128 - proc.exitcode


def _say(message: str) -> None:
    print(f"[mrl] {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(f"mrl train: error: {message}", file=sys.stderr, flush=True)
