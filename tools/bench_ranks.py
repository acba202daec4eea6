"""Spawning a benchmark's ranks: fresh processes per variant, rank 0's result back, failures fast.

``run_ranks(target, world_size, *args, timeout=..., what=...)`` starts ``world_size`` spawned
processes running ``target(rank, port, results, *args)``; ``target`` sets up torch.distributed on
``127.0.0.1:port`` and rank 0 puts one ``("ok", ...)`` tuple on ``results``. A rank that raises
reports its traceback (``report_failure``), a rank that dies or a run past ``timeout`` raises
``RuntimeError`` at once; every process is gone when it returns.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report_failure(results, rank: int) -> None:
    """Call from an ``except`` block in a rank: send its traceback to the parent."""
    results.put(("error", rank, traceback.format_exc()))


def run_ranks(target, world_size: int, *args, timeout: float, what: str) -> tuple:
    """Rank 0's result (without its leading "ok") of ``target`` run on ``world_size`` fresh processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, results, *args)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    try:
        outcome = _wait(results, procs, timeout, what)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return outcome[1:]


def _wait(results, procs, timeout: float, what: str) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            outcome = results.get(timeout=1.0)
        except queue.Empty:
            dead = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{what}: rank {dead[0][0]} died (exit code {dead[0][1]})") from None
            continue
        if outcome[0] == "error":
            raise RuntimeError(f"{what}: rank {outcome[1]} failed:\n{outcome[2]}")
        return outcome
    raise RuntimeError(f"{what}: no result within {timeout:.0f} s")


def init_rank(rank: int, port: int, world_size: int, device: str, threads: int, *, cpu_execution: bool) -> None:
    """This rank's torch.distributed group (NCCL on ``cuda``, gloo otherwise) on 127.0.0.1:``port``;
    on CPU ``threads`` threads and, with ``cpu_execution``, Megatron-Core's CPU execution layer."""
    import os
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        if cpu_execution:
            from mrl.parallel.cpu import enable_cpu_execution

            enable_cpu_execution()
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)


def tp_degrees(tool: str, device: str, requested: list[int] | None) -> list[int] | None:
    """The TP degrees to run (default: 1 and 2 on CPU, 1 on CUDA), or None after printing why the
    device cannot run them (no CUDA GPU visible, fewer GPUs than the largest degree)."""
    import sys

    import torch

    degrees = requested or ([1, 2] if device == "cpu" else [1])
    if device != "cuda":
        return degrees
    if not torch.cuda.is_available():
        print(f"{tool}: --device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
        return None
    if max(degrees) > torch.cuda.device_count():
        print(f"{tool}: --tp {max(degrees)} needs that many GPUs; {torch.cuda.device_count()} visible",
              file=sys.stderr)
        return None
    return degrees


class PeakRss:
    """Growth of this process's peak resident set from now: Linux's ``VmHWM`` reset to the current
    ``VmRSS`` (``/proc/self/clear_refs``), so memory freed before the start (inputs built with
    temporaries) does not hide what the measured code allocates. Elsewhere ``ru_maxrss``'s growth."""

    def __init__(self) -> None:
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._proc = True
            self._start = self._status("VmRSS")
        except OSError:
            import resource

            self._proc = False
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    def extra(self) -> int:
        """Bytes by which the peak resident set rose above the start."""
        if self._proc:
            return self._status("VmHWM") - self._start
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start
