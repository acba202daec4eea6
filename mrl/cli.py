"""The ``mrl`` command: train, validate and show-config for a YAML recipe.

    mrl train CONFIG [key=value ...]        train (starts local ranks itself outside a launcher)
    mrl validate CONFIG [key=value ...]     every check, no training; exit status 0 or 1
    mrl show-config CONFIG [key=value ...]  the resolved recipe as YAML
    mrl export-hf CHECKPOINT OUT_DIR        a checkpoint as a Hugging Face model directory
    mrl plot RUN [RUN ...] [--out FILE.png] learning curves of runs, overlaid
"""

from __future__ import annotations

import argparse
import os
import sys


def _load(args):
    from mrl.config import load_config
    from mrl.job import JobConfig

    return load_config(args.config, JobConfig, args.overrides)


def _world_size(cfg) -> int:
    from mrl.runner import under_launcher

    return int(os.environ["WORLD_SIZE"]) if under_launcher() else cfg.default_world_size()


def cmd_train(args) -> int:
    from mrl.runner import run_rank, spawn_local, under_launcher

    cfg = _load(args)
    cfg.validate(_world_size(cfg))
    if under_launcher():
        return run_rank(cfg)
    from mrl.preflight import preflight

    preflight(cfg)  # data files and optional packages, before any rank starts
    return spawn_local(cfg, cfg.default_world_size())


def cmd_validate(args) -> int:
    from mrl.preflight import preflight

    cfg = _load(args)
    world = _world_size(cfg)
    cfg.validate(world)
    preflight(cfg)
    dp = cfg.parallel.data_parallel_size(world)
    print(f"{args.config}: OK ({cfg.algorithm}, {world} ranks: tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
          f"cp={cfg.parallel.cp} dp={dp}, {cfg.train.num_microbatches(dp)} micro-batches per rank)")
    print(f"on SIGTERM, SIGINT or SIGUSR1: finish the step and save a checkpoint within "
          f"train.stop_timeout_s={cfg.train.stop_timeout_s} s")
    _print_rerun(cfg)
    if cfg.algorithm == "grpo":
        rows, per_row = cfg.rollout_wave_rows(dp)
        print(f"rollout KV cache: {rows} rows per wave x {per_row / 2**20:.3g} MiB per row = "
              f"{rows * per_row / 2**30:.3g} GiB per rank (budget rollout.kv_cache_gib={cfg.rollout.kv_cache_gib:g})")
    return 0


def _print_rerun(cfg) -> None:
    """What `mrl train` would find in the output directory (raises for a refused resume)."""
    from mrl.resume_guard import inspect_rerun
    from mrl.runner import complete_message

    rerun = inspect_rerun(cfg)
    if rerun.complete(cfg):
        print(complete_message(cfg, rerun.step))
    for line in rerun.notes():
        print(line)


def cmd_show_config(args) -> int:
    from mrl.config import dump_yaml

    sys.stdout.write(dump_yaml(_load(args)))
    return 0


def cmd_export_hf(args) -> int:
    from mrl.export import export_hf
    from mrl.train.checkpoint import CheckpointError

    try:
        out = export_hf(args.checkpoint, args.out_dir, config=args.config, dtype=args.dtype,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
    except CheckpointError as exc:
        print(f"mrl export-hf: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def cmd_plot(args) -> int:
    from pathlib import Path

    from mrl.plot import plot_runs

    out = args.out or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 and Path(args.runs[0]).is_dir()
                       else Path("curves.png"))
    panels = plot_runs(args.runs, out)
    print(f"wrote {out} ({', '.join(panels)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrl", description="Megatron-Core RL post-training.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("train", cmd_train, "train a recipe (resumes from its latest checkpoint)"),
        ("validate", cmd_validate, "check a recipe without training"),
        ("show-config", cmd_show_config, "print the resolved recipe"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("config", help="YAML recipe")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 parallel.tp=2")
        sub.set_defaults(func=func)
    export = commands.add_parser("export-hf", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument("checkpoint", help="a checkpoint step directory, or a run directory (its latest)")
    export.add_argument("out_dir", help="new directory for config.json and the safetensors files")
    export.add_argument("--config", help="the run's recipe (default: <run>/config.yaml beside the checkpoints)")
    export.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="tensor dtype (bf16)")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (5 GB)")
    export.set_defaults(func=cmd_export_hf)
    plot = commands.add_parser("plot", help="draw runs' learning curves from their metrics.jsonl (needs matplotlib)")
    plot.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files), overlaid")
    plot.add_argument("--out", help="PNG file (default: <run>/curves.png for one run, curves.png for several)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # ConfigError and every config/validation error
        print(f"mrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"mrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before any rank started (they handle their own)
        print(f"mrl {args.command}: interrupted", file=sys.stderr)
        return 130
