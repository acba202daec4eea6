"""The end-of-run summary of MetricsLog: steps, tokens, final and best values."""

from __future__ import annotations

import math

from mrl.train.metrics_log import MetricsLog


def test_summary_names_the_steps_tokens_and_the_best_values(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, total_steps=10, progress=False)
    assert log.summary() == []
    rows = [(5, 2.0, 0.1), (6, 1.5, 0.4), (7, math.nan, 0.3), (8, 1.7, 0.2)]
    for step, loss, reward in rows:
        log.write({"step": step, "loss": loss, "reward_mean": reward, "num_tokens": 1500})
    first, second = log.summary()
    assert first.startswith("trained steps 5-8 of 10 in 0:00:0") and "(6k tokens, " in first
    assert second == "final: loss 1.7, reward_mean 0.2 | best: loss 1.5 (step 6), reward_mean 0.4 (step 6)"


def test_the_eta_counts_the_first_step_too(tmp_path, capsys):
    log = MetricsLog(tmp_path, enabled=True, total_steps=101, progress=True)
    log.write({"step": 1, "loss": 1.0, "step_time_s": 36.0, "num_tokens": 10})
    line = capsys.readouterr().out.rstrip()
    assert line.rsplit("eta ", 1)[1].startswith("1:00:0"), line  # 100 steps left at 36 s each (was 0:00:00)
