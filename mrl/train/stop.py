"""Stopping a run on a signal: finish the current step, save a checkpoint, exit, all in bounded time.

SLURM sends SIGTERM at the time limit and on preemption (and, with ``--signal``, an early warning
such as SIGUSR1); a terminal sends SIGINT on Ctrl-C; a launcher forwards SIGTERM to its ranks.
``StopSignals`` turns any of them into a request that the training loop sees between two steps:

    stop.install()                      # first thing on the rank
    with stop.at_step_boundaries():     # the loop: a signal only sets a flag here
        ...step...
        if stop.agreed(device):         # one all-reduce: a signal on any rank stops every rank
            save; break

Outside ``at_step_boundaries`` (set-up, SFT warm-up) a signal raises ``Interrupted`` at once:
there is no step to finish there and nothing worth saving. The first signal also starts a
watchdog: a rank still running ``timeout_s`` later kills its helper processes and exits, so a
stuck collective or a slow save never outlives the time the scheduler grants. Further signals
(SLURM and the launcher often both send one) change nothing.

The watchdog must start even while the main thread waits inside a collective, where Python's
own signal handler does not run until the wait returns: the signal also reaches a helper thread
through ``signal.set_wakeup_fd``, and that thread arms it (plus ``SIGALRM`` a few seconds later,
which ends the process in the kernel should no Python thread get to run at all).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
WATCHDOG_EXIT_STATUS = 124
ALARM_MARGIN_S = 5


class Interrupted(Exception):
    """A stop signal arrived outside the training loop's step boundaries; nothing was saved."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Catches the stop signals on one rank; see the module docstring."""

    def __init__(self, timeout_s: float, *, enabled: bool = True) -> None:
        self.timeout_s = timeout_s
        self.enabled = enabled
        self.received: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self._lock = threading.Lock()
        self._wakeup: tuple[int, int] | None = None
        self._interrupting = False

    @classmethod
    def disabled(cls) -> "StopSignals":
        """No handlers, never stops (a trainer built outside ``run_job``, e.g. in tests)."""
        return cls(0, enabled=False)

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = (read, write)
        threading.Thread(target=self._watch_wakeup, args=(read,), name="mrl-stop-signals", daemon=True).start()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])  # the watching thread then reads EOF and ends
            self._wakeup = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            signal.alarm(0)

    def _watch_wakeup(self, read: int) -> None:
        """Arm the watchdog as soon as a stop signal arrives, whatever the main thread does."""
        try:
            while data := os.read(read, 64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self._arm(signum)
        finally:
            os.close(read)

    def _arm(self, signum: int) -> bool:
        """Record the first stop signal and start the watchdog; False for a repeated signal."""
        with self._lock:
            if self.received is not None:
                return False
            self.received = signum
            self._watchdog = threading.Timer(self.timeout_s, self._give_up)
            self._watchdog.daemon = True
            self._watchdog.start()
            signal.alarm(int(self.timeout_s) + ALARM_MARGIN_S)
            return True

    def _handle(self, signum: int, frame) -> None:
        first = self._arm(signum)
        if self._interrupting or not (first or self.received == signum):
            return
        if not self._deferred or self.timeout_s == 0:
            self._interrupting = True
            raise Interrupted(signal_name(signum))

    def _give_up(self) -> None:
        from mrl.processes import kill_descendants

        sys.stderr.write(f"[mrl] rank {os.environ.get('RANK', '?')}: not stopped {self.timeout_s:g} s after "
                         f"{signal_name(self.received or 0)} (train.stop_timeout_s); exiting without a checkpoint\n")
        sys.stderr.flush()
        kill_descendants()
        os._exit(WATCHDOG_EXIT_STATUS)

    @contextmanager
    def at_step_boundaries(self):
        """Inside: a signal only sets the flag that ``agreed`` reads."""
        if self.received is not None and self.enabled:
            raise Interrupted(signal_name(self.received))
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False

    def agreed(self, device) -> int:
        """The signal any rank received (0: none); a collective over every rank of the job."""
        if not self.enabled:
            return 0
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
