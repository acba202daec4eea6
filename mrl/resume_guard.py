"""A rerun of an output directory that holds a run: compared with that run before anything is written.

``inspect_rerun`` reads ``<output_dir>/config.yaml`` and ``checkpoints/latest`` (nothing heavier)
and sorts every setting that differs from the run's:

- shape-changing (``model.*``, the tokenizer, the algorithm, the optimizer's state format, the
  reference model's source): refused, the checkpoint cannot take them;
- bookkeeping (steps, checkpoint and log intervals, layout, logging): allowed, and printed;
- anything else (learning rate, loss, data, rollouts): refused unless
  ``train.allow_config_changes=true``, and then recorded in ``config_changes.jsonl``.

Only then is ``config.yaml`` replaced (``write_run_config``). A run that has already reached
``train.steps`` is reported as complete, so a rerun of a finished run ends in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mrl.config import dump_yaml, load_config
from mrl.job import JobConfig

CONFIG_NAME = "config.yaml"
CHANGES_NAME = "config_changes.jsonl"
SHAPE_KEYS = ("algorithm", "data.tokenizer", "optim.name", "optim.distributed", "precision.dtype",
              "reference.source")
SHAPE_PREFIXES = ("model.",)
FREE_KEYS = ("nproc", "train.steps", "train.save_interval", "train.keep_checkpoints", "train.log_interval",
             "train.max_consecutive_bad_steps", "train.stop_timeout_s", "train.resume_fallback",
             "train.allow_config_changes")
FREE_PREFIXES = ("log.", "parallel.")


@dataclass
class Rerun:
    """What a run finds in its output directory."""

    output_dir: Path
    step: int | None = None
    """The step of the latest checkpoint (None: nothing to resume)."""
    free: dict[str, tuple] = field(default_factory=dict)
    changed: dict[str, tuple] = field(default_factory=dict)

    def complete(self, cfg: JobConfig) -> bool:
        return self.step is not None and self.step >= cfg.train.steps

    def notes(self) -> list[str]:
        """Lines for the log: the changed settings of a resume."""
        if self.step is None or not (self.free or self.changed):
            return []
        lines = [f"resuming {self.output_dir} at step {self.step} with changed settings"
                 + (f" (recorded in {self.output_dir / CHANGES_NAME})" if self.changed else "") + ":"]
        lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in {**self.free, **self.changed}.items()]
        return lines


def flatten(value, prefix: str = "") -> dict:
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def latest_step(output_dir: Path) -> int | None:
    pointer = output_dir / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    digits = name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _kind(key: str) -> str:
    if key in SHAPE_KEYS or key.startswith(SHAPE_PREFIXES):
        return "shape"
    if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
        return "free"
    return "changed"


def inspect_rerun(cfg: JobConfig) -> Rerun:
    """Compare ``cfg`` with the run in its output directory; raises ``ValueError`` for a refused resume."""
    output_dir = Path(cfg.log.output_dir)
    rerun = Rerun(output_dir, latest_step(output_dir))
    saved = output_dir / CONFIG_NAME
    if rerun.step is None or not saved.is_file():
        return rerun
    try:
        before = flatten(load_config(str(saved), JobConfig, []))
    except (ValueError, OSError) as exc:
        if cfg.train.allow_config_changes:
            return rerun
        raise ValueError(f"cannot compare this resume with the run in {output_dir}: {saved}: {exc}; rerun with "
                         "train.allow_config_changes=true to resume anyway") from exc
    after = flatten(cfg)
    shape = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        {"shape": shape, "free": rerun.free, "changed": rerun.changed}[_kind(key)][key] = (old, new)
    if shape:
        listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in shape.items())
        raise ValueError(
            f"{output_dir} holds a run at step {rerun.step} whose checkpoints cannot take these changes:\n{listed}\n"
            f"train with them in a new log.output_dir, or start there from this run's weights with "
            f"train.init_checkpoint={output_dir}"
        )
    if rerun.changed and not cfg.train.allow_config_changes:
        listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in rerun.changed.items())
        raise ValueError(
            f"resuming {output_dir} (step {rerun.step}) with settings that differ from its {CONFIG_NAME}:\n{listed}\n"
            "rerun with train.allow_config_changes=true to resume with them (they are recorded in "
            f"{output_dir / CHANGES_NAME}), or without these overrides"
        )
    return rerun


def write_run_config(cfg: JobConfig, rerun: Rerun) -> None:
    """Record a resume's changes, then replace config.yaml (call once ``inspect_rerun`` passed)."""
    output_dir = Path(cfg.log.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rerun.changed:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": rerun.step,
                 "changes": {key: {"old": old, "new": new} for key, (old, new) in rerun.changed.items()}}
        with open(output_dir / CHANGES_NAME, "a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
    tmp = output_dir / f"{CONFIG_NAME}.tmp"
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(output_dir / CONFIG_NAME)
