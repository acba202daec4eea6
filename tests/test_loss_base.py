"""The Loss base class: every loss is validated by ``Loss.__call__`` before its ``compute``, and
each loss tells the trainer what its batches need (``BatchNeeds``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mrl.losses import build_loss
from mrl.losses.base import (
    IGNORE_INDEX,
    BatchNeeds,
    GlobalCounts,
    Loss,
    LossConfigBase,
    LossInputs,
    check_shape,
    compute_global_counts,
)
from mrl.losses.metrics import Metric

VOCAB = 11


@dataclass
class WeightedNLLConfig(LossConfigBase):
    """A loss written outside mrl: −w·log p(label), token mean."""


class WeightedNLL(Loss):
    """A minimal custom loss: it declares its keys and checks its own input's shape, nothing else."""

    kind = "weighted-nll"
    normalizer = "tokens"
    required_keys = ("labels", "weights")

    def __init__(self, config, *, vocab_size=None) -> None:
        super().__init__(config, vocab_size=vocab_size)
        self.seen: list[LossInputs] = []

    def check_inputs(self, batch, logits, values, counts):
        return {"weights": check_shape(batch, "weights", tuple(batch["labels"].shape))}

    def compute(self, inputs: LossInputs):
        self.seen.append(inputs)
        logprobs = torch.log_softmax(inputs.logits.float(), -1)
        safe = inputs.safe_labels.clamp_min(0)
        picked = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, S]
        weights = torch.where(inputs.mask, inputs.checked["weights"], torch.zeros_like(picked))
        loss = -(weights * torch.where(inputs.mask, picked, torch.zeros_like(picked))).sum() / inputs.counts.num_tokens
        return loss, {"loss": Metric.mean_fragment(loss)}


def _batch(rows: int = 3, length: int = 5):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels[:, 0] = IGNORE_INDEX
    batch = {"labels": labels, "weights": torch.rand(rows, length, generator=gen)}
    logits = torch.randn(rows, length, VOCAB, generator=gen, requires_grad=True)
    return logits, batch, compute_global_counts([batch])


def test_a_custom_loss_gets_every_check_from_the_base_class():
    loss_fn = WeightedNLL(WeightedNLLConfig(), vocab_size=VOCAB)
    logits, batch, counts = _batch()

    def raises(bad_batch, match, output=logits):
        with pytest.raises(ValueError, match=match):
            loss_fn(output, bad_batch, counts)

    raises({"labels": batch["labels"]}, r"weighted-nll loss: batch is missing required key\(s\) \['weights'\]")
    raises(batch, "logits must be", output=logits[:, :-1])
    raises(batch, "model output must be", output=(logits, None, None))
    raises(dict(batch, loss_mask=torch.ones(3, 4)), "loss_mask")
    raises(dict(batch, weights=batch["weights"][:, :-1]), r"batch\['weights'\] must have shape")
    labels = batch["labels"].clone()
    labels[1, 2] = VOCAB
    raises(dict(batch, labels=labels), r"labels outside the vocabulary \[0, 11\)")
    weights = batch["weights"].clone()
    weights[2, 3] = math.nan
    raises(dict(batch, weights=weights), "weights has NaN/inf at valid positions")
    assert loss_fn.seen == []  # compute never saw an invalid batch

    weights[2, 0] = math.inf  # where nothing is valid: no error
    weights[2, 3] = 0.5
    loss, metrics = loss_fn(logits, dict(batch, weights=weights), counts)
    assert torch.isfinite(loss)
    assert metrics["num_tokens"].value.item() == counts.num_tokens == 12
    assert metrics["num_seqs"].value.item() == 3
    (seen,) = loss_fn.seen
    assert torch.equal(seen.mask, batch["labels"] != IGNORE_INDEX)
    assert torch.all(seen.safe_labels[:, 0] == IGNORE_INDEX)
    loss.backward()
    assert logits.grad[:, 0].abs().sum() == 0


def test_validate_false_skips_the_value_check_only():
    loss_fn = WeightedNLL(WeightedNLLConfig(validate=False), vocab_size=VOCAB)
    logits, batch, counts = _batch()
    weights = batch["weights"].clone()
    weights[0, 2] = math.nan
    loss, _ = loss_fn(logits, dict(batch, weights=weights), counts)  # no device sync, no error
    assert math.isnan(loss.item())
    with pytest.raises(ValueError, match="weights"):
        loss_fn(logits, dict(batch, weights=weights[:, :2]), counts)


def test_a_loss_cannot_replace_the_validating_call():
    with pytest.raises(TypeError, match="overrides Loss.__call__"):
        class Unchecked(Loss):  # noqa: F841 - defining it is the error
            kind = "unchecked"
            normalizer = "tokens"
            required_keys = ("labels",)

            def __call__(self, output, batch, counts, group=None):
                return output.sum(), {}

            def compute(self, inputs):
                raise AssertionError

    class NoCompute(Loss):
        kind = "none"
        normalizer = "tokens"
        required_keys = ("labels",)

    with pytest.raises(TypeError, match="compute"):
        NoCompute(WeightedNLLConfig())


def test_value_flags_join_the_one_value_check():
    class Bounded(WeightedNLL):
        def value_flags(self, batch, mask, num_labels):
            return {"weights above 1 at valid positions": (mask & (batch["weights"] > 1)).any()}

    loss_fn = Bounded(WeightedNLLConfig(), vocab_size=VOCAB)
    logits, batch, counts = _batch()
    labels, weights = batch["labels"].clone(), batch["weights"].clone()
    labels[0, 1], weights[1, 1] = -5, 3.0
    with pytest.raises(ValueError, match=r"labels outside the vocabulary \[0, 11\); weights above 1"):
        loss_fn(logits, dict(batch, labels=labels, weights=weights), counts)


def test_batch_needs_of_the_built_in_losses():
    assert WeightedNLL(WeightedNLLConfig()).batch_needs == BatchNeeds(keys=("labels", "weights"))
    assert build_loss({"kind": "sft"}).batch_needs == BatchNeeds()
    grpo = build_loss({"kind": "grpo", "temperature": 0.7}).batch_needs
    assert grpo.old_logprobs and grpo.temperature == 0.7
    assert not (grpo.reference_logprobs or grpo.reference_logits or grpo.value_targets)
    kl = build_loss({"kind": "grpo", "kl_coef": 0.1}).batch_needs
    assert kl.reference_logprobs and not kl.reference_logits and "ref_logprobs" in kl.keys
    exact = build_loss({"kind": "grpo", "kl_coef": 0.1, "kl_estimator": "full"}).batch_needs
    assert exact.reference_logits and "ref_logits" in exact.keys
    ppo = build_loss({"kind": "ppo", "value_coef": 0.5}).batch_needs
    assert ppo.value_targets and "returns" in ppo.keys
    dpo = build_loss({"kind": "dpo"}).batch_needs
    assert dpo.reference_logprobs and not dpo.old_logprobs
    assert build_loss({"kind": "dpo", "loss_type": "aot"}).batch_needs.old_logprobs  # step statistics
    distill = build_loss({"kind": "distill", "temperature": 2.0}).batch_needs
    assert distill.reference_logits and distill.temperature == 2.0
    assert not build_loss({"kind": "distill", "teacher_topk": 4}).batch_needs.reference_logits


def test_counts_reach_the_loss_unchanged():
    loss_fn = WeightedNLL(WeightedNLLConfig(), vocab_size=VOCAB)
    logits, batch, _ = _batch()
    counts = GlobalCounts(num_tokens=48, num_seqs=12)  # e.g. four ranks' worth
    loss_fn(logits, batch, counts)
    assert loss_fn.seen[0].counts is counts
