"""Distributed checkpoints: atomic save, exact resume, resharding across layouts.

Layout of ``<dir>/``::

    latest                   text file naming the newest complete checkpoint (updated last)
    step_00000010/           one complete checkpoint
        (Megatron-Core dist_checkpointing files: model + optimizer, resharding-capable)
        rng/rank00003.pt     per-rank RNG states (torch CPU/CUDA and Megatron's tracker)
        trainer.json         step, scheduler, data position, layout, mrl version
    step_00000020.partial/   a save in progress (ignored; removed by the next save)

A save writes everything into ``step_N.partial``, then rank 0 writes ``trainer.json`` last,
checks that every file is there and whole (``verify_checkpoint``), renames the directory to
``step_N`` and atomically replaces ``latest``. A crash or a short write at any point leaves
``latest`` naming the previous complete checkpoint.

A resume checks the checkpoint the same way first: a missing or truncated file is a
``CheckpointError`` naming it, and the error names the newest complete checkpoint before it,
which ``resume_point(..., fallback=True)`` (``train.resume_fallback``) resumes from instead.

Model and optimizer state go through Megatron-Core's distributed checkpointing with the
distributed optimizer's ``fully_reshardable`` format, so a checkpoint loads at another
TP/PP/DP layout. RNG states are per rank: they are restored only at the layout they were saved
at (that is what makes resume bit-identical); at another layout the RNG is re-seeded from
``(seed, step)`` and the load says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from mrl.compat import load_megatron_optimizer_state
from mrl.model.init import unwrap_ddp
from mrl.parallel.layout import ParallelLayout

LATEST = "latest"
TRAINER_STATE = "trainer.json"
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index: every tensor's file, offset, length
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _layout_key(layout: ParallelLayout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp}


def _model_key(index: int, count: int) -> str:
    return f"model{index}" if count > 1 else "model"


def _sharded_state(chunks: list, optimizer, is_loading: bool, extra_models: dict | None = None) -> dict:
    model_state = {}
    for index, chunk in enumerate(chunks):
        model_state[_model_key(index, len(chunks))] = unwrap_ddp(chunk).sharded_state_dict()
    state = dict(model_state)
    for name, extra in (extra_models or {}).items():
        for index, chunk in enumerate(extra):
            state[f"{name}.{_model_key(index, len(extra))}"] = chunk.sharded_state_dict(prefix=f"{name}.")
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
    return state


@torch.no_grad()
def _ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its state tensors (Megatron can only load or save existing ones).

    A step with zero gradients at learning rate 0 creates them without changing any parameter;
    with the step counters set back to 0 the state is exactly a fresh optimizer's (Adam's moments
    of zero gradients are zero), so saving it before the first step loses nothing.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None or len(torch_opt.state) > 0:
            continue
        saved_lrs = [group["lr"] for group in torch_opt.param_groups]
        for group in torch_opt.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        torch_opt.step()
        for group, lr in zip(torch_opt.param_groups, saved_lrs):
            group["lr"] = lr
            for param in group["params"]:
                param.grad = None
        for state in torch_opt.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | os.PathLike, step: int, chunks: list, optimizer, layout: ParallelLayout,
                    trainer_state: dict, extra_models: dict | None = None) -> Path:
    """Save a complete checkpoint of ``step`` atomically; returns its directory.

    ``extra_models`` (name -> chunks) are saved beside the trained model (e.g. a reference model).
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = _step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)  # a save before the first step
    dist_checkpointing.save(_sharded_state(chunks, optimizer, False, extra_models), str(partial))
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), partial / "rng" / f"rank{dist.get_rank():05d}.pt")
    dist.barrier()
    damage = [None]
    if dist.get_rank() == 0:
        state = dict(trainer_state, step=step, layout=_layout_key(layout), world_size=layout.world_size)
        _write_atomic(partial / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True))
        try:
            verify_checkpoint(partial)
        except CheckpointError as exc:
            damage = [str(exc)]
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomic(root / LATEST, final.name + "\n")
    dist.broadcast_object_list(damage, src=0)
    if damage[0] is not None:
        raise CheckpointError(f"the save of step {step} came out damaged, {root / LATEST} still names the "
                              f"previous checkpoint: {damage[0]}")
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory ``latest`` names, or None when there is no checkpoint yet.

    Raises ``CheckpointError`` naming the file when ``latest`` points at something incomplete.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {name!r}, but {path} does not exist")
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {path / TRAINER_STATE} is missing")
    return path


def read_trainer_state(path: Path) -> dict:
    file = Path(path) / TRAINER_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike, chunks: list, optimizer, layout: ParallelLayout,
                    *, reseed: int | None = None, restore_rng: bool = True, extra_models: dict | None = None) -> dict:
    """Load model, optimizer (unless None) and RNG state from ``path``; return the trainer state.

    At a different layout the RNG is re-seeded with ``reseed`` (which must then be given);
    ``restore_rng=False`` loads weights only (a reference model, an SFT initialisation).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = read_trainer_state(path)
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, True, extra_models)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(sharded, path)  # a Path: Megatron lists a str's files with .iterdir()
    except (Exception, CheckpointException) as exc:  # many types; torch's derives from BaseException
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        for index, chunk in enumerate(chunks):
            unwrap_ddp(chunk).load_state_dict(loaded[_model_key(index, len(chunks))])
        for name, extra in (extra_models or {}).items():
            for index, chunk in enumerate(extra):
                chunk.load_state_dict(_strip_prefix(loaded[f"{name}.{_model_key(index, len(extra))}"], f"{name}."))
        if optimizer is not None:
            load_megatron_optimizer_state(optimizer, loaded["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer: {type(exc).__name__}: {exc}"
        ) from exc
    same_layout = state.get("layout") == _layout_key(layout)
    state["resharded"] = not same_layout
    if not restore_rng:
        return state
    rng_file = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if same_layout:
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {rng_file} is missing")
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        if reseed is None:
            raise CheckpointError(
                f"checkpoint {path} was saved at layout {state.get('layout')} and is loaded at "
                f"{_layout_key(layout)}; pass a seed to re-seed the RNG"
            )
        layout.seed(reseed + int(state["step"]))
    return state


def _damaged(path: Path, file: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged: {file} {what}")


def _check_zip(path: Path, file: Path) -> None:
    """A torch.save file (a zip archive) is there and whole."""
    if not file.is_file():
        raise _damaged(path, file, "is missing")
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise _damaged(path, file, f"is truncated or corrupt ({exc})") from exc
    if bad is not None:
        raise _damaged(path, file, f"is corrupt (entry {bad} fails its checksum)")


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that every file of checkpoint ``path`` is there and whole; return its trainer state.

    Raises ``CheckpointError`` naming the first missing, truncated or unreadable file. Tensor files
    are checked against the sizes their index records (not read); small files are read whole.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    state = read_trainer_state(path)
    config = path / "metadata.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError as exc:
        raise _damaged(path, config, "is missing") from exc
    except (OSError, ValueError) as exc:
        raise _damaged(path, config, f"is unreadable ({exc})") from exc
    _check_zip(path, path / "common.pt")
    index = path / DCP_INDEX
    if not index.is_file():
        raise _damaged(path, index, "is missing")
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as exc:  # noqa: BLE001 - an unpickling error of any type means a damaged index
        raise _damaged(path, index, f"is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise _damaged(path, file, "is missing")
        if file.stat().st_size < size:
            raise _damaged(path, file, f"is truncated ({file.stat().st_size} bytes; the index needs {size})")
    world = state.get("world_size")
    for rank in range(world if isinstance(world, int) else 0):
        _check_zip(path, path / "rng" / f"rank{rank:05d}.pt")
    return state


def _step_of(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def resume_point(root: str | os.PathLike, *, fallback: bool = False) -> tuple[Path | None, str | None]:
    """The checkpoint a run in ``root`` resumes from (None: none yet), and a warning to show.

    The checkpoint ``latest`` names is verified first. When it is damaged, the error names the file
    and the newest complete checkpoint before it; with ``fallback`` that one is returned instead.
    """
    root = Path(root)
    try:
        path = latest_checkpoint(root)
        if path is not None:
            verify_checkpoint(path)
        return path, None
    except CheckpointError as exc:
        damage = str(exc)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
    newest = _step_of(Path(named)) if named else None
    earlier = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None
                      and (newest is None or _step_of(p) < newest)), key=_step_of, reverse=True)
    previous = None
    for candidate in earlier:
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        previous = candidate
        break
    if previous is None:
        raise CheckpointError(f"{damage}; there is no complete checkpoint before it in {root}")
    if not fallback:
        raise CheckpointError(
            f"{damage}. The newest complete checkpoint before it is {previous}: rerun with "
            "train.resume_fallback=true to resume from it (the steps after it are trained again)"
        )
    return previous, f"{damage}; resuming from the previous complete checkpoint {previous} (train.resume_fallback)"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run/checkpoints directory whose ``latest`` names one."""
    root = Path(path)
    for candidate in (root, root / "checkpoints"):
        found = latest_checkpoint(candidate) if (candidate / "latest").exists() else None
        if found is not None:
            verify_checkpoint(found)
            return found
    if (root / "trainer.json").is_file():
        verify_checkpoint(root)
        return root
    raise CheckpointError(f"no checkpoint at {root}: expected a step directory with trainer.json or a 'latest' file")
