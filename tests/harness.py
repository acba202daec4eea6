"""Multi-rank test harness: one spawned gloo process group, many test cases.

Starting ranks costs ~3-4 s of imports each (torch + megatron), so a ``RankPool`` spawns its
``world_size`` processes once, keeps a gloo default group alive, and runs test cases in it one
after another. A case is a module-level function; every rank calls it with the same arguments and
the per-rank return values come back to pytest. Cases build and tear down their own parallel
layout; the worker destroys any layout a failed case left behind.

Failure handling: a rank's exception comes back with its traceback (and the tail of that rank's
log); a case that runs past its timeout kills the pool (the next case spawns a fresh one) and fails
naming the ranks that did not answer. Nothing hangs.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from multiprocessing import get_context
from pathlib import Path

DEFAULT_TIMEOUT_S = 240.0
# A rank whose thread count passes this after a case is replaced before the next one. Destroyed
# process groups that stay referenced keep three gloo threads each, and some Megatron objects are
# never freed (MoE models under Megatron's DDP stay alive through their gradient hooks: ~16 groups,
# 48 threads per trainer case); the threads poll even while the rank idles (a rank holding ~110
# took 16% of a core between cases), so hundreds of them slow every later test to a crawl.
MAX_RANK_THREADS = 60
# After one rank fails, how long the others get to finish before the pool is declared broken.
FAILURE_GRACE_S = 20.0


class CaseFailed(AssertionError):
    """A case raised on at least one rank, or timed out."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (orphans would otherwise outlive the tests)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _worker(rank: int, world_size: int, port: int, log_dir: str, tasks, results) -> None:
    log = open(Path(log_dir) / f"rank{rank}.log", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        PYTHONWARNINGS="ignore",
    )
    import warnings

    warnings.simplefilter("ignore")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
    from mrl.parallel.cpu import enable_cpu_execution

    enable_cpu_execution()
    results.put(pickle.dumps(("ready", rank, None, 0)))
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # pytest died without closing the pool: do not linger
                break
            continue
        if task is None:
            break
        case_id, fn, args, kwargs = pickle.loads(task)
        print(f"--- case {case_id}: {fn.__module__}.{fn.__qualname__} ({_thread_count()} threads)", flush=True)
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            outcome = ("error", traceback.format_exc())
        finally:
            _reset_parallel_state()
        try:
            payload = pickle.dumps((case_id, rank, outcome, _thread_count()))
        except Exception:  # noqa: BLE001
            payload = pickle.dumps((case_id, rank, ("error", "unpicklable result:\n" + traceback.format_exc()), 0))
        results.put(payload)
    dist.destroy_process_group()


def _thread_count() -> int:
    """Threads of this process (0 where /proc is missing)."""
    try:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))
    except OSError:
        return 0


def _reset_parallel_state() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        from mrl.parallel.layout import destroy_parallel_state

        destroy_parallel_state()
    # Groups a case created outside Megatron's parallel state (its optimizer, checkpointing, ...):
    # left alive, each keeps gloo threads polling, and hundreds of cases slow the pool to a crawl.
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()  # a destroyed group's threads end when the last reference to it goes


class RankPool:
    """``world_size`` gloo ranks kept alive to run many cases."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []
        self._case = 0
        self._threads: dict[int, int] = {}  # rank -> its thread count after the last case
        self.log_dir = tempfile.mkdtemp(prefix=f"mrl-ranks{world_size}-")

    # Lifecycle ----------------------------------------------------------------------------------

    def _start(self) -> None:
        ctx = get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, self.world_size, port, self.log_dir, self._tasks[rank], self._results),
                # Not daemonic: Megatron's checkpoint writer starts helper processes of its own.
                daemon=False,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        atexit.register(self.close)
        ready = self._collect(lambda msg: msg[0] == "ready", DEFAULT_TIMEOUT_S, "start-up")
        if len(ready) != self.world_size:
            self.close()
            raise CaseFailed(f"{self.world_size} ranks did not start:\n{self._log_tails()}")

    def close(self) -> None:
        """Stop the ranks: ask them to exit (so their own helper processes, e.g. the manager of
        Megatron's checkpoint writer, are shut down too), then kill what is left, descendants first."""
        started = [proc for proc in self._procs if proc.pid is not None]
        for proc, rank_queue in zip(started, getattr(self, "_tasks", [])):
            if proc.is_alive():
                rank_queue.put(None)
        deadline = time.monotonic() + 10
        for proc in started:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                kill_tree(proc.pid)
            proc.join(timeout=5)
        self._procs = []
        self._threads = {}

    def _alive(self) -> bool:
        return bool(self._procs) and all(proc.is_alive() for proc in self._procs)

    # Running cases ------------------------------------------------------------------------------

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results, rank order."""
        if not self._alive():
            self.close()
            self._start()
        self._case += 1
        case_id = self._case
        task = pickle.dumps((case_id, fn, args, kwargs))
        for rank_queue in self._tasks:
            rank_queue.put(task)
        outcomes = self._collect(lambda msg: msg[0] == case_id, timeout, fn.__qualname__)
        errors = {rank: out[1] for rank, out in outcomes.items() if out[0] == "error"}
        missing = sorted(set(range(self.world_size)) - set(outcomes))
        if missing or max(self._threads.values(), default=0) > MAX_RANK_THREADS:
            self.close()
        if errors or missing:
            raise CaseFailed(self._report(fn, errors, missing, timeout))
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def _collect(self, belongs, timeout: float, what: str) -> dict:
        """Gather one message per rank until all answered, the timeout, or a failure's grace ends."""
        deadline = time.monotonic() + timeout
        got: dict[int, tuple] = {}
        while len(got) < self.world_size:
            now = time.monotonic()
            if now >= deadline or not all(p.is_alive() for p in self._procs):
                break
            try:
                msg = pickle.loads(self._results.get(timeout=min(1.0, deadline - now)))
            except queue.Empty:
                continue
            if not belongs(msg):
                continue
            got[msg[1]] = msg[2]
            self._threads[msg[1]] = msg[3]
            if msg[2] and msg[2][0] == "error":
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        return got

    def _report(self, fn, errors: dict, missing: list, timeout: float) -> str:
        lines = [f"case {fn.__module__}.{fn.__qualname__} failed on {self.world_size} ranks"]
        for rank, tb in sorted(errors.items()):
            lines.append(f"--- rank {rank} raised:\n{tb}")
        if missing:
            lines.append(f"--- ranks {missing} gave no answer within {timeout:.0f} s (pool killed)")
            lines.append(self._log_tails())
        return "\n".join(lines)

    def _log_tails(self, n: int = 30) -> str:
        tails = []
        for rank in range(self.world_size):
            path = Path(self.log_dir) / f"rank{rank}.log"
            text = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []
            tails.append(f"--- rank {rank} log tail:\n" + "\n".join(text))
        return "\n".join(tails)
