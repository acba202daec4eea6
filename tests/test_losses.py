"""Loss objects (single process) against float64 references written here from the formulas."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from mrl.losses import (
    DistillLossConfig,
    DPOLossConfig,
    GlobalCounts,
    LossConfig,
    PolicyLossConfig,
    SFTLossConfig,
    build_loss,
    compute_global_counts,
)

D = torch.float64
IGN = -100
VOCAB, PADDED = 37, 40  # real vocabulary and padded logits width


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5) -> None:
    """max |actual − expected| <= rel · max |expected| (fp32 computation vs float64 reference)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.all(torch.isfinite(actual))
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} × {scale:.3g}"


def make_batch(seed: int, B: int = 6, S: int = 9, scale: float = 3.0, per_seq_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, PADDED, generator=g) * scale
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[:, :2] = IGN  # prompt
    labels[0, 3], labels[0, 4] = 0, VOCAB - 1  # vocabulary edges
    loss_mask = (torch.rand(B, S, generator=g) < 0.85).long()
    loss_mask[B // 2] = 0  # an all-masked row
    lp = ref_logprobs(logits, labels, labels != IGN).float()
    batch = {
        "labels": labels,
        "loss_mask": loss_mask,
        "advantages": torch.randn(B, generator=g) if per_seq_adv else torch.randn(B, S, generator=g),
        "old_logprobs": lp + 0.3 * torch.randn(B, S, generator=g),
        "ref_logprobs": lp + 0.5 * torch.randn(B, S, generator=g),
        "behaviour_logprobs": lp + 0.4 * torch.randn(B, S, generator=g),
        "ref_logits": logits + torch.randn(B, S, PADDED, generator=g),
        "returns": torch.randn(B, S, generator=g),
        "old_values": torch.randn(B, S, generator=g),
    }
    values = torch.randn(B, S, generator=g)
    return logits, values, batch


def mask_of(batch) -> torch.Tensor:
    return (batch["labels"] != IGN) & (batch["loss_mask"] != 0)


def ref_log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 log p over the REAL vocabulary [B, S, VOCAB]."""
    z = logits.double()[..., :VOCAB] / temperature
    return z - torch.logsumexp(z, -1, keepdim=True)


def ref_logprobs(logits, labels, mask, temperature: float = 1.0) -> torch.Tensor:
    logp = ref_log_softmax(logits, temperature)
    picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def ref_agg(x, m, mode, N, M, L=None):
    m = m.double()
    if mode == "token-mean":
        return (x * m).sum() / N
    if mode == "seq-mean-token-mean":
        per_seq = [(x[i] * m[i]).sum() / m[i].sum() for i in range(x.shape[0]) if m[i].sum() > 0]
        return torch.stack(per_seq).sum() / M
    if mode == "seq-mean-token-sum":
        return (x * m).sum() / M
    return (x * m).sum() / (M * (x.shape[-1] if L is None else L))


def run_loss(loss_fn, logits, batch, counts, values=None):
    x = logits.clone().requires_grad_(True)
    v = None if values is None else values.clone().requires_grad_(True)
    loss, metrics = loss_fn(x if v is None else (x, v), batch, counts)
    loss.backward()
    return loss, metrics, x.grad, None if v is None else v.grad


def metric(metrics, name) -> float:
    return metrics[name].value.item()


# Policy (GRPO / PPO) ---------------------------------------------------------------------------

def ref_policy_loss(cfg: PolicyLossConfig, logits64, values64, batch, N, M):
    """The GRPO/PPO loss of the module docstring, term by term, in float64."""
    m = mask_of(batch)
    md = m.double()
    T = cfg.temperature
    lp = ref_logprobs(logits64, batch["labels"], m, T)
    logp_full = ref_log_softmax(logits64, T)
    old = torch.where(m, batch["old_logprobs"].double(), 0.0)
    adv = batch["advantages"].double()
    adv = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    if cfg.ratio_level == "sequence":
        seq = ((lp - old) * md).sum(-1) / md.sum(-1).clamp_min(1)
        ratio = torch.exp(seq.detach()).unsqueeze(-1) * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
    if cfg.is_correction != "none":
        w = torch.exp(batch["old_logprobs"].double() - batch["behaviour_logprobs"].double())
        if cfg.is_correction == "truncate":
            w = w.clamp(cfg.is_low, cfg.is_high)
        else:
            w = torch.where((w < cfg.is_low) | (w > cfg.is_high), 0.0, w)
        pg = pg * w
    terms = {"policy_loss": ref_agg(pg, m, cfg.agg, N, M, cfg.norm_length)}
    entropy = -(logp_full.exp() * logp_full).sum(-1)
    terms["entropy"] = ref_agg(entropy, m, cfg.agg, N, M, cfg.norm_length)
    total = terms["policy_loss"] - cfg.entropy_coef * terms["entropy"]
    if cfg.kl_coef > 0:
        if cfg.kl_estimator == "full":
            ref_full = ref_log_softmax(batch["ref_logits"], T)
            kl = (logp_full.exp() * (logp_full - ref_full)).sum(-1)
        else:
            logr = batch["ref_logprobs"].double() - lp
            if cfg.kl_log_ratio_clamp is not None:
                logr = logr.clamp(-cfg.kl_log_ratio_clamp, cfg.kl_log_ratio_clamp)
            kl = {"k1": -logr, "k2": logr**2 / 2, "k3": torch.exp(logr) - 1 - logr}[cfg.kl_estimator]
            if cfg.kl_output_clamp is not None:
                kl = kl.clamp(-cfg.kl_output_clamp, cfg.kl_output_clamp)
        terms["kl"] = ref_agg(kl, m, cfg.agg, N, M, cfg.norm_length)
        total = total + cfg.kl_coef * terms["kl"]
    if cfg.value_coef > 0:
        R = batch["returns"].double()
        vl = 0.5 * (values64 - R) ** 2
        if cfg.value_clip is not None:
            old_v = batch["old_values"].double()
            v_clip = old_v + (values64 - old_v).clamp(-cfg.value_clip, cfg.value_clip)
            vl = torch.maximum(vl, 0.5 * (v_clip - R) ** 2)
        terms["value_loss"] = ref_agg(vl, m, cfg.agg, N, M, cfg.norm_length)
        total = total + cfg.value_coef * terms["value_loss"]
    terms["loss"] = total
    return terms


POLICY_CONFIGS = {
    "grpo-default": dict(),
    "dapo-dual-kl3-entropy": dict(
        clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", kl_log_ratio_clamp=1.0,
        kl_output_clamp=2.0, entropy_coef=0.01, temperature=0.7, agg="seq-mean-token-mean",
    ),
    "k1-truncated-is": dict(kl_coef=0.1, kl_estimator="k1", is_correction="truncate", is_low=0.5, is_high=1.5,
                            agg="seq-mean-token-sum"),
    "k2-masked-is-drgrpo": dict(kl_coef=0.1, kl_estimator="k2", is_correction="mask", is_low=0.7, is_high=1.4,
                                agg="seq-mean-token-sum-norm", norm_length=12),
    "gspo": dict(ratio_level="sequence", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean"),
    "ppo-full-kl-value": dict(kind="ppo", kl_coef=0.2, kl_estimator="full", value_coef=0.5, value_clip=0.3,
                              entropy_coef=0.02),
}


@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_policy_loss_matches_reference(name):
    cfg = PolicyLossConfig(**POLICY_CONFIGS[name])
    logits, values, batch = make_batch(10, per_seq_adv=(name == "gspo"))
    m = mask_of(batch)
    N, M = int(m.sum()) + 5, int(m.any(-1).sum()) + 2  # as if other ranks held more data
    loss_fn = build_loss(cfg, vocab_size=VOCAB)
    with_values = cfg.value_coef > 0
    loss, metrics, grad, vgrad = run_loss(loss_fn, logits, batch, GlobalCounts(N, M), values if with_values else None)

    x64 = logits.double().requires_grad_(True)
    v64 = values.double().requires_grad_(True)
    terms = ref_policy_loss(cfg, x64, v64, batch, N, M)
    terms["loss"].backward()
    assert_rel(loss.detach(), terms["loss"].detach())
    assert_rel(grad, x64.grad)
    assert torch.all(grad[..., VOCAB:] == 0)  # padded columns get no gradient
    if with_values:
        assert_rel(vgrad, v64.grad)
    for key, ref in terms.items():
        assert metric(metrics, key) == pytest.approx(ref.item(), rel=2e-5, abs=1e-7), key
    assert metric(metrics, "num_tokens") == int(m.sum()) and metric(metrics, "num_seqs") == int(m.any(-1).sum())


def test_policy_loss_metrics_are_token_fractions():
    cfg = PolicyLossConfig(clip_high=0.28, is_correction="truncate", is_high=1.2)
    logits, _, batch = make_batch(11)
    m = mask_of(batch)
    N = int(m.sum()) + 3
    _, metrics, _, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, GlobalCounts(N, 99))
    lp = ref_logprobs(logits, batch["labels"], m)
    r = torch.exp(lp - batch["old_logprobs"].double())[m]
    A = batch["advantages"].double()[m]
    assert metric(metrics, "clip_frac_low") == pytest.approx(((A < 0) & (r < 0.8)).sum().item() / N, abs=1e-7)
    assert metric(metrics, "clip_frac_high") == pytest.approx(((A > 0) & (r > 1.28)).sum().item() / N, abs=1e-7)
    assert metric(metrics, "ratio_mean") == pytest.approx(r.sum().item() / N, rel=1e-5)
    assert metric(metrics, "ratio_min") == pytest.approx(r.min().item(), rel=1e-5)
    assert metric(metrics, "ratio_max") == pytest.approx(r.max().item(), rel=1e-5)
    assert metric(metrics, "approx_kl") == pytest.approx((r - 1 - r.log()).sum().item() / N, rel=1e-4)
    w = torch.exp(batch["old_logprobs"].double() - batch["behaviour_logprobs"].double())[m]
    assert metric(metrics, "is_weight_mean") == pytest.approx(w.clamp(0, 1.2).sum().item() / N, rel=1e-5)
    assert metric(metrics, "is_weight_max") == pytest.approx(w.max().item(), rel=1e-5)
    assert metric(metrics, "is_outside_frac") == pytest.approx((w > 1.2).sum().item() / N, abs=1e-7)
    assert metric(metrics, "advantage_mean") == pytest.approx(A.sum().item() / N, rel=1e-5)


def test_policy_loss_hostile_logits_and_bf16():
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="full", entropy_coef=0.01)
    logits, _, batch = make_batch(12)
    logits = torch.where(torch.rand(logits.shape, generator=torch.Generator().manual_seed(0)) < 0.5, 1e4, -1e4)
    logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    batch["ref_logits"] = -logits
    m = mask_of(batch)
    counts = GlobalCounts(int(m.sum()), int(m.any(-1).sum()))
    loss, _, grad, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, counts)
    x64 = logits.double().requires_grad_(True)
    ref = ref_policy_loss(cfg, x64, None, batch, counts.num_tokens, counts.num_seqs)["loss"]
    ref.backward()
    assert_rel(loss.detach(), ref.detach(), rel=1e-4)
    assert_rel(grad, x64.grad, rel=1e-4)
    # bf16 logits: the loss equals the reference on the bf16 values (computed in fp32 inside)
    logits, _, batch = make_batch(13)
    lb = logits.bfloat16()
    loss, _, grad, _ = run_loss(build_loss(PolicyLossConfig(entropy_coef=0.01), vocab_size=VOCAB), lb, batch, counts)
    assert grad.dtype == torch.bfloat16
    x64 = lb.double().requires_grad_(True)
    cfg = PolicyLossConfig(entropy_coef=0.01)
    ref = ref_policy_loss(cfg, x64, None, batch, counts.num_tokens, counts.num_seqs)["loss"]
    ref.backward()
    assert_rel(loss.detach(), ref.detach())
    assert_rel(grad, x64.grad, rel=1e-2)


# DPO -------------------------------------------------------------------------------------------

def make_pairs(seed: int, pairs: int = 4, S: int = 8):
    logits, _, batch = make_batch(seed, B=2 * pairs, S=S)
    batch["loss_mask"] = torch.ones_like(batch["loss_mask"])
    batch["loss_mask"][2:4] = 0  # a padding pair (both rows empty)
    del batch["ref_logprobs"]  # the reference comes from ref_logits unless a test says otherwise
    return logits, batch


def ref_dpo(cfg: DPOLossConfig, logits64, batch, P):
    m = mask_of(batch)
    lp = ref_logprobs(logits64, batch["labels"], m)
    ref = ref_logprobs(batch["ref_logits"], batch["labels"], m)

    def reduce(x):
        s = (x * m).sum(-1)
        return s / m.sum(-1).clamp_min(1) if cfg.average_logprobs else s

    seq, ref_seq = reduce(lp), reduce(ref)
    total = torch.zeros((), dtype=D)
    sft = torch.zeros((), dtype=D)
    for i in range(0, seq.shape[0], 2):
        if not (m[i].any() and m[i + 1].any()):
            continue
        delta = (seq[i] - ref_seq[i]) - (seq[i + 1] - ref_seq[i + 1])
        if cfg.loss_type == "sigmoid":
            e = cfg.label_smoothing
            bd = cfg.beta * delta
            total = total - (1 - e) * torch.log(torch.sigmoid(bd)) - e * torch.log(torch.sigmoid(-bd))
        else:
            total = total + (delta - 1 / (2 * cfg.beta)) ** 2
        sft = sft - seq[i]
    return total / P + cfg.sft_coef * sft / P, ref_seq


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(label_smoothing=0.1, sft_coef=0.3, average_logprobs=True, beta=0.5),
        dict(loss_type="ipo", average_logprobs=True),
    ],
)
def test_dpo_loss_matches_reference_for_every_reference_source(kwargs):
    cfg = DPOLossConfig(**kwargs)
    logits, batch = make_pairs(20)
    counts = compute_global_counts([batch], paired=True)
    assert counts.num_pairs == 3
    counts = GlobalCounts(counts.num_tokens, counts.num_seqs, num_pairs=5)
    x64 = logits.double().requires_grad_(True)
    ref, ref_seq = ref_dpo(cfg, x64, batch, 5)
    ref.backward()
    sources = {
        "ref_logits": batch["ref_logits"],
        "ref_logprobs": ref_logprobs(batch["ref_logits"], batch["labels"], mask_of(batch)).float(),
        "ref_seq_logps": ref_seq.detach().float(),
    }
    for key, value in sources.items():
        b = {k: v for k, v in batch.items() if k not in ("ref_logits", "ref_logprobs")} | {key: value}
        loss, metrics, grad, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, b, counts)
        assert_rel(loss.detach(), ref.detach())
        assert_rel(grad, x64.grad)
        assert metric(metrics, "num_pairs") == 3
        assert metric(metrics, "loss") == pytest.approx(ref.item(), rel=2e-5)
    assert torch.all(grad[2:4] == 0)


def test_dpo_loss_reward_metrics_are_beta_scaled():
    cfg = DPOLossConfig(beta=0.25)
    logits, batch = make_pairs(21)
    counts = compute_global_counts([batch], paired=True)
    _, metrics, _, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, counts)
    m = mask_of(batch)
    seq = (ref_logprobs(logits, batch["labels"], m)).sum(-1)
    ref = (ref_logprobs(batch["ref_logits"], batch["labels"], m)).sum(-1)
    keep = torch.tensor([0, 2, 3])  # pair 1 is padding
    chosen, rejected = (seq - ref)[0::2][keep], (seq - ref)[1::2][keep]
    assert metric(metrics, "chosen_reward") == pytest.approx(0.25 * chosen.mean().item(), rel=1e-5)
    assert metric(metrics, "rejected_reward") == pytest.approx(0.25 * rejected.mean().item(), rel=1e-5)
    assert metric(metrics, "reward_margin") == pytest.approx(0.25 * (chosen - rejected).mean().item(), rel=1e-5)
    assert metric(metrics, "accuracy") == pytest.approx((chosen > rejected).double().mean().item())
    assert metric(metrics, "chosen_logps") == pytest.approx(seq[0::2][keep].mean().item(), rel=1e-5)


# SFT -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(label_smoothing=0.1), dict(focal_gamma=2.0, focal_alpha=0.5), dict(focal_gamma=0.5),
     dict(z_loss_coef=1e-3)],
)
def test_sft_loss_matches_reference(kwargs):
    cfg = SFTLossConfig(**kwargs)
    logits, _, batch = make_batch(30)
    m = mask_of(batch)
    N = int(m.sum()) + 7
    loss, metrics, grad, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, GlobalCounts(N, 0))
    x64 = logits.double().requires_grad_(True)
    logp = ref_log_softmax(x64)
    lp = ref_logprobs(x64, batch["labels"], m)
    if cfg.label_smoothing:
        e = cfg.label_smoothing
        per = -(1 - e) * lp - e / VOCAB * logp.sum(-1)
    elif cfg.focal_gamma:
        per = -cfg.focal_alpha * (1 - lp.exp()) ** cfg.focal_gamma * lp
    else:
        per = -lp
    ref = (per * m).sum() / N
    if cfg.z_loss_coef:
        z = torch.logsumexp(x64[..., :VOCAB], -1)
        ref = ref + cfg.z_loss_coef * (z**2 * m).sum() / N
    ref.backward()
    assert_rel(loss.detach(), ref.detach())
    assert_rel(grad, x64.grad)
    assert metric(metrics, "loss") == pytest.approx(ref.item(), rel=2e-5)


# Distillation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distill_loss_matches_reference(direction):
    cfg = DistillLossConfig(direction=direction, temperature=2.0)
    logits, _, batch = make_batch(40)
    m = mask_of(batch)
    N = int(m.sum())
    loss, _, grad, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, GlobalCounts(N, 0))
    x64 = logits.double().requires_grad_(True)
    student = ref_log_softmax(x64, 2.0)
    teacher = ref_log_softmax(batch["ref_logits"], 2.0)
    p, q = (student, teacher) if direction == "reverse" else (teacher, student)
    ref = ((p.exp() * (p - q)).sum(-1) * m).sum() / N
    ref.backward()
    assert_rel(loss.detach(), ref.detach())
    assert_rel(grad, x64.grad)


# Bad input, empty input ------------------------------------------------------------------------

ALL_CONFIGS = [
    PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, kl_estimator="full"),
    PolicyLossConfig(kind="ppo", kl_coef=0.1, value_coef=0.5, value_clip=0.2, is_correction="mask"),
    DPOLossConfig(sft_coef=0.1),
    SFTLossConfig(z_loss_coef=1e-3, focal_gamma=1.0),
    DistillLossConfig(),
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.kind)
def test_all_masked_micro_batch_contributes_zero(cfg):
    logits, values, batch = make_batch(50, B=4)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    for key in ("old_logprobs", "ref_logprobs", "behaviour_logprobs", "advantages"):
        batch[key] = torch.full_like(batch[key], math.nan)  # garbage where nothing is valid
    counts = GlobalCounts(num_tokens=0, num_seqs=0, num_pairs=0)
    loss, metrics, grad, vgrad = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, counts,
                                          values if getattr(cfg, "value_coef", 0) else None)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)
    assert vgrad is None or torch.all(vgrad == 0)
    for name, m in metrics.items():
        if m.reduction in ("sum", "count"):
            assert m.value.item() == 0.0, name


def test_bad_inputs_raise_naming_the_tensor():
    loss_fn = build_loss(PolicyLossConfig(kl_coef=0.1, is_correction="truncate"), vocab_size=VOCAB)
    logits, _, batch = make_batch(60)
    counts = compute_global_counts([batch])

    def raises(b, match, output=logits):
        with pytest.raises(ValueError, match=match):
            loss_fn(output, b, counts)

    for key in ("advantages", "old_logprobs", "ref_logprobs", "behaviour_logprobs"):
        raises({k: v for k, v in batch.items() if k != key}, key)
        bad = dict(batch)
        bad[key] = batch[key].clone()
        bad[key][0, 5] = math.nan
        raises(bad, key)
        bad[key] = batch[key][:, :-1]
        raises(bad, key)
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][1, 4] = VOCAB  # a padded column is not a token
    raises(bad, "labels outside the vocabulary")
    bad["labels"][1, 4] = -3
    raises(bad, "labels outside the vocabulary")
    raises(batch, "logits", output=logits[:, :-1])
    raises(dict(batch, loss_mask=batch["loss_mask"][:-1]), "loss_mask")
    # NaN / out-of-range values where nothing is valid are fine
    ok = dict(batch, labels=batch["labels"].clone(), advantages=batch["advantages"].clone())
    ok["labels"][:, 0] = IGN
    ok["advantages"][:, 0] = math.inf
    loss, _ = loss_fn(logits, ok, counts)
    assert torch.isfinite(loss)
    ppo = build_loss(PolicyLossConfig(value_coef=1.0))
    with pytest.raises(ValueError, match="values"):
        ppo(logits, batch, counts)
    with pytest.raises(ValueError, match="num_pairs"):
        build_loss(DPOLossConfig())(logits, dict(batch, ref_seq_logps=torch.zeros(6)), counts)
    with pytest.raises(ValueError, match="ref_seq_logps"):
        build_loss(DPOLossConfig())(logits, {"labels": batch["labels"]}, GlobalCounts(1, 1, 1))


# Configs and the factory -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (PolicyLossConfig, dict(clip_low=-0.1), "clip_low"),
        (PolicyLossConfig, dict(clip_low=1.0), "clip_low"),
        (PolicyLossConfig, dict(dual_clip=0.5), "dual_clip"),
        (PolicyLossConfig, dict(agg="token-sum"), "agg"),
        (PolicyLossConfig, dict(kl_estimator="k4"), "kl_estimator"),
        (PolicyLossConfig, dict(entropy_coef=-1.0), "entropy_coef"),
        (PolicyLossConfig, dict(is_low=2.0, is_high=1.0), "is_low"),
        (PolicyLossConfig, dict(value_clip=0.0), "value_clip"),
        (PolicyLossConfig, dict(kind="dpo"), "kind"),
        (PolicyLossConfig, dict(chunk_size=0), "chunk_size"),
        (DPOLossConfig, dict(beta=0.0), "beta"),
        (DPOLossConfig, dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (DPOLossConfig, dict(loss_type="kto"), "loss_type"),
        (SFTLossConfig, dict(label_smoothing=1.0), "label_smoothing"),
        (SFTLossConfig, dict(focal_gamma=1.0, label_smoothing=0.1), "focal_gamma"),
        (SFTLossConfig, dict(z_loss_coef=-1.0), "z_loss_coef"),
        (DistillLossConfig, dict(direction="both"), "direction"),
        (DistillLossConfig, dict(temperature=0.0), "temperature"),
    ],
)
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):  # bare: the converter adds the path (loss.)
        cls(**kwargs)


def test_build_loss_by_kind_and_declared_keys():
    assert build_loss({"kind": "ppo", "value_coef": 0.5}).required_keys == (
        "labels", "advantages", "old_logprobs", "returns")
    grpo = build_loss({"kind": "grpo", "kl_coef": 0.1, "is_correction": "mask"})
    assert grpo.required_keys == ("labels", "advantages", "old_logprobs", "ref_logprobs", "behaviour_logprobs")
    assert grpo.normalizer == "tokens"
    assert build_loss({"kind": "grpo", "agg": "seq-mean-token-mean"}).normalizer == "seqs"
    assert build_loss({"kind": "grpo", "kl_coef": 0.1, "kl_estimator": "full"}).required_keys[-1] == "ref_logits"
    assert build_loss({"kind": "dpo"}).normalizer == "pairs"
    assert build_loss({"kind": "sft"}).required_keys == ("labels",)
    assert build_loss({"kind": "distill"}).required_keys == ("labels", "ref_logits")
    with pytest.raises(ValueError, match="loss.kind"):
        build_loss({"kind": "rlhf"})
    with pytest.raises(ValueError, match="clip_ratio"):
        build_loss({"kind": "grpo", "clip_ratio": 0.2})
    with pytest.raises(ValueError, match="SFTLossConfig"):
        build_loss(_mislabelled_sft())


def _mislabelled_sft():
    cfg = PolicyLossConfig()
    object.__setattr__(cfg, "kind", "sft")
    return cfg


@dataclass
class _Job:
    loss: LossConfig = field(default_factory=PolicyLossConfig)
    """The loss."""


def test_loss_config_union_reads_yaml_mappings_by_kind():
    from mrl.config import ConfigError, load_config

    Job = _Job
    cases = [
        ({"kind": "dpo", "beta": 0.2}, DPOLossConfig),
        ({"kind": "ppo", "value_coef": 1.0}, PolicyLossConfig),
        ({"kind": "sft"}, SFTLossConfig),
        ({"kind": "distill"}, DistillLossConfig),
    ]
    for data, cls in cases:
        config = load_config({"loss": data}, Job).loss
        assert type(config) is cls and config.kind == data["kind"]
        assert build_loss(config).kind == data["kind"]
    with pytest.raises(ConfigError):
        load_config({"loss": {"kind": "dpo", "clip_low": 0.1}}, Job)
