"""``mrl export-hf``: an mrl checkpoint -> a Hugging Face model directory (config.json + safetensors).

Runs in one process: the run's model is built at TP=PP=1, the distributed checkpoint is loaded
into it (Megatron-Core reshards whatever layout saved it), and the tensors are written under
their Hugging Face names (``mrl.model.hf``). It uses the GPU when one is visible, else the CPU;
either way it holds the whole model once in the run's parameter dtype. The directory is written
under a temporary name and renamed into place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from mrl.config import load_config
from mrl.job import JobConfig
from mrl.model.config import PrecisionConfig
from mrl.model.hf import hf_config, hf_state_dict, is_hf_model_dir, read_hf_config
from mrl.runner import free_port
from mrl.train.checkpoint import CheckpointError, resolve_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export_hf(source: str | os.PathLike, out_dir: str | os.PathLike, *, config: str | os.PathLike | None = None,
              dtype: str = "bf16", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the checkpoint ``source`` (a step directory, or a run directory) to ``out_dir``."""
    checkpoint = resolve_checkpoint(source)
    cfg = load_config(Path(config) if config else _run_config(checkpoint), JobConfig)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    meta = hf_config(cfg.model, dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    origin = _hf_origin(cfg)  # the Hugging Face directory the run started from, if any
    if origin is not None:  # keep its other settings (token ids, ...) under the model's own
        meta = {key: value for key, value in read_hf_config(origin).items() if key not in meta} | meta
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new output directory")
    tensors = _load_whole_model(cfg, checkpoint)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_safetensors(partial, {name: t.to(DTYPES[dtype]).cpu() for name, t in tensors.items()}, max_shard_bytes)
    (partial / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    for source in (cfg.data.tokenizer, origin):
        _copy_tokenizer(source, partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def _hf_origin(cfg: JobConfig) -> Path | None:
    start = cfg.train.init_checkpoint
    return Path(start) if start and is_hf_model_dir(start) else None


def _run_config(checkpoint: Path) -> Path:
    """The resolved recipe a run saved beside its checkpoints: <run>/config.yaml."""
    path = checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} (the run's resolved recipe) is missing; pass --config")
    return path


def _load_whole_model(cfg: JobConfig, checkpoint: Path) -> dict[str, torch.Tensor]:
    from mrl.model.builder import build_model
    from mrl.parallel.layout import ParallelConfig, ParallelLayout
    from mrl.train.checkpoint import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = dataclasses.replace(cfg.model, recompute=None, value_head=False)
    dtype = "fp32" if device == "cpu" and cfg.precision.dtype == "fp16" else cfg.precision.dtype  # no CPU fp16
    precision = PrecisionConfig(dtype=dtype)
    with single_process_group(device):
        layout = ParallelLayout.initialize(ParallelConfig())
        try:
            chunks = build_model(model, precision, layout, device, seed=cfg.seed)
            load_checkpoint(checkpoint, chunks, None, layout, reseed=cfg.seed, restore_rng=False)
            return hf_state_dict(chunks, model)
        finally:
            layout.destroy()


@contextmanager
def single_process_group(device: str):
    """A world of one rank (gloo on CPU, NCCL on GPU), torn down afterwards."""
    import torch.distributed as dist

    if device == "cpu":
        from mrl.parallel.cpu import enable_cpu_execution

        enable_cpu_execution()
    else:
        torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """One ``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_tensor_order):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _tensor_order(name: str) -> tuple:
    """Embedding first, then layers in numeric order, then the final norm and the head."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _copy_tokenizer(source: str | Path | None, directory: Path) -> None:
    """Copy the Hugging Face tokenizer files of ``source`` (a directory) not already copied."""
    if source is None or not Path(source).is_dir():
        return  # the built-in byte tokenizer has no Hugging Face files
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file() and not (directory / name).exists():
            shutil.copy2(Path(source) / name, directory / name)
