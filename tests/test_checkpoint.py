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
