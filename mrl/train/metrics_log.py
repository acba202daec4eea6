"""Per-step metrics: metrics.jsonl, optional TensorBoard, a progress line with ETA.

Only the logging rank writes (the last global rank: a last pipeline stage, where losses live).
``metrics.jsonl`` gets one JSON object per step; a resumed run appends after truncating any
lines at or beyond the step it resumes from, so the file always reads as one clean curve.
``summary`` sums up what this invocation trained (steps, tokens, wall time, final and best values).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from mrl.train.loggers import build_sinks


class MetricsLog:
    """Writes step records on the logging rank; a no-op elsewhere."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, progress: bool = True,
                 tensorboard: bool = False, log_interval: int = 1, trackers=None, run_config: dict | None = None) -> None:
        """``trackers``: a ``LogConfig`` whose wandb/mlflow settings add those sinks (``mrl.train.loggers``)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress
        self.log_interval = log_interval
        self.path = Path(output_dir) / "metrics.jsonl"
        self._start = time.monotonic()
        self._start_step: int | None = None
        self._created = time.monotonic()
        self._tokens = 0
        self._last: dict | None = None
        self._best: dict[str, tuple[float, int]] = {}  # key -> (best value, its step)
        self._last_rollout: str | None = None
        self._sinks = build_sinks(Path(output_dir), tensorboard=tensorboard, trackers=trackers,
                                  run_config=run_config or {}) if enabled else []

    def resume_from(self, step: int) -> None:
        """Drop records of steps > ``step`` (they were not checkpointed and will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._start_step is None:  # the clock starts when this first step did (ETA right from step 1)
            step_time = record.get("step_time_s")
            self._start_step = step - 1
            self._start = time.monotonic() - (step_time if isinstance(step_time, (int, float)) else 0.0)
        clean = {key: _jsonable(value) for key, value in record.items()}
        self._track(clean)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean, sort_keys=True) + "\n")
        if self._sinks:
            numbers = {key: float(value) for key, value in clean.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
            for sink in self._sinks:
                sink.log(numbers, step)
        if isinstance(clean.get("time_rollout_s"), (int, float)):
            self._last_rollout = (f"rollout {clean['time_rollout_s']:.1f}s "
                                  f"({clean.get('gen_tokens_per_s', 0):.0f} gen tok/s) "
                                  f"logprobs {clean.get('time_logprobs_s', 0):.1f}s")
        if self.progress and (step % self.log_interval == 0 or step == self.total_steps):
            print(self._progress_line(clean), file=sys.stdout, flush=True)

    def _progress_line(self, record: dict) -> str:
        step = record["step"]
        done = step - (self._start_step or 0)
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {record.get('loss', float('nan')):.4f}"]
        for key in ("reward_mean", "grad_norm", "lr"):
            if isinstance(record.get(key), (int, float)):
                parts.append(f"{key} {record[key]:.4g}")
        if record.get("skipped"):
            parts.append(f"SKIPPED ({record.get('skip_reason')})")
        parts.append(f"{record.get('tokens_per_s', 0):.0f} tok/s")
        if self._last_rollout is not None:  # the latest rollout's phases (paid by the step that ran it)
            parts.append(f"{self._last_rollout} train {record.get('time_train_s', 0):.1f}s")
        parts.append(f"eta {_duration(eta)}")
        return " | ".join(parts)

    def _track(self, record: dict) -> None:
        self._tokens += int(record.get("num_tokens", 0) or 0)
        self._last = record
        for key, better in BEST.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if key not in self._best or better(value, self._best[key][0]):
                    self._best[key] = (value, record["step"])

    def summary(self) -> list[str]:
        """Lines summing up the steps written by this process (empty when it wrote none)."""
        if self._last is None or self._start_step is None:
            return []
        seconds = time.monotonic() - self._created
        first, last = self._start_step + 1, self._last["step"]
        lines = [f"trained steps {first}-{last} of {self.total_steps} in {_duration(seconds)} "
                 f"({_count(self._tokens)} tokens, {self._tokens / max(seconds, 1e-9):.0f} tok/s)"]
        final = [f"{key} {self._last[key]:.4g}" for key in BEST if isinstance(self._last.get(key), (int, float))]
        best = [f"{key} {value:.4g} (step {step})" for key, (value, step) in self._best.items()]
        lines.append(f"final: {', '.join(final)} | best: {', '.join(best)}")
        return lines

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


# Metrics whose best value the summary reports, and which way is better.
BEST = {"loss": lambda new, old: new < old, "reward_mean": lambda new, old: new > old}


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
