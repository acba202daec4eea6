"""Layout invariance: one global batch gives the same loss, gradients and logged metrics at every
TP size, micro-batch count and DP size (gloo ranks; the baseline is one process, one micro-batch).

Each rank takes its DP slice of the rows and its TP slice of the vocabulary, splits the rows into
micro-batches, computes the global counts over the DP group, sums the micro-batch losses and
back-propagates each; the parent reassembles the full [B, S, V] gradient from the shards.
"""

from __future__ import annotations

import math

import pytest
import torch

B, S, PADDED, VOCAB = 8, 6, 40, 37  # PADDED divides by tp = 1, 2, 4

CONFIGS: dict[str, dict] = {
    "grpo": dict(kind="grpo", clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, is_correction="truncate"),
    "grpo-seq-mean": dict(kind="grpo", agg="seq-mean-token-mean", dual_clip=3.0, kl_coef=0.1, kl_estimator="k2"),
    "grpo-drgrpo-gspo": dict(kind="grpo", agg="seq-mean-token-sum-norm", norm_length=10, ratio_level="sequence",
                             clip_low=0.05, clip_high=0.05, is_correction="mask", is_low=0.5, is_high=1.5),
    # Policy objectives (loss.policy_loss) and KL estimators; the step statistics of clip-cov / kl-cov / gpg.
    "grpo-cispo-kl-abs": dict(kind="grpo", policy_loss="cispo", clip_high=0.3, kl_coef=0.1, kl_estimator="abs",
                              is_correction="truncate", is_level="sequence", is_high=3.0),
    "grpo-reinforce-k1plus": dict(kind="grpo", policy_loss="reinforce", agg="seq-mean-token-sum", kl_coef=0.1,
                                  kl_estimator="k1+"),
    "grpo-gpg-k3plus": dict(kind="grpo", policy_loss="gpg", agg="seq-mean-token-mean", kl_coef=0.1,
                            kl_estimator="k3+", kl_output_clamp=5.0),
    "grpo-sapo": dict(kind="grpo", policy_loss="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3, entropy_coef=0.01),
    "grpo-gmpo": dict(kind="grpo", policy_loss="gmpo", clip_low=0.3, clip_high=0.4, is_correction="mask",
                      is_level="geometric", is_low=0.5, is_high=1.5),
    "grpo-clip-cov": dict(kind="grpo", policy_loss="clip-cov", clip_cov_ratio=0.2, clip_cov_lb=0.2, clip_cov_ub=8.0,
                          dual_clip=3.0, cov_seed=3),
    "grpo-kl-cov": dict(kind="grpo", policy_loss="kl-cov", kl_cov_ratio=0.1, kl_cov_coef=0.5,
                        agg="seq-mean-token-sum-norm", norm_length=10),
    "ppo-full-kl": dict(kind="ppo", agg="seq-mean-token-sum", kl_coef=0.2, kl_estimator="full", value_coef=0.5,
                        value_clip=0.2, entropy_coef=0.02, temperature=0.8),
    "dpo": dict(kind="dpo", beta=0.2, label_smoothing=0.1, sft_coef=0.2),
    "dpo-ipo-avg": dict(kind="dpo", loss_type="ipo", average_logprobs=True),
    "sft": dict(kind="sft", label_smoothing=0.1, z_loss_coef=1e-3),
    "sft-focal": dict(kind="sft", focal_gamma=2.0),
    "distill": dict(kind="distill", direction="reverse", temperature=1.5),
    # Preference losses: every loss type, the step statistics of AOT / BCO, LD-DPO, WPO, SFT normalisers.
    "dpo-mix-step-stats": dict(kind="dpo", loss_type=["sigmoid", "bco_pair", "aot", "aot_unpaired"],
                               loss_weights=[1.0, 0.5, 0.5, 0.3], label_smoothing=0.1, sft_coef=0.2,
                               sft_normalizer="chosen_tokens"),
    "dpo-exo-ld": dict(kind="dpo", loss_type="exo_pair", label_smoothing=0.1, ld_alpha=0.5),
    "dpo-robust-wpo": dict(kind="dpo", loss_type="robust", label_smoothing=0.2, use_weighting=True, beta=0.3),
    "dpo-hinge-nca-sppo": dict(kind="dpo", loss_type=["hinge", "nca_pair", "sppo_hard"], loss_weights=[1, 2, 0.1]),
    "dpo-apo-discopop": dict(kind="dpo", loss_type=["apo_zero", "apo_down", "discopop"], average_logprobs=True,
                             sft_coef=0.3, sft_average_logprobs=False, discopop_tau=0.3),
    # Distillation: the generalised JSD over the full vocabulary, top-k teacher distillation.
    "distill-jsd": dict(kind="distill", direction="jsd", jsd_beta=0.3, temperature=1.2),
    "distill-topk": dict(kind="distill", teacher_topk=5, temperature=1.2),
    "distill-topk-renorm-jsd": dict(kind="distill", teacher_topk=5, topk_tail="renormalize", direction="jsd",
                                    jsd_beta=0.6),
}
TOPK = 5


def global_problem(name: str, seed: int):
    """The same global batch on every rank: logits [B, S, V], values [B, S], batch of [B, ...]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, PADDED, generator=g) * 3
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[:, 0] = -100
    labels[1, 2], labels[1, 3] = VOCAB - 1, PADDED // 2  # vocabulary edge, TP shard edge
    loss_mask = (torch.rand(B, S, generator=g) < 0.8).long()
    loss_mask[5] = 0  # an all-masked row (and a padding pair for DPO with row 4)
    if name.startswith("dpo"):
        loss_mask[4] = 0
    logp = torch.log_softmax(logits[..., :VOCAB].double(), -1)
    lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
    batch = {
        "labels": labels,
        "loss_mask": loss_mask,
        "advantages": torch.randn(B, generator=g) if "gspo" in name else torch.randn(B, S, generator=g),
        "old_logprobs": lp + 0.2 * torch.randn(B, S, generator=g),
        "behaviour_logprobs": lp + 0.3 * torch.randn(B, S, generator=g),
        "ref_logits": logits + torch.randn(B, S, PADDED, generator=g),
        "returns": torch.randn(B, S, generator=g),
        "old_values": torch.randn(B, S, generator=g),
    }
    if not name.startswith("dpo"):
        batch["ref_logprobs"] = lp + 0.4 * torch.randn(B, S, generator=g)
    if "topk" in name:  # the teacher's top-k of the full vocabulary (what a teacher ships)
        from mrl.ops import vocab_parallel_topk

        top = vocab_parallel_topk(batch["ref_logits"], TOPK, None, temperature=1.2, vocab_size=VOCAB)
        batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = top.indices, top.logprobs
    if "gpg" in name:  # a zero-advantage row: GPG's α = B/(B − 1)
        batch["advantages"][2] = 0.0
    values = torch.randn(B, S, generator=g)
    return logits, values, batch


def run_layout(names, seed: int, micro: int, tp_group=None, dp_group=None, tp: int = 1, tp_rank: int = 0,
               dp: int = 1, dp_rank: int = 0) -> dict:
    """This rank's share of every config's step: its loss sum, shard gradients and reduced metrics."""
    from mrl.losses import MetricsAccumulator, build_loss, compute_global_counts

    out = {}
    for name in names:
        cfg = CONFIGS[name]
        loss_fn = build_loss(dict(cfg), vocab_size=VOCAB)
        logits, values, batch = global_problem(name, seed)
        rows = B // dp
        mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
        cols = slice(tp_rank * (PADDED // tp), (tp_rank + 1) * (PADDED // tp))
        local_logits = logits[mine][..., cols]
        local = {k: (v[mine][..., cols] if k == "ref_logits" else v[mine]) for k, v in batch.items()}
        step = rows // micro
        chunks = [slice(i, i + step) for i in range(0, rows, step)]
        micro_batches = [{k: v[c] for k, v in local.items()} for c in chunks]
        if getattr(loss_fn, "needs_policy_logprobs", False):  # as the trainer: the policy before the step
            from mrl.ops import vocab_parallel_logprobs

            for c, mb in zip(chunks, micro_batches):
                mb["old_logprobs"] = vocab_parallel_logprobs(local_logits[c], mb["labels"], tp_group, vocab_size=VOCAB)
            loss_fn.prepare_step(micro_batches, dp_group, tp_group)
        if CONFIGS[name].get("policy_loss") in ("clip-cov", "kl-cov", "gpg"):  # as the trainer: step statistics
            loss_fn.prepare_step(micro_batches, dp_group, tp_group)
        counts = compute_global_counts(micro_batches, dp_group, paired=loss_fn.normalizer == "pairs")
        acc = MetricsAccumulator()
        total = torch.zeros(())
        grads, vgrads = [], []
        for c, mb in zip(chunks, micro_batches):
            x = local_logits[c].clone().requires_grad_(True)
            v = values[mine][c].clone().requires_grad_(True)
            loss, metrics = loss_fn((x, v), mb, counts, tp_group)
            loss.backward()
            total += loss.detach()
            acc.add(metrics)
            grads.append(x.grad)
            vgrads.append(torch.zeros_like(v) if v.grad is None else v.grad)
        out[name] = dict(loss=total, grad=torch.cat(grads), vgrad=torch.cat(vgrads), metrics=acc.reduce(dp_group),
                         dp_rank=dp_rank, tp_rank=tp_rank, dp=dp, tp=tp)
    return out


def case_layout(tp: int, micro: int, seed: int, names):
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(tp=tp), timeout_minutes=2)
    return run_layout(names, seed, micro, layout.tp_group, layout.dp_group, tp=tp, tp_rank=layout.tp_rank,
                      dp=layout.dp, dp_rank=layout.dp_rank)


def assemble(results: list[dict], name: str):
    """Global loss, [B, S, V] logits gradient and [B, S] value gradient from the ranks' shards."""
    parts = [r[name] for r in results]
    tp, dp = parts[0]["tp"], parts[0]["dp"]
    rows, cols = B // dp, PADDED // tp
    grad = torch.full((B, S, PADDED), math.nan)
    vgrad = torch.full((B, S), math.nan)
    loss = torch.zeros(())
    for p in parts:
        r = slice(p["dp_rank"] * rows, (p["dp_rank"] + 1) * rows)
        grad[r, :, p["tp_rank"] * cols : (p["tp_rank"] + 1) * cols] = p["grad"]
        vgrad[r] = p["vgrad"]
        if p["tp_rank"] == 0:
            loss += p["loss"]
    per_dp = {p["dp_rank"]: p["loss"].item() for p in parts if p["tp_rank"] == 0}
    for p in parts:  # TP ranks agree on the loss; every rank logs the same reduced metrics
        assert p["loss"].item() == pytest.approx(per_dp[p["dp_rank"]], rel=1e-6)
        assert_same_metrics(p["metrics"], parts[0]["metrics"], 1e-12, f"{name} rank metrics")
    return loss, grad, vgrad, parts[0]["metrics"]


def assert_same(got, want, rel: float, what: str, atol: float = 0.0) -> None:
    """max |got − want| <= rel · max |want| + atol."""
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item()
    assert not math.isnan(err), f"{what}: NaN"
    assert err <= rel * scale + atol, f"{what}: max error {err:.3g} > {rel:g} × {scale:.3g} + {atol:g}"


def assert_same_metrics(got: dict, want: dict, rel: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), f"{what}: {key}"
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), f"{what}: {key}"


NAMES = sorted(CONFIGS)
REL = 2e-6  # fp32: the layouts only change summation order
# A loss is a signed sum whose terms can cancel (advantages of both signs), so its fp32 rounding
# is bounded by the size of the terms, not of the sum: an absolute floor of a few ulps of O(1).
LOSS_ATOL = 5e-8


@pytest.fixture(scope="module")
def baseline():
    res = run_layout(NAMES, seed=0, micro=1)
    return {name: assemble([res], name) for name in NAMES}


def _check(results, baseline, label):
    for name in NAMES:
        loss, grad, vgrad, metrics = assemble(results, name)
        b_loss, b_grad, b_vgrad, b_metrics = baseline[name]
        what = f"{name} {label}"
        assert torch.isfinite(b_loss)
        assert_same(loss, b_loss, REL, f"{what} loss", atol=LOSS_ATOL)
        assert_same(grad, b_grad, REL, f"{what} logits grad")
        assert_same(vgrad, b_vgrad, REL, f"{what} value grad")
        assert_same_metrics(metrics, b_metrics, 1e-5, f"{what} metrics")


@pytest.mark.parametrize("tp,micro", [(4, 1), (4, 4), (2, 1), (2, 2), (1, 1)])
def test_layout_invariance_4_ranks(ranks4, baseline, tp, micro):
    results = ranks4.run(case_layout, tp, micro, 0, NAMES)
    _check(results, baseline, f"tp={tp} dp={4 // tp} micro={micro}")


@pytest.mark.parametrize("tp,micro", [(2, 4), (1, 2)])
def test_layout_invariance_2_ranks(ranks2, baseline, tp, micro):
    results = ranks2.run(case_layout, tp, micro, 0, NAMES)
    _check(results, baseline, f"tp={tp} dp={2 // tp} micro={micro}")


def test_baseline_single_process_micro_batches(baseline):
    """One process: 4 micro-batches with global counts equal 1 micro-batch."""
    res = run_layout(NAMES, seed=0, micro=4)
    _check([res], baseline, "micro=4")
