"""Run a job on this rank, and start local ranks when no launcher did.

``run_job`` is what every rank executes (under torchrun, the SLURM launcher, or the local
spawner below): initialise torch.distributed from the environment, validate the config against
the world size, build the layout and the trainer for the algorithm, train, tear down.

``spawn_local`` starts the ranks itself (as ``torchrun --standalone`` would) so that
``mrl train <cpu recipe>`` is one command.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path

from mrl.config.job import JobConfig

LAUNCHER_VARS = ("RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """True when a launcher (torchrun, srun) has set the rank environment."""
    return all(name in os.environ for name in LAUNCHER_VARS)


def build_trainer(cfg: JobConfig, layout):
    if cfg.algorithm == "grpo":
        from mrl.rl.grpo import GRPOTrainer

        return GRPOTrainer(cfg, layout)
    from mrl.train.trainer import Trainer

    return Trainer(cfg, layout)


def run_job(cfg: JobConfig) -> None:
    """Train ``cfg`` on this rank; torch.distributed comes from the launcher's environment."""
    import torch
    import torch.distributed as dist

    from mrl.config import dump_yaml
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
    if dist.get_rank() == 0:
        Path(cfg.log.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.log.output_dir) / "config.yaml").write_text(dump_yaml(cfg))
    layout = ParallelLayout.initialize(cfg.parallel)
    try:
        layout.seed(cfg.seed)
        build_trainer(cfg, layout).train()
    finally:
        layout.destroy()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg: JobConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _quiet_library_warnings()
    try:
        run_job(cfg)
    except BaseException:
        sys.stderr.write(f"[rank {rank}] " + traceback.format_exc())
        sys.stderr.flush()
        raise SystemExit(1)


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
    ctx = get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, cfg)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    status = 0
    try:
        pending = list(procs)
        while pending:
            for proc in list(pending):
                proc.join(timeout=0.5)
                if proc.exitcode is None:
                    continue
                pending.remove(proc)
                if proc.exitcode != 0 and status == 0:
                    status = proc.exitcode or 1
                    for other in pending:  # one rank failed: the others would wait forever
                        _terminate_tree(other.pid)
    except KeyboardInterrupt:
        for proc in procs:
            _terminate_tree(proc.pid)
        status = 130
    for proc in procs:
        proc.join()
    return status


def _terminate_tree(pid: int) -> None:
    """SIGTERM a rank and its descendants (helper processes such as Megatron's checkpoint-writer
    manager would otherwise be orphaned, as SIGTERM skips the rank's exit handlers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
