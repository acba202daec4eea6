"""Train/inference mismatch control: importance weights at token, sequence and geometric level with
truncate, mask and seq-mask-truncate (against a per-sequence float64 reference), the loss's IS
metrics, and the mismatch metrics of online GRPO with the default Megatron engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mrl.losses import functional as LF
from mrl.losses.base import GlobalCounts
from mrl.losses.factory import build_loss
from mrl.losses.policy import PolicyLossConfig
from tests.test_losses import VOCAB, make_batch, mask_of, metric, run_loss


def _reference(log_w: torch.Tensor, mask: torch.Tensor, correction: str, level: str, low: float, high: float,
               seq_low: float, seq_high: float):
    """Weights [B, S], token_outside [B, S], seq_outside [B], one sequence at a time in float64."""
    B, S = log_w.shape
    weights = torch.zeros(B, S, dtype=torch.float64)
    token_out = torch.zeros(B, S, dtype=torch.bool)
    seq_out = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        idx = [s for s in range(S) if mask[b, s]]
        if not idx:
            continue
        lw = [float(log_w[b, s]) for s in idx]
        if level == "token" or correction == "seq-mask-truncate":
            raw = [math.exp(x) for x in lw]
        elif level == "sequence":
            raw = [math.exp(sum(lw))] * len(idx)
        else:
            raw = [math.exp(sum(lw) / len(lw))] * len(idx)
        out = [r < low or r > high for r in raw]
        if correction == "mask":
            w = [0.0 if o else r for r, o in zip(raw, out)]
        else:
            w = [min(max(r, low), high) for r in raw]
        if correction == "seq-mask-truncate":
            geometric = math.exp(sum(lw) / len(lw))
            if geometric < seq_low or geometric > seq_high:
                w = [0.0] * len(idx)
                out = [True] * len(idx)
        for s, value, o in zip(idx, w, out):
            weights[b, s], token_out[b, s] = value, o
        seq_out[b] = any(out)
    return weights, token_out, seq_out


CASES = [(c, lvl) for c in ("truncate", "mask") for lvl in ("token", "sequence", "geometric")] + [
    ("seq-mask-truncate", "token")]


@pytest.mark.parametrize("correction, level", CASES)
def test_importance_weights_match_the_per_sequence_reference(correction, level):
    g = torch.Generator().manual_seed(3)
    log_w = 0.15 * torch.randn(8, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 12, generator=g) < 0.8
    mask[2] = False  # an empty row
    bounds = dict(low=0.8, high=1.25, seq_low=0.95, seq_high=1.05)
    weights, token_out, seq_out = LF.importance_weights(log_w, mask, correction=correction, level=level, **bounds)
    ref_w, ref_token, ref_seq = _reference(log_w, mask, correction, level, **bounds)
    torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=1e-12)
    assert torch.equal(token_out, ref_token) and torch.equal(seq_out, ref_seq)
    assert int(seq_out.sum()) < 7  # the bounds keep some sequences
    if level != "geometric" or correction == "seq-mask-truncate":
        assert int(seq_out.sum()) > 0  # and cut others


@pytest.mark.parametrize("correction, level", CASES)
def test_policy_loss_reports_the_weights_it_uses(correction, level):
    cfg = PolicyLossConfig(is_correction=correction, is_level=level, is_low=0.8, is_high=1.25,
                           is_seq_low=0.95, is_seq_high=1.05)
    logits, _, batch = make_batch(21)
    m = mask_of(batch)
    N, M = int(m.sum()) + 2, int(m.any(-1).sum()) + 1
    _, metrics, _, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, GlobalCounts(N, M))
    log_w = torch.where(m, batch["old_logprobs"].double() - batch["behaviour_logprobs"].double(), 0.0)
    w, token_out, seq_out = _reference(log_w, m, correction, level, 0.8, 1.25, 0.95, 1.05)
    assert metric(metrics, "is_weight_mean") == pytest.approx(w[m].sum().item() / N, rel=1e-5)
    assert metric(metrics, "is_outside_frac") == pytest.approx(token_out[m].sum().item() / N, abs=1e-7)
    assert metric(metrics, "is_outside_seq_frac") == pytest.approx(seq_out.sum().item() / M, abs=1e-7)


def test_is_fields_are_validated_naming_the_field():
    with pytest.raises(ValueError, match="^is_level must"):
        PolicyLossConfig(is_level="tokens")
    with pytest.raises(ValueError, match="^is_correction must"):
        PolicyLossConfig(is_correction="seq-mask")
    with pytest.raises(ValueError, match="^is_seq_low must"):
        PolicyLossConfig(is_seq_low=1.2, is_seq_high=1.1)


def case_online_grpo(overrides: list[str], output_dir: str) -> int:
    from tests.test_trainer import _trainer

    return len(_trainer("configs/grpo-tiny-cpu.yaml", overrides, output_dir).train())


def test_megatron_engine_logs_the_mismatch_and_trains_with_seq_mask_tis(ranks4, tmp_path):
    """The default engine's sampling log-probs against the trainer's: equal in fp32 (KV cache vs a
    full forward), logged as mismatch_*; the loss takes them as behaviour log-probs."""
    overrides = ["rollout.sft_warmup_steps=0", "train.steps=2", "train.global_batch_size=16",
                 "train.micro_batch_size=4", "rollout.group_size=4", "rollout.max_new_tokens=4",
                 "rollout.epochs=1", "log.progress=false", "precision.dtype=fp32",
                 "loss.is_correction=seq-mask-truncate"]
    assert ranks4.run(case_online_grpo, overrides, str(tmp_path)) == [2] * 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert 0.0 <= record["mismatch_logprob_max"] <= 1e-5, record
        assert 0.0 <= record["mismatch_logprob_mean"] <= record["mismatch_logprob_max"]
        assert abs(record["mismatch_kl"]) <= 1e-9
        assert record["mismatch_outside_frac"] == record["mismatch_outside_seq_frac"] == 0.0
        # geometric-mean weights within [0.99, 1.01]: no sequence masked, every weight ~1
        assert record["is_outside_seq_frac"] == 0.0
        assert record["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
