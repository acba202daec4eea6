"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (all optional).

Each sink gets every step's numeric metrics (``log``) and is closed once (``close``). They write
under the run's output directory by default and need no network: Weights & Biases runs in
offline mode unless ``log.wandb_mode=online`` (``wandb sync <output_dir>/wandb`` uploads later),
MLflow writes to a file store (``<output_dir>/mlruns``) unless ``log.mlflow_tracking_uri`` names
a server. A resumed run continues the same tracker run (its id derives from the output directory).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class TensorBoardSink:
    def __init__(self, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the 'tensorboard' extra

        self._writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


def _run_id(output_dir: Path) -> str:
    return hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]


class WandbSink:
    def __init__(self, output_dir: Path, *, project: str | None, mode: str, config: dict) -> None:
        import wandb  # the 'wandb' extra

        self._wandb = wandb
        self._run = wandb.init(project=project or output_dir.resolve().name, name=output_dir.resolve().name,
                               id=_run_id(output_dir), resume="allow", mode=mode, dir=str(output_dir),
                               config=config, settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()
        teardown = getattr(self._wandb, "teardown", None)
        if teardown is not None:  # stops wandb's service process: nothing of the run is left running
            teardown()


class MLflowSink:
    def __init__(self, output_dir: Path, *, tracking_uri: str | None, config: dict) -> None:
        import os

        import mlflow  # the 'mlflow' extra

        self._mlflow = mlflow
        if tracking_uri is None:
            # MLflow 3 keeps its file store (no server, no database package) behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(tracking_uri or (output_dir / "mlruns").resolve().as_uri())
        experiment = output_dir.resolve().name
        mlflow.set_experiment(experiment)
        existing = mlflow.search_runs(filter_string=f"tags.mrl_run_id = '{_run_id(output_dir)}'", output_format="list")
        if existing:
            self._run = mlflow.start_run(run_id=existing[0].info.run_id)
        else:
            self._run = mlflow.start_run(run_name=experiment, tags={"mrl_run_id": _run_id(output_dir)})
            mlflow.log_params({key: str(value)[:500] for key, value in config.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({key.replace("/", "_"): value for key, value in metrics.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def build_sinks(output_dir: Path, *, tensorboard: bool, trackers, run_config: dict) -> list:
    """The sinks a ``LogConfig`` (``trackers``, may be None) asks for, besides TensorBoard."""
    sinks: list = [TensorBoardSink(output_dir)] if tensorboard else []
    if trackers is not None and trackers.wandb:
        sinks.append(WandbSink(output_dir, project=trackers.wandb_project, mode=trackers.wandb_mode, config=run_config))
    if trackers is not None and trackers.mlflow:
        sinks.append(MLflowSink(output_dir, tracking_uri=trackers.mlflow_tracking_uri, config=run_config))
    return sinks


def flat_config(config) -> dict:
    """A dataclass config as {"section.key": value} (the trackers' run parameters)."""
    import dataclasses

    out: dict = {}

    def walk(value, prefix: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{prefix}{f.name}.")
        else:
            out[prefix[:-1]] = value

    walk(config, "")
    return out
