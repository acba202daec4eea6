"""Preference losses and distillation variants through the real trainer on 4 gloo ranks.

- A mix that reads step statistics (BCO-pair's running shift, AOT's global sort: the trainer's
  old-policy pass and ``DPOLoss.prepare_step``) gives the same curve at every layout, and a resumed
  run continues it bit for bit (the shift is checkpointed from the last pipeline stage).
- Top-k distillation (the trainer keeps only the teacher's top-k) and the generalised JSD give the
  same curve at every layout.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.test_trainer import _assert_same_curve, case_curve

MPO = "configs/dpo-mpo-tiny-cpu.yaml"
SFT = "configs/sft-tiny-cpu.yaml"
SHORT = ["train.global_batch_size=16", "train.micro_batch_size=4", "scheduler.warmup_steps=1", "log.progress=false"]
STEP_STATS = ["loss.loss_type=[sigmoid,bco_pair,aot]", "loss.loss_weights=[0.8,0.2,0.5]"]
LAYOUTS = (["parallel.tp=2", "parallel.pp=2"], ["parallel.tp=4", "parallel.pp=1"])


def test_step_statistics_losses_are_layout_invariant(ranks4, tmp_path):
    base = [*SHORT, *STEP_STATS, "train.steps=2"]
    reference = ranks4.run(case_curve, MPO, [*base, "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "a"))[0]
    assert all(math.isfinite(loss) for loss, _ in reference)
    for layout in LAYOUTS:
        curve = ranks4.run(case_curve, MPO, [*base, *layout], str(tmp_path / "_".join(layout)))[-1]
        _assert_same_curve(curve, reference)


def test_bco_shift_resumes_bit_for_bit(ranks4, tmp_path):
    steps = [*SHORT, *STEP_STATS, "train.steps=4", "parallel.tp=2", "parallel.pp=2"]
    full = ranks4.run(case_curve, MPO, steps, str(tmp_path / "full"))[-1]
    first = ranks4.run(case_curve, MPO, [*steps, "train.steps=2"], str(tmp_path / "split"))[-1]
    resumed = ranks4.run(case_curve, MPO, steps, str(tmp_path / "split"))[-1]
    assert first == full[:2] and resumed == full[2:]  # the running shift came back from the checkpoint
    saved = json.loads((tmp_path / "split" / "checkpoints" / "step_00000002" / "trainer.json").read_text())
    assert saved["loss"]["bco_shift"]["count"] == 2
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert all("bco_shift" in r and "dpo_loss_aot" in r for r in records)


@pytest.fixture(scope="module")
def teacher(ranks4, tmp_path_factory):
    """A teacher unlike the student's initial weights: a few SFT steps from them."""
    out = tmp_path_factory.mktemp("teacher")
    ranks4.run(case_curve, SFT, [*SHORT, "train.steps=3", "optim.lr=3e-3", "parallel.tp=2", "parallel.pp=2"], str(out))
    return str(out)


@pytest.mark.parametrize("loss", [
    ["loss.teacher_topk=8"],
    ["loss.teacher_topk=8", "loss.topk_tail=renormalize", "loss.direction=jsd", "loss.jsd_beta=0.3"],
    ["loss.direction=jsd", "loss.jsd_beta=0.7", "reference.keep_logits=true"],
], ids=["topk-bucket", "topk-renormalize-jsd", "full-jsd"])
def test_distill_variants_are_layout_invariant(ranks4, tmp_path, teacher, loss):
    base = [*SHORT, "train.steps=2", "algorithm=distill", "loss.kind=distill", "loss.temperature=1.5", *loss,
            "reference.source=checkpoint", f"reference.checkpoint={teacher}"]
    reference = ranks4.run(case_curve, SFT, [*base, "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "a"))[0]
    assert all(math.isfinite(value) and value > 0 for value, _ in reference)
    for layout in LAYOUTS:
        curve = ranks4.run(case_curve, SFT, [*base, *layout], str(tmp_path / "_".join(layout)))[-1]
        _assert_same_curve(curve, reference)
