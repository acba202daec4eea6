"""The fused LM head against the unfused ops and a float64 single-process reference, at TP 1, 2, 4.

Every rank holds the replicated hidden states ``h [B, S, H]`` and its rows of the output weight
``W [V/tp, H]``; the reference computes the same functions on ``h · W_fullᵀ`` in float64. ``∂h`` is
per-rank partial (the model all-reduces it over TP), so the cases all-reduce it before comparing.
"""

from __future__ import annotations

import json

import pytest
import torch

B, S, H = 2, 7, 24
IGNORE = -100


def _inputs(tp_rank: int, tp: int, *, vocab: int, padded: int, scale: float, seed: int, ignore_all_row: bool):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=gen, dtype=torch.float64)
    w_full = torch.randn(padded, H, generator=gen, dtype=torch.float64) * scale / H**0.5
    w_ref = torch.randn(padded, H, generator=gen, dtype=torch.float64) * scale / H**0.5
    labels = torch.randint(0, vocab, (B, S), generator=gen)
    shard = padded // tp
    labels[0, 0], labels[0, 1], labels[1, 2] = min(shard, vocab) - 1, shard % vocab, vocab - 1  # shard edges
    labels[1, 3] = IGNORE
    if ignore_all_row:
        labels[1] = IGNORE
    upstream = torch.randn(6, B, S, generator=gen, dtype=torch.float64)
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)
    return h, w_full, w_ref, labels, upstream, rows


def _functions(ops, head, head_ref, labels, group, vocab, temperature):
    """The outputs every path computes: log p, H, lse, smoothed CE, z-loss lse, KL to the reference head."""
    stats = ops.vocab_parallel_softmax_stats(head, labels, group, entropy=True, logsumexp=True,
                                             temperature=temperature, vocab_size=vocab, chunk_size=3)
    ce = ops.vocab_parallel_cross_entropy(head, labels, group, label_smoothing=0.1, vocab_size=vocab, chunk_size=4)
    lse1 = ops.vocab_parallel_logsumexp(head, group, vocab_size=vocab, chunk_size=5)
    kl = ops.vocab_parallel_kl(head, head_ref, group, temperature=temperature, vocab_size=vocab, chunk_size=3)
    return [stats.logprobs, stats.entropy, stats.logsumexp, ce, lse1, kl]


def _reference(h, w_full, w_ref, labels, upstream, vocab, temperature):
    h = h.clone().requires_grad_(True)
    w = w_full.clone().requires_grad_(True)
    z = (h @ w.t())[..., :vocab]  # [B, S, V] float64
    zt = z / temperature
    logp_all = zt.log_softmax(-1)
    kept = labels != IGNORE
    safe = labels.clamp(min=0)
    logp = torch.where(kept, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    lse = zt.logsumexp(-1)
    raw = z.log_softmax(-1)
    nll = -raw.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ce = torch.where(kept, 0.9 * nll + 0.1 * (-raw.mean(-1)), 0.0)
    lse1 = z.logsumexp(-1)
    q = ((h.detach() @ w_ref.t())[..., :vocab] / temperature).log_softmax(-1)
    kl = (logp_all.exp() * (logp_all - q)).sum(-1)
    outs = [logp, entropy, lse, ce, lse1, kl]
    total = sum((u * o).sum() for u, o in zip(upstream, outs))
    total.backward()
    return [o.detach() for o in outs], h.grad, w.grad


def case_fused_head(tp: int, vocab: int, padded: int, scale: float, temperature: float, dtype_name: str,
                    ignore_all_row: bool):
    import torch.distributed as dist

    from mrl import ops
    from mrl.ops.fused_head import FusedHead
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(tp=tp), timeout_minutes=2)
    group = layout.tp_group
    dtype = getattr(torch, dtype_name)
    h64, w_full, w_ref, labels, upstream, rows = _inputs(layout.tp_rank, tp, vocab=vocab, padded=padded,
                                                         scale=scale, seed=17, ignore_all_row=ignore_all_row)
    results = {}
    for path in ("fused", "fused-tiled", "unfused"):
        h = h64.to(dtype).requires_grad_(True)
        w = w_full[rows].to(dtype).requires_grad_(True)
        w_q = w_ref[rows].to(dtype)
        if path != "unfused":  # "fused-tiled": blocks of 5 vocabulary columns (a shard's last one shorter)
            cols = 5 if path == "fused-tiled" else None
            head = FusedHead(h, w, fp32=True, tile_cols=cols)
            head_ref = FusedHead(h.detach(), w_q, fp32=True, tile_cols=cols)
        else:
            head, head_ref = h.float() @ w.float().t(), (h.detach().float() @ w_q.float().t())
        outs = _functions(ops, head, head_ref, labels, group, vocab, temperature)
        total = sum((u.float() * o).sum() for u, o in zip(upstream, outs))
        total.backward()
        grad_h = h.grad.double()
        if tp > 1:
            dist.all_reduce(grad_h, group=group)  # what the model's TP region does
        results[path] = ([o.detach().double() for o in outs], grad_h, w.grad.double())
    ref_outs, ref_h, ref_w = _reference(h64, w_full, w_ref, labels, upstream, vocab, temperature)
    layout.destroy()

    def worst(a, b):
        return max(float(((x - y).abs() / (1.0 + y.abs())).max()) for x, y in zip(a, b))

    errors = {}
    for path, (outs, gh, gw) in results.items():
        errors[path] = (worst(outs, ref_outs), worst([gh], [ref_h]), worst([gw], [ref_w[rows]]))
    unfused = results["unfused"]
    for path in ("fused", "fused-tiled"):
        fused = results[path]
        errors[f"{path}-vs-unfused"] = (worst(fused[0], unfused[0]), worst([fused[1]], [unfused[1]]),
                                        worst([fused[2]], [unfused[2]]))
    return errors


CASES = {
    # name: (vocab, padded vocabulary, logit scale, temperature, dtype, a row with every label ignored)
    "plain": (64, 64, 3.0, 1.0, "float32", False),
    "padded-vocab-temperature": (61, 64, 3.0, 0.7, "float32", True),
    "logits-1e4": (64, 64, 1e4, 1.0, "float32", False),
}


def _check(errors, tolerance):
    for path, (values, grad_h, grad_w) in errors.items():
        assert values <= tolerance and grad_h <= tolerance and grad_w <= tolerance, (path, errors)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_head_matches_float64_and_the_unfused_ops(ranks2, tp, name):
    vocab, padded, scale, temperature, dtype, ignore_row = CASES[name]
    errors = ranks2.run(case_fused_head, tp, vocab, padded, scale, temperature, dtype, ignore_row)[0]
    if scale < 100:
        _check(errors, 1e-5)
    else:  # fp32 logits of size 1e4 carry ~1e-3 rounding; the fused head must be no worse than the unfused
        for path in ("fused", "fused-tiled"):
            for fused, unfused in zip(errors[path], errors["unfused"]):
                assert fused <= 2 * unfused + 1e-6, errors
            assert errors[f"{path}-vs-unfused"][0] <= 1e-5, errors


def test_fused_head_at_tp4(ranks4):
    results = ranks4.run(case_fused_head, 4, 61, 64, 3.0, 0.7, "float32", True)
    for errors in results:
        _check(errors, 1e-5)


def test_fused_head_bf16(ranks2):
    results = ranks2.run(case_fused_head, 2, 64, 64, 3.0, 1.0, "bfloat16", False)
    errors = results[0]
    for path in ("fused", "fused-tiled"):
        assert errors[f"{path}-vs-unfused"][0] <= 1e-2
        assert max(errors[path]) <= 5e-2  # bf16 inputs against float64 math on the unrounded inputs


# ---- Wired through the model: training curves with model.fused_head equal the unfused ones ----------

FUSED_RUNS = {
    # name: (recipe, overrides shared by both runs)
    "sft-smoothing-zloss": ("configs/sft-tiny-cpu.yaml", ["loss.label_smoothing=0.1", "loss.z_loss_coef=1e-3"]),
    "sft-focal": ("configs/sft-tiny-cpu.yaml", ["loss.focal_gamma=1.0"]),
    "sft-tied-sp": ("configs/sft-tiny-cpu.yaml", [
        "model.tie_embeddings=true", "parallel.sequence_parallel=true", "model.vocab_size=300"]),
    "dpo": ("configs/dpo-tiny-cpu.yaml", []),
    "offline-grpo-entropy-full-kl": ("configs/offline-grpo-tiny-cpu.yaml", [
        "loss.entropy_coef=0.01", "loss.kl_estimator=full", "reference.keep_logits=true"]),
    "offline-ppo-value-head": ("configs/offline-grpo-tiny-cpu.yaml", [
        "loss.kind=ppo", "loss.value_coef=0.5", "model.value_head=true"]),
}
SHORT_RUN = ["train.steps=3", "train.global_batch_size=16", "train.micro_batch_size=4", "scheduler.warmup_steps=1",
             "log.progress=false", "parallel.tp=2", "parallel.pp=2"]


@pytest.mark.parametrize("name", list(FUSED_RUNS))
def test_training_curves_with_the_fused_head_equal_the_unfused(ranks4, tmp_path, name):
    from tests.test_trainer import _assert_same_curve, case_curve

    recipe, overrides = FUSED_RUNS[name]
    base = [*SHORT_RUN, *overrides]
    unfused = ranks4.run(case_curve, recipe, [*base, "model.fused_head=false"], str(tmp_path / "unfused"))[-1]
    fused = ranks4.run(case_curve, recipe, [*base, "model.fused_head=true"], str(tmp_path / "fused"))[-1]
    assert all(abs(loss) > 0 for loss, _ in unfused)
    _assert_same_curve(fused, unfused)


def test_online_grpo_with_the_fused_head_equals_the_unfused(ranks4, tmp_path):
    """Sampling (last-token logits), old/reference log-probs and the loss all go through the fused head."""
    from tests.test_trainer import case_online_grpo

    overrides = ["rollout.sft_warmup_steps=2", "rollout.epochs=2", "train.steps=2", "train.global_batch_size=16",
                 "train.micro_batch_size=4", "rollout.group_size=4", "rollout.max_new_tokens=4", "log.progress=false"]
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    unfused = ranks4.run(case_online_grpo, [*overrides, "model.fused_head=false"], str(tmp_path / "a"))[-1]
    fused = ranks4.run(case_online_grpo, [*overrides, "model.fused_head=true"], str(tmp_path / "b"))[-1]
    assert fused["losses"] == pytest.approx(unfused["losses"], rel=1e-5)
    a, b = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("a", "b"))
    assert [json.loads(x)["reward_mean"] for x in a] == [json.loads(x)["reward_mean"] for x in b]


def test_weight_gradient_can_accumulate_straight_into_main_grad():
    """Megatron's gradient-accumulation fusion: ∂W is added to ``weight.main_grad`` (fp32) and the
    returned gradient is a zero placeholder with ``grad_added_to_main_grad`` set, as DDP expects."""
    from mrl import ops
    from mrl.ops.fused_head import FusedHead

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    ops.vocab_parallel_logprobs(FusedHead(h, w), labels).sum().backward()
    expected = w.grad.clone()
    w.grad = None
    w.main_grad = torch.full_like(w, 0.5)
    ops.vocab_parallel_logprobs(FusedHead(h, w, accumulate_main_grad=True), labels).sum().backward()
    assert torch.allclose(w.main_grad, expected + 0.5, atol=1e-6)
    assert w.grad_added_to_main_grad and torch.count_nonzero(w.grad) == 0
