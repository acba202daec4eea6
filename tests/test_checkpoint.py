"""Checkpoint failure modes: a crash mid-save, missing and corrupt files, incompatible resumes.

Every error must name the file at fault, and ``latest`` must never point at an incomplete save.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_trainer import SFT, SHORT, _trainer

BASE = [*SHORT[1:], "parallel.tp=2", "parallel.pp=2"]


def case_train(overrides: list[str], output_dir: str) -> list[float]:
    return [r.loss for r in _trainer(SFT, overrides, output_dir).train()]


def case_crash_during_save(overrides: list[str], output_dir: str) -> str:
    """Train, then make the distributed-checkpoint write fail half-way through a save."""
    import megatron.core.dist_checkpointing as dcp

    trainer = _trainer(SFT, overrides, output_dir)
    trainer.train()  # saves step 2 at the end
    trainer.cfg.train.steps = 3
    trainer.train_one_step()
    original = dcp.save

    def failing_save(state, directory, *args, **kwargs):
        Path(directory, "half-written").write_text("x")
        raise OSError("disk full (injected)")

    dcp.save = failing_save
    try:
        trainer.save()
    except OSError as exc:
        return str(exc)
    finally:
        dcp.save = original
    return "no error"


def case_resume_error(overrides: list[str], output_dir: str) -> str:
    """Build a trainer and resume; return the error message (or 'ok')."""
    try:
        _trainer(SFT, overrides, output_dir).train()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_crash_mid_save_keeps_latest_and_resume_works(ranks4, tmp_path):
    out = ranks4.run(case_crash_during_save, [*BASE, "train.steps=2"], str(tmp_path))
    assert all("disk full" in message for message in out)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / "step_00000003.partial").is_dir()
    assert not (root / "step_00000003").exists()
    resumed = ranks4.run(case_train, [*BASE, "train.steps=3"], str(tmp_path))[-1]
    assert len(resumed) == 1  # resumed from step 2, trained step 3
    assert not (root / "step_00000003.partial").exists()  # the next save cleaned it up
    assert (root / "latest").read_text().strip() == "step_00000003"


@pytest.fixture(scope="module")
def saved_run(ranks4, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    ranks4.run(case_train, [*BASE, "train.steps=1"], str(out))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_latest_pointing_at_a_missing_directory_is_named(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("step_00000042\n")
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2"], str(run))
    assert all("CheckpointError" in e and "step_00000042" in e and "latest" in e for e in errors)


def test_missing_trainer_state_is_named(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000001" / "trainer.json").unlink()
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2"], str(run))
    assert all("incomplete" in e and "trainer.json" in e for e in errors)


def test_corrupt_shard_is_named(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    step = run / "checkpoints" / "step_00000001"
    shard = max((p for p in step.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(b"not a checkpoint")
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2"], str(run))
    assert all("CheckpointError" in e and str(step) in e for e in errors), errors[0]


def test_corrupt_trainer_state_is_named(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000001" / "trainer.json").write_text("{not json")
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2"], str(run))
    assert all("CheckpointError" in e and "trainer.json" in e for e in errors)


def test_resume_with_another_optimizer_format_is_refused(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2", "optim.distributed=false"], str(run))
    assert all("CheckpointError" in e and "optim.distributed" in e and "trainer.json" in e for e in errors)
    state = json.loads((run / "checkpoints" / "step_00000001" / "trainer.json").read_text())
    assert state["optimizer"]["distributed"] is True


# --------------------------------------------------------------------------- damaged files


def _verify_error(step: Path) -> str:
    from mrl.train.checkpoint import CheckpointError, verify_checkpoint

    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(step)
    return str(error.value)


@pytest.mark.parametrize("name", ["common.pt", "metadata.json", ".metadata", "rng/rank00003.pt", "__1_0.distcp"])
def test_every_missing_file_is_named(saved_run, tmp_path, name):
    step = _copy(saved_run, tmp_path / "run") / "checkpoints" / "step_00000001"
    (step / name).unlink()
    assert _verify_error(step) == f"checkpoint {step} is damaged: {step / name} is missing"


@pytest.mark.parametrize("name", ["common.pt", ".metadata", "rng/rank00000.pt", "__0_0.distcp"])
def test_every_truncated_file_is_named(saved_run, tmp_path, name):
    step = _copy(saved_run, tmp_path / "run") / "checkpoints" / "step_00000001"
    file = step / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert _verify_error(step).startswith(f"checkpoint {step} is damaged: {file} is truncated")


def test_a_missing_common_file_stops_the_resume_naming_it(ranks4, saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    common = run / "checkpoints" / "step_00000001" / "common.pt"
    common.unlink()  # was: AttributeError: 'str' object has no attribute 'iterdir'
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=2"], str(run))
    assert all(e.startswith(f"CheckpointError: checkpoint {common.parent} is damaged: {common} is missing; "
                            "there is no complete checkpoint before it") for e in errors), errors[0]


def case_resume_step(overrides: list[str], output_dir: str) -> tuple[int, int]:
    trainer = _trainer(SFT, overrides, output_dir)
    trainer.train()
    return trainer.step, len([line for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()])


def test_a_damaged_latest_checkpoint_offers_the_previous_one_and_the_flag_takes_it(ranks4, tmp_path):
    ranks4.run(case_train, [*BASE, "train.steps=2", "train.save_interval=1"], str(tmp_path))
    root = tmp_path / "checkpoints"
    shard = root / "step_00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    errors = ranks4.run(case_resume_error, [*BASE, "train.steps=3"], str(tmp_path))
    assert all(f"{shard} is truncated" in e and f"The newest complete checkpoint before it is {root}/step_00000001: "
               "rerun with train.resume_fallback=true" in e for e in errors), errors[0]
    steps = ranks4.run(case_resume_step, [*BASE, "train.steps=3", "train.resume_fallback=true"], str(tmp_path))
    assert steps[-1] == (3, 3)  # resumed at step 1, trained steps 2 and 3 again; one clean curve
    assert (root / "latest").read_text().strip() == "step_00000003"


def case_short_write_during_save(overrides: list[str], output_dir: str) -> str:
    """The distributed save returns, but one of its files came out short (a full disk, a dying node)."""
    import megatron.core.dist_checkpointing as dcp
    import torch.distributed as dist

    trainer = _trainer(SFT, overrides, output_dir)
    trainer.train()  # saves step 1
    trainer.cfg.train.steps = 2
    trainer.train_one_step()
    original = dcp.save

    def short_save(state, directory, *args, **kwargs):
        original(state, directory, *args, **kwargs)
        dist.barrier()
        if dist.get_rank() == 0:
            shard = Path(directory) / "__0_0.distcp"
            shard.write_bytes(shard.read_bytes()[:10])

    dcp.save = short_save
    try:
        trainer.save()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    finally:
        dcp.save = original
    return "no error"


def test_a_damaged_save_never_becomes_latest(ranks4, tmp_path):
    errors = ranks4.run(case_short_write_during_save, [*BASE, "train.steps=1"], str(tmp_path))
    root = tmp_path / "checkpoints"
    assert all(e.startswith(f"CheckpointError: the save of step 2 came out damaged, {root}/latest still names the "
                            f"previous checkpoint: checkpoint {root}/step_00000002.partial is damaged: ")
               for e in errors), errors[0]
    assert (root / "latest").read_text().strip() == "step_00000001"
