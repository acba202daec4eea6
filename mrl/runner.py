"""Run a job on this rank, and start local ranks when no launcher did.

``run_job`` is what every rank executes (under torchrun, the SLURM launcher, or the local
spawner below): initialise torch.distributed from the environment, validate the config against
the world size, build the layout and the trainer for the algorithm, train, tear down.

``spawn_local`` starts the ranks itself (as ``torchrun --standalone`` would) so that
``mrl train <cpu recipe>`` is one command.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from mrl.algorithms import get_algorithm
from mrl.job import JobConfig

LAUNCHER_VARS = ("RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """True when a launcher (torchrun, srun) has set the rank environment."""
    return all(name in os.environ for name in LAUNCHER_VARS)


def build_trainer(cfg: JobConfig, layout):
    """The trainer of ``cfg.algorithm`` (``mrl.algorithms``), built on ``layout``."""
    return get_algorithm(cfg.algorithm).trainer_class()(cfg, layout)


def run_rank(cfg: JobConfig, *, lock_held: bool = False) -> int:
    """``run_job`` with its outcome as an exit status: a stop signal outside the loop and any error
    are reported once (``mrl.rank_errors``) instead of as a traceback from every rank."""
    from mrl import rank_errors
    from mrl.run_lock import RunLocked
    from mrl.train.stop import Interrupted, StopSignals

    rank = int(os.environ.get("RANK", "0"))
    stop = StopSignals(cfg.train.stop_timeout_s)
    stop.install()
    try:
        run_job(cfg, stop, lock_held=lock_held)
    except RunLocked as exc:  # raised on every rank; said once, and not into the other run's logs
        if rank == 0:
            print(f"mrl train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as exc:
        if rank == 0:
            print(f"[mrl] {exc} outside a step boundary (set-up, warm-up, or train.stop_timeout_s=0): the "
                  "current step was not saved; a rerun resumes from the latest complete checkpoint, if any", flush=True)
        return 128 + (stop.received or signal.SIGTERM)
    except BaseException as exc:  # noqa: BLE001 - reported, then the exit status says it failed
        rank_errors.report(exc, rank, Path(cfg.log.output_dir) / "logs")
        return 1
    finally:
        stop.restore()
    return 0


def run_job(cfg: JobConfig, stop=None, *, lock_held: bool = False) -> None:
    """Train ``cfg`` on this rank; torch.distributed comes from the launcher's environment.

    ``stop`` (a ``StopSignals``) lets a signal end the run after a step, with a checkpoint.
    ``lock_held``: the caller holds the output directory's lock (else rank 0 takes it)."""
    import torch
    import torch.distributed as dist

    from mrl.parallel.layout import ParallelLayout, init_distributed

    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        from mrl.parallel.cpu import enable_cpu_execution

        enable_cpu_execution()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        backend = "gloo"
    _quiet_library_warnings()
    init_distributed(backend, timedelta(minutes=cfg.parallel.timeout_minutes))
    cfg.validate(dist.get_world_size())
    lock, complete = _open_run_dir(cfg, take_lock=not lock_held)
    if complete:
        if dist.get_rank() == 0:
            print(f"[mrl] {complete}", flush=True)
        if lock is not None:
            lock.release()
        dist.destroy_process_group()
        return
    try:
        layout = ParallelLayout.initialize(cfg.parallel)
        try:
            layout.seed(cfg.seed)
            trainer = build_trainer(cfg, layout)
            if stop is not None:
                trainer.stop_signals = stop
            trainer.train()
        finally:
            layout.destroy()
            dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()


def _open_run_dir(cfg: JobConfig, *, take_lock: bool):
    """On rank 0: take the output directory's lock (unless the caller holds it), compare the recipe
    with the run already there, then record the changes and write config.yaml. Every rank raises
    the error rank 0 met. Returns (the lock rank 0 holds or None, a message when the run is complete)."""
    import torch.distributed as dist

    from mrl.resume_guard import inspect_rerun, write_run_config
    from mrl.run_lock import RunLock, RunLocked

    lock, outcome = None, [None]
    if dist.get_rank() == 0:
        try:
            if take_lock:
                lock = RunLock(cfg.log.output_dir)
                warning = lock.acquire()
                if warning:
                    print(f"[mrl] warning: {warning}", file=sys.stderr, flush=True)
            rerun = inspect_rerun(cfg)
            if rerun.complete(cfg):
                outcome = [("complete", complete_message(cfg, rerun.step))]
            else:
                for line in rerun.notes():
                    print(f"[mrl] {line}", flush=True)
                write_run_config(cfg, rerun)
        except (RunLocked, ValueError, OSError) as exc:
            outcome = [(type(exc).__name__, str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    kind, message = outcome[0] or (None, None)
    if kind not in (None, "complete"):
        if lock is not None:
            lock.release()
        raise RunLocked(message) if kind == "RunLocked" else ValueError(message)
    return lock, message


def complete_message(cfg: JobConfig, step: int) -> str:
    return (f"{cfg.log.output_dir} is already complete: its latest checkpoint is step {step} "
            f"(train.steps={cfg.train.steps}); nothing to train. Raise train.steps to train further.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg: JobConfig) -> None:
    """A rank started by ``spawn_local``, which holds the output directory's lock."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mrl.processes import die_with_parent

    die_with_parent(signal.SIGTERM)  # `kill -9` of mrl train: the ranks still stop (and save)
    _quiet_library_warnings()
    raise SystemExit(run_rank(cfg, lock_held=True))


def _quiet_library_warnings() -> None:
    """Silence the warnings Megatron-Core's internals trigger on every step (not actionable here)."""
    import warnings

    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*")


def spawn_local(cfg: JobConfig, world_size: int) -> int:
    """Run ``cfg`` on ``world_size`` local ranks; returns the exit status (0 when all succeeded)."""
    if cfg.device == "cuda":
        import torch

        if torch.cuda.device_count() < world_size:
            raise ValueError(
                f"the recipe needs {world_size} ranks but this machine has {torch.cuda.device_count()} "
                "visible GPUs; launch multi-node runs with launch/mrl.sbatch or torchrun"
            )
    from mrl.resume_guard import inspect_rerun
    from mrl.run_lock import RunLock
    from mrl.supervisor import run_local_ranks

    lock = RunLock(cfg.log.output_dir)
    warning = lock.acquire()
    if warning:
        print(f"[mrl] warning: {warning}", file=sys.stderr, flush=True)
    try:
        rerun = inspect_rerun(cfg)  # refused resumes stop here, before any rank starts
        if rerun.complete(cfg):
            print(f"[mrl] {complete_message(cfg, rerun.step)}", flush=True)
            return 0
        port = free_port()
        os.environ["MRL_RUN_ID"] = f"local-{os.getpid()}-{int(time.time())}"
        return run_local_ranks(_rank_main, lambda rank: (rank, world_size, port, cfg), world_size,
                               stop_timeout_s=cfg.train.stop_timeout_s, log_dir=Path(cfg.log.output_dir) / "logs")
    finally:
        lock.release()
