"""Weights & Biases and MLflow beside metrics.jsonl, both offline, written and read back for real."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from mrl.train.config import LogConfig
from mrl.train.metrics_log import MetricsLog

RECORDS = [{"step": s, "loss": 1.0 / s, "reward_mean": 0.1 * s, "lr": 1e-4, "skipped": False} for s in (1, 2, 3)]


def write(output_dir, trackers: LogConfig, records) -> None:
    log = MetricsLog(output_dir, enabled=True, total_steps=3, progress=False, trackers=trackers,
                     run_config={"optim.lr": 1e-4, "model.num_layers": 4})
    for record in records:
        log.write(dict(record))
    log.close()


def test_wandb_offline_run_under_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    write(tmp_path, LogConfig(output_dir=str(tmp_path), wandb=True), RECORDS)
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    (data,) = list(run_dir.glob("*.wandb"))
    assert data.stat().st_size > 0
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []  # wandb's service process is stopped with the log


def test_mlflow_file_store_run_is_continued_on_resume(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = LogConfig(output_dir=str(tmp_path), mlflow=True)
    write(tmp_path, trackers, RECORDS[:2])
    write(tmp_path, trackers, RECORDS[2:])  # a resumed run: the same MLflow run goes on
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == tmp_path.name]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert run.data.params["optim.lr"] == "0.0001"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
