"""Distillation variants: the generalised JSD of GKD and top-k teacher distillation.

Ops (``vocab_parallel_jsd``, ``vocab_parallel_logprobs_at``) against float64 references on the full
logits at TP 1/2/4 (the harness of ``tests/test_ops.py``); the loss (``DistillLoss`` with
``direction: jsd`` / ``teacher_topk``) against float64 references written here from the formulas,
on random inputs and on hand-computed cases; hostile inputs; shape and value errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_ops import (
    B,
    PADDED_V,
    T,
    TOL,
    TRUE_V,
    _assert_small,
    _Check,
    _full_logits,
    _layout,
    _ref_kl,
    _ref_logp,
    _shard,
)

D = torch.float64


def ref_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD_β(p‖q) = β·KL(p‖M) + (1 − β)·KL(q‖M), M = β·p + (1 − β)·q (p teacher, q student)."""
    if beta == 0.0:
        return _ref_kl(logp, logq)
    if beta == 1.0:
        return _ref_kl(logq, logp)
    m = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))  # log M, finite where both underflow
    return beta * _ref_kl(logp, m) + (1.0 - beta) * _ref_kl(logq, m)


def _ids(gen, tp: int, vocab: int, k: int) -> torch.Tensor:
    """[B, T, k] distinct ids per row, the first rows holding both edges of every shard."""
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(B * T)]).view(B, T, k)
    local = PADDED_V // tp
    edges = [e for r in range(tp) for e in (r * local, (r + 1) * local - 1) if e < vocab] + [vocab - 1]
    for i, edge in enumerate(edges):
        row = ids.view(-1, k)[i]
        if edge not in row:
            row[0] = edge
    return ids


# Ops at TP 1/2/4 ------------------------------------------------------------------------------


def case_ops(tp: int, seed: int, dtype_name: str, chunk_size):
    from mrl import ops

    dtype = getattr(torch, dtype_name)
    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed * 100 + layout.dp_rank)
    check = _Check(tp, layout.tp_rank)
    for vocab, vs in ((PADDED_V, None), (TRUE_V, TRUE_V)):
        tag, kw = f"V={vocab}", dict(vocab_size=vs, chunk_size=chunk_size)
        p, q = _full_logits(gen, dtype, scale=2.0), _full_logits(gen, dtype)
        for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
            check(f"{tag} jsd beta={beta} T=1.3",
                  lambda a, b: ops.vocab_parallel_jsd(a, b, group, beta=beta, temperature=1.3, **kw),
                  lambda a, b: ref_jsd(_ref_logp(a, vocab, 1.3), _ref_logp(b, vocab, 1.3), beta), [p, q], gen)
        ids = _ids(gen, tp, vocab, 5)
        check(f"{tag} logprobs_at T=0.8",
              lambda s: ops.vocab_parallel_logprobs_at(s, ids, group, temperature=0.8, **kw),
              lambda f: _ref_logp(f, vocab, 0.8).gather(-1, ids), [q], gen)
        check(f"{tag} logprobs_at with rest",
              lambda s: torch.cat([a if a.dim() == 3 else a.unsqueeze(-1)
                                   for a in ops.vocab_parallel_logprobs_at(s, ids, group, rest=True, **kw)], -1),
              lambda f: _ref_at_and_rest(_ref_logp(f, vocab), ids), [q], gen)
        # The rest keeps its precision when the ids hold almost all the mass (1 − Σ would not).
        peaked = q.clone()
        peaked.scatter_(-1, ids, 40.0)
        check(f"{tag} logprobs_at rest of a peaked row",
              lambda s: ops.vocab_parallel_logprobs_at(s, ids, group, rest=True, **kw)[1],
              lambda f: _ref_at_and_rest(_ref_logp(f, vocab), ids)[..., -1], [peaked], gen)
    return check.errors


def _ref_at_and_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[..., k + 1]: log p at the ids, and log Σ p over every other token."""
    others = logp.scatter(-1, ids, float("-inf"))
    return torch.cat([logp.gather(-1, ids), others.logsumexp(-1, keepdim=True)], -1)


def case_hostile_ops(tp: int, seed: int):
    """±1e4 logits (fp32 and bf16): finite and accurate on the values' natural scale."""
    from mrl import ops

    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed * 100 + layout.dp_rank)
    check = _Check(tp, layout.tp_rank, grad_floor=1.0)
    for dtype in (torch.float32, torch.bfloat16):
        p, q = _full_logits(gen, dtype, scale=1e4), _full_logits(gen, dtype, scale=1e4)
        ids = _ids(gen, tp, TRUE_V, 4)
        check(f"1e4 {dtype} jsd", lambda a, b: ops.vocab_parallel_jsd(a, b, group, beta=0.3, vocab_size=TRUE_V),
              lambda a, b: ref_jsd(_ref_logp(a, TRUE_V), _ref_logp(b, TRUE_V), 0.3), [p, q], gen)
        check(f"1e4 {dtype} logprobs_at", lambda s: ops.vocab_parallel_logprobs_at(s, ids, group, vocab_size=TRUE_V),
              lambda f: _ref_logp(f, TRUE_V).gather(-1, ids), [q], gen)
        check(f"1e4 {dtype} logprobs_at rest",
              lambda s: ops.vocab_parallel_logprobs_at(s, ids, group, rest=True, vocab_size=TRUE_V)[1].clamp_min(-80),
              lambda f: _ref_at_and_rest(_ref_logp(f, TRUE_V), ids)[..., -1].clamp_min(-80), [q], gen)
    return check.errors


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_jsd_and_logprobs_at_match_full_vocab_reference(ranks4, tp, dtype_name):
    chunk = 5 if dtype_name == "float32" else None
    _assert_small(ranks4.run(case_ops, tp, 11 + tp, dtype_name, chunk), TOL[getattr(torch, dtype_name)])


@pytest.mark.parametrize("tp", [1, 4])
def test_jsd_and_logprobs_at_hostile_logits(ranks4, tp):
    results = ranks4.run(case_hostile_ops, tp, 5)
    fp32 = [{k: v for k, v in r.items() if "float32" in k} for r in results]
    bf16 = [{k: v for k, v in r.items() if "bfloat16" in k} for r in results]
    # One fp32 ulp of a 1e4 logit is ~1e-3 (see test_ops): values and gradients on their O(1) scale.
    _assert_small([{k: v for k, v in r.items() if "value" in k} for r in fp32], 1e-5)
    _assert_small(fp32, 5e-3)
    _assert_small(bf16, 1e-2)


def test_jsd_hand_computed_and_endpoints():
    from mrl.ops import vocab_parallel_jsd, vocab_parallel_kl

    # Teacher p = (0.5, 0.5) (logits 0, 0), student q = (0.9, 0.1) (logits log 9, 0), β = 0.5:
    # M = (0.7, 0.3); KL(p‖M) = 0.5·ln(0.5/0.7) + 0.5·ln(0.5/0.3) = 0.5·(−0.3364722) + 0.5·0.5108256
    # = 0.0871767; KL(q‖M) = 0.9·ln(0.9/0.7) + 0.1·ln(0.1/0.3) = 0.2261830 − 0.1098612 = 0.1163218;
    # JSD = 0.5·0.0871767 + 0.5·0.1163218 = 0.1017492.
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(9.0), 0.0]])
    assert vocab_parallel_jsd(p, q, beta=0.5).item() == pytest.approx(0.1017492, abs=2e-7)
    # β = 0.2: M = 0.2·p + 0.8·q = (0.82, 0.18);
    # KL(p‖M) = 0.5·ln(0.5/0.82) + 0.5·ln(0.5/0.18) = 0.5·(−0.4946962) + 0.5·1.0216512 = 0.2634775;
    # KL(q‖M) = 0.9·ln(0.9/0.82) + 0.1·ln(0.1/0.18) = 0.9·0.0930904 + 0.1·(−0.5877867) = 0.0250027;
    # JSD = 0.2·0.2634775 + 0.8·0.0250027 = 0.0726977.
    assert vocab_parallel_jsd(p, q, beta=0.2).item() == pytest.approx(0.0726977, abs=2e-7)
    # The ends are TRL's: β = 0 is KL(teacher‖student), β = 1 is KL(student‖teacher).
    assert torch.equal(vocab_parallel_jsd(p, q, beta=0.0), vocab_parallel_kl(p, q))
    assert torch.equal(vocab_parallel_jsd(p, q, beta=1.0), vocab_parallel_kl(q, p))
    # Symmetric in (p, β) ↔ (q, 1 − β); 0 when the distributions agree.
    assert vocab_parallel_jsd(p, q, beta=0.3).item() == pytest.approx(vocab_parallel_jsd(q, p, beta=0.7).item(), rel=1e-6)
    assert vocab_parallel_jsd(q, q.clone(), beta=0.4).abs().item() < 1e-7
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_jsd(p, q, beta=1.5)
    with pytest.raises(ValueError, match="ids"):
        from mrl.ops import vocab_parallel_logprobs_at
        vocab_parallel_logprobs_at(p, torch.tensor([[2]]))


# The loss -------------------------------------------------------------------------------------

VOCAB, PADDED, IGN = 37, 40, -100


def make_batch(seed: int, k: int = 6, Bn: int = 4, S: int = 7, scale: float = 3.0, dtype=torch.float32):
    from mrl.ops import vocab_parallel_topk

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(Bn, S, PADDED, generator=g) * scale).to(dtype)
    teacher = (torch.randn(Bn, S, PADDED, generator=g) * scale).to(dtype)
    labels = torch.randint(0, VOCAB, (Bn, S), generator=g)
    labels[:, 0] = IGN
    loss_mask = (torch.rand(Bn, S, generator=g) < 0.8).long()
    loss_mask[1] = 0  # an all-masked row
    top = vocab_parallel_topk(teacher, k, None, vocab_size=VOCAB, temperature=1.5)
    batch = {"labels": labels, "loss_mask": loss_mask, "ref_logits": teacher,
             "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.logprobs}
    return logits, batch


def ref_topk(student_logits, teacher_logits, ids, tail: str, direction: str, beta: float, temperature: float):
    """float64 reference: the k (+1) categories of the teacher's and the student's full softmaxes."""
    s = _ref_logp(student_logits.double(), VOCAB, temperature).gather(-1, ids)
    t = _ref_logp(teacher_logits.double(), VOCAB, temperature).gather(-1, ids)
    if tail == "renormalize":
        s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    else:  # the rest of the vocabulary as one category: 1 − Σ_k p
        s = torch.cat([s, torch.log1p(-s.exp().sum(-1, keepdim=True))], -1)
        t = torch.cat([t, torch.log1p(-t.exp().sum(-1, keepdim=True))], -1)
    return ref_jsd(t, s, {"forward": 0.0, "reverse": 1.0}.get(direction, beta))


def run(cfg: dict, logits, batch, micro: int = 1):
    from mrl.losses import build_loss, compute_global_counts

    loss_fn = build_loss(dict(kind="distill", **cfg), vocab_size=VOCAB)
    rows = batch["labels"].shape[0] // micro
    parts = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(micro)]
    counts = compute_global_counts(parts)
    x = logits.clone().requires_grad_(True)
    total, metrics = 0.0, []
    for i, part in enumerate(parts):
        loss, m = loss_fn(x[i * rows:(i + 1) * rows], part, counts)
        total = total + loss
        metrics.append(m)
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad, metrics


def mask_of(batch):
    return (batch["labels"] != IGN) & (batch["loss_mask"] != 0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("direction,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_topk_loss_matches_float64_reference(tail, direction, beta):
    logits, batch = make_batch(0)
    cfg = dict(teacher_topk=6, topk_tail=tail, direction=direction, jsd_beta=beta, temperature=1.5)
    loss, grad, _ = run(cfg, logits, batch, micro=2)
    x = logits.double().requires_grad_(True)
    mask = mask_of(batch)
    per_token = ref_topk(x, batch["ref_logits"], batch["teacher_topk_ids"], tail, direction, beta, 1.5)
    expected = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert (grad.double() - expected_grad).abs().max() <= 2e-5 * expected_grad.abs().max()


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.8, 1.0])
def test_full_vocab_jsd_loss_matches_float64_reference(beta):
    logits, batch = make_batch(1)
    loss, grad, metrics = run(dict(direction="jsd", jsd_beta=beta, temperature=0.7), logits, batch)
    x = logits.double().requires_grad_(True)
    mask = mask_of(batch)
    per_token = ref_jsd(_ref_logp(batch["ref_logits"].double(), VOCAB, 0.7), _ref_logp(x, VOCAB, 0.7), beta)
    expected = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert (grad.double() - expected_grad).abs().max() <= 2e-5 * expected_grad.abs().max()
    assert ("jsd" if 0 < beta < 1 else "kl") in metrics[0]


def test_topk_hand_computed_bucket_and_renormalize():
    """Vocabulary of 3 tokens, k = 2, teacher (0.5, 0.3 | 0.2), student (0.25, 0.25 | 0.5).

    bucket: categories (t1, t2, rest): KL = 0.5·ln(0.5/0.25) + 0.3·ln(0.3/0.25) + 0.2·ln(0.2/0.5)
            = 0.3465736 + 0.0546965 − 0.1832581 = 0.2180119.
    renormalize: teacher (0.625, 0.375), student (0.5, 0.5):
            KL = 0.625·ln(1.25) + 0.375·ln(0.75) = 0.1394647 − 0.1078808 = 0.0315839.
    """
    from mrl.losses import build_loss, compute_global_counts

    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    batch = {"labels": torch.tensor([[0]]), "teacher_topk_ids": torch.tensor([[[0, 1]]]),
             "teacher_topk_logprobs": torch.log(torch.tensor([[[0.5, 0.3]]]))}
    counts = compute_global_counts([batch])
    for tail, expected in (("bucket", 0.2180119), ("renormalize", 0.0315839)):
        loss_fn = build_loss(dict(kind="distill", teacher_topk=2, topk_tail=tail), vocab_size=3)
        loss, _ = loss_fn(logits, batch, counts)
        assert loss.item() == pytest.approx(expected, abs=1e-6), tail


def test_topk_bucket_bounds_the_full_kl_and_vanishes_at_the_teacher():
    """The coarsened KL is below the full forward KL, and 0 when the student is the teacher."""
    logits, batch = make_batch(2, k=4)
    top, _, _ = run(dict(teacher_topk=4, temperature=1.5), logits, batch)
    full, _, _ = run(dict(temperature=1.5), logits, batch)
    assert 0.0 < top.item() < full.item()
    same, grad, _ = run(dict(teacher_topk=4, temperature=1.5), batch["ref_logits"].clone(), batch)
    assert abs(same.item()) < 1e-6 and grad.abs().max() < 1e-5


def test_topk_and_jsd_hostile_inputs():
    """±1e4 logits, bf16 logits and an all-masked micro-batch: finite losses and gradients."""
    for dtype in (torch.float32, torch.bfloat16):
        logits, batch = make_batch(3, scale=1e4, dtype=dtype)
        for cfg in (dict(teacher_topk=6), dict(teacher_topk=6, topk_tail="renormalize", direction="reverse"),
                    dict(direction="jsd", jsd_beta=0.5), dict(teacher_topk=6, direction="jsd")):
            loss, grad, _ = run(cfg, logits, batch)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (dtype, cfg)
            assert grad.dtype == dtype
    logits, batch = make_batch(4)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["teacher_topk_logprobs"] = torch.full_like(batch["teacher_topk_logprobs"], math.nan)  # padding
    for cfg in (dict(teacher_topk=6), dict(direction="jsd")):
        loss, grad, _ = run(cfg, logits, batch)
        assert loss.item() == 0.0 and grad.abs().max() == 0.0


def test_topk_bf16_close_to_fp32():
    logits, batch = make_batch(5)
    cfg = dict(teacher_topk=6, direction="jsd", jsd_beta=0.4)
    loss32, grad32, _ = run(cfg, logits.bfloat16().float(), batch)
    loss16, grad16, _ = run(cfg, logits.bfloat16(), batch)
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-5)
    assert (grad16.float() - grad32).abs().max() <= 1e-2 * grad32.abs().max()


def test_topk_shape_and_value_errors_name_the_key():
    from mrl.losses import DistillLossConfig, build_loss, compute_global_counts

    logits, batch = make_batch(6)
    counts = compute_global_counts([batch])
    loss_fn = build_loss(dict(kind="distill", teacher_topk=6), vocab_size=VOCAB)
    assert loss_fn.required_keys == ("labels", "teacher_topk_ids", "teacher_topk_logprobs")
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        loss_fn(logits, {k: v for k, v in batch.items() if k != "teacher_topk_logprobs"}, counts)
    with pytest.raises(ValueError, match=r"teacher_topk_ids.*\(4, 7, 6\)"):
        loss_fn(logits, dict(batch, teacher_topk_ids=batch["teacher_topk_ids"][..., :5]), counts)
    bad_ids = batch["teacher_topk_ids"].clone()
    bad_ids[0, 3, 0] = VOCAB  # a padded column
    with pytest.raises(ValueError, match="teacher_topk_ids outside the vocabulary"):
        loss_fn(logits, dict(batch, teacher_topk_ids=bad_ids, loss_mask=torch.ones_like(batch["loss_mask"])), counts)
    repeated = batch["teacher_topk_ids"].clone()
    repeated[0, 3, 1] = repeated[0, 3, 0]
    with pytest.raises(ValueError, match="repeat an id"):
        loss_fn(logits, dict(batch, teacher_topk_ids=repeated, loss_mask=torch.ones_like(batch["loss_mask"])), counts)
    with pytest.raises(ValueError, match="probability above 1"):
        loss_fn(logits, dict(batch, teacher_topk_logprobs=batch["teacher_topk_logprobs"] + 1.0), counts)
    with pytest.raises(ValueError, match="NaN"):
        nan = batch["teacher_topk_logprobs"].clone()
        nan[0, 2, 1] = math.nan
        loss_fn(logits, dict(batch, teacher_topk_logprobs=nan, loss_mask=torch.ones_like(batch["loss_mask"])), counts)
    for kwargs, field in ((dict(teacher_topk=0), "teacher_topk"), (dict(jsd_beta=1.5), "jsd_beta"),
                          (dict(topk_tail="drop"), "topk_tail"), (dict(direction="tvd"), "direction")):
        with pytest.raises(ValueError, match=rf"^{field}\b"):
            DistillLossConfig(**kwargs)
