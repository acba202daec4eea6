"""Vocab-parallel ops against float64 references on the full, unsharded logits.

Every rank builds the same full random logits from a shared seed, takes its vocabulary shard, runs
the op over the TP group, and compares values and its shard of the gradient with autograd through
a float64 reference written here from the formula (``torch.log_softmax`` on the whole vocabulary).
Cases return ``{check name: relative error}`` and the tests assert each against a tolerance.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100
B, T = 2, 9
PADDED_V = 128  # global padded vocabulary: 128/tp columns per rank
TRUE_V = 117  # the real vocabulary: the last 11 columns are padding
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


# Inputs and references (run on every rank) ------------------------------------------------------


def _layout(tp: int):
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(tp=tp), timeout_minutes=2)
    group = layout.tp_group if tp > 1 else None
    return layout, group


def _full_logits(gen, dtype, scale: float = 3.0, shape=(B, T, PADDED_V)) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _labels(gen, tp: int, vocab: int) -> torch.Tensor:
    """Random ids with both edges of every shard, ignored rows, and the last real id."""
    labels = torch.randint(0, vocab, (B, T), generator=gen)
    local = PADDED_V // tp
    edges = [e for r in range(tp) for e in (r * local, (r + 1) * local - 1) if e < vocab] + [vocab - 1]
    flat = labels.view(-1)
    flat[: len(edges)] = torch.tensor(edges)
    flat[-2:] = IGNORE
    return labels


def _shard(full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    local = full.shape[-1] // tp
    return full[..., rank * local : (rank + 1) * local]


def _rel(a: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |a - ref| / max |scale| (``scale`` defaults to ``ref``); inf when a is not finite."""
    a, ref = a.detach().double(), ref.detach()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = (ref if scale is None else scale).abs().max().clamp_min(1e-30)
    return float((a - ref).abs().max() / denom)


def _ref_logp(x: torch.Tensor, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(x[..., :vocab] / temperature, dim=-1)


def _ref_gather(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    kept = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(kept, picked, torch.zeros_like(picked))


def _ref_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _ref_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def _ref_ce(x: torch.Tensor, labels: torch.Tensor, vocab: int, eps: float) -> torch.Tensor:
    return F.cross_entropy(
        x[..., :vocab].reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE,
        label_smoothing=eps, reduction="none",
    ).view(labels.shape)


class _Check:
    """Runs an op on the shard and its reference on the full logits; records relative errors."""

    def __init__(self, tp: int, rank: int, grad_floor: float = 0.0):
        self.tp, self.rank, self.grad_floor = tp, rank, grad_floor
        self.errors: dict[str, float] = {}

    def __call__(self, name, op, ref, inputs, gen, sharded_output: bool = False):
        """``op(*shards)`` vs ``ref(*full float64)``: values, each input's gradient, input intact.

        With ``sharded_output`` the op returns this rank's vocabulary shard of the reference's
        output; the upstream gradient is then the matching shard of one full random weight.
        """
        shards = [_shard(x, self.tp, self.rank).clone().requires_grad_(True) for x in inputs]
        before = [s.detach().clone() for s in shards]
        refs = [x.double().requires_grad_(True) for x in inputs]
        out, expected = op(*shards), ref(*refs)
        weight = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        local_weight = _shard(weight, self.tp, self.rank) if sharded_output else weight
        grads = torch.autograd.grad((out * local_weight.to(out.dtype)).sum(), shards, allow_unused=True)
        expected_grads = torch.autograd.grad((expected * weight).sum(), refs)
        expected = expected.detach()
        local_expected = _shard(expected, self.tp, self.rank) if sharded_output else expected
        self.errors[f"{name}: value"] = _rel(out, local_expected, expected)
        self.errors[f"{name}: dtype"] = 0.0 if out.dtype == torch.float32 else float("inf")
        for i, (g, eg) in enumerate(zip(grads, expected_grads)):
            eg_local = _shard(eg, self.tp, self.rank)
            ok = g is not None and g.dtype == inputs[i].dtype
            self.errors[f"{name}: grad {i} dtype"] = 0.0 if ok else float("inf")
            scale = eg.abs().max().clamp_min(self.grad_floor)
            self.errors[f"{name}: grad {i}"] = _rel(g, eg_local, scale) if ok else float("inf")
        intact = all(torch.equal(s.detach(), b) for s, b in zip(shards, before))
        self.errors[f"{name}: input unchanged"] = 0.0 if intact else float("inf")
        return out, grads


# Cases ----------------------------------------------------------------------------------------


def case_values_and_grads(tp: int, seed: int, dtype_name: str, chunk_size):
    """Every differentiable op, padded and unpadded vocabulary, with and without temperature."""
    from mrl import ops

    dtype = getattr(torch, dtype_name)
    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed * 100 + layout.dp_rank)
    check = _Check(tp, layout.tp_rank)
    for vocab, vs in ((PADDED_V, None), (TRUE_V, TRUE_V)):
        tag, kw = f"V={vocab}", dict(vocab_size=vs, chunk_size=chunk_size)
        x = _full_logits(gen, dtype)
        q = _full_logits(gen, dtype, scale=2.0)
        y = _labels(gen, tp, vocab)

        def logp(f, temperature=1.0):
            return _ref_logp(f, vocab, temperature)

        check(f"{tag} logprobs", lambda s: ops.vocab_parallel_logprobs(s, y, group, **kw),
              lambda f: _ref_gather(logp(f), y), [x], gen)
        check(f"{tag} logprobs T=0.7", lambda s: ops.vocab_parallel_logprobs(s, y, group, temperature=0.7, **kw),
              lambda f: _ref_gather(logp(f, 0.7), y), [x], gen)
        check(f"{tag} entropy T=1.3", lambda s: ops.vocab_parallel_entropy(s, group, temperature=1.3, **kw),
              lambda f: _ref_entropy(logp(f, 1.3)), [x], gen)
        # Fused: both outputs weighted independently through one stacked output.
        check(f"{tag} fused", lambda s: torch.stack(ops.vocab_parallel_logprobs_and_entropy(s, y, group, **kw)),
              lambda f: torch.stack([_ref_gather(logp(f), y), _ref_entropy(logp(f))]), [x], gen)
        check(f"{tag} logsumexp", lambda s: ops.vocab_parallel_logsumexp(s, group, **kw),
              lambda f: torch.logsumexp(f[..., :vocab], -1), [x], gen)
        for eps in (0.0, 0.1):
            check(f"{tag} cross_entropy eps={eps}",
                  lambda s: ops.vocab_parallel_cross_entropy(s, y, group, label_smoothing=eps, **kw),
                  lambda f: _ref_ce(f, y, vocab, eps), [x], gen)
        check(f"{tag} kl T=0.9", lambda p, r: ops.vocab_parallel_kl(p, r, group, temperature=0.9, **kw),
              lambda p, r: _ref_kl(logp(p, 0.9), logp(r, 0.9)), [x, q], gen)
        # The local shard of log p (0 on padded columns) against the full one.
        valid = _valid(tp, layout.tp_rank, vocab)
        check(f"{tag} log_softmax",
              lambda s: _zero_padding(ops.vocab_parallel_log_softmax(s, group, temperature=1.5, **kw), valid),
              lambda f: torch.cat([logp(f, 1.5), f[..., vocab:] * 0], -1), [x], gen, sharded_output=True)
        tail = ops.vocab_parallel_log_softmax(_shard(x, tp, layout.tp_rank), group, **kw)[..., valid:]
        padded_ok = bool((tail == float("-inf")).all())
        check.errors[f"{tag} log_softmax padded columns are -inf"] = 0.0 if padded_ok else float("inf")

    if dtype == torch.float32:  # Megatron-Core's own op agrees (given a copy: it overwrites fp32 input)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_ce

        x, y = _full_logits(gen, dtype), _labels(gen, tp, PADDED_V).clamp(min=0)
        shard = _shard(x, tp, layout.tp_rank)
        ours = ops.vocab_parallel_cross_entropy(shard, y, group)
        check.errors["megatron-core cross-entropy"] = _rel(ours, mcore_ce(shard.clone(), y).double())
    return check.errors


def _valid(tp: int, rank: int, vocab: int) -> int:
    """Real (unpadded) columns of rank's shard."""
    local = PADDED_V // tp
    return min(max(vocab - rank * local, 0), local)


def _zero_padding(log_p: torch.Tensor, valid: int) -> torch.Tensor:
    """The -inf of padded columns replaced by 0 (differentiably), so weighted sums stay finite."""
    keep = torch.arange(log_p.shape[-1]) < valid
    return torch.where(keep, log_p, torch.zeros_like(log_p))


def case_chunking_and_hostile(tp: int, seed: int):
    """Chunked = unchunked; ±1e4 logits stay finite and accurate; fully ignored batches are 0."""
    from mrl import ops

    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed * 100 + layout.dp_rank)
    rank, errors = layout.tp_rank, {}

    x = _shard(_full_logits(gen, torch.float32), tp, rank)
    y = _labels(gen, tp, TRUE_V)
    results = []
    for chunk in (1, 4, None, B * T):
        s = x.clone().requires_grad_(True)
        lp, ent = ops.vocab_parallel_logprobs_and_entropy(s, y, group, vocab_size=TRUE_V, chunk_size=chunk)
        kl = ops.vocab_parallel_kl(s, x.flip(-1), group, vocab_size=TRUE_V, chunk_size=chunk)
        (grad,) = torch.autograd.grad((lp + 0.3 * ent + kl).sum(), s)
        results.append(torch.cat([lp.flatten(), ent.flatten(), kl.flatten(), grad.flatten()]).double())
    for chunk, r in zip((1, 4, None), results):
        errors[f"chunk_size={chunk} vs unchunked"] = _rel(r, results[-1])

    check = _Check(tp, rank, grad_floor=1.0)
    for dtype in (torch.float32, torch.bfloat16):
        tag = f"1e4 {dtype}"
        big = _full_logits(gen, dtype, scale=1e4)
        q = _full_logits(gen, dtype, scale=1e4)
        y = _labels(gen, tp, PADDED_V)
        logp = functools.partial(_ref_logp, vocab=PADDED_V)
        check(f"{tag} fused", lambda s: torch.stack(ops.vocab_parallel_logprobs_and_entropy(s, y, group)),
              lambda f: torch.stack([_ref_gather(logp(f), y), _ref_entropy(logp(f))]), [big], gen)
        check(f"{tag} kl", lambda p, r: ops.vocab_parallel_kl(p, r, group),
              lambda p, r: _ref_kl(logp(p), logp(r)), [big, q], gen)
        check(f"{tag} cross_entropy", lambda s: ops.vocab_parallel_cross_entropy(s, y, group, label_smoothing=0.2),
              lambda f: _ref_ce(f, y, PADDED_V, 0.2), [big], gen)
    errors.update(check.errors)

    # A fully ignored batch: zero values, zero gradients, no NaN.
    s = x.clone().requires_grad_(True)
    ignored = torch.full((B, T), IGNORE)
    lp = ops.vocab_parallel_logprobs(s, ignored, group)
    ce = ops.vocab_parallel_cross_entropy(s, ignored, group, label_smoothing=0.1)
    (grad,) = torch.autograd.grad((lp + ce).sum(), s)
    all_zero = bool((lp == 0).all() and (ce == 0).all() and (grad == 0).all())
    errors["fully ignored batch is 0 with 0 gradient"] = 0.0 if all_zero else float("inf")

    # No tokens at all.
    empty = ops.vocab_parallel_logprobs(x[:0], y[:0], group)
    errors["no tokens"] = 0.0 if empty.shape == (0, T) else float("inf")
    return errors


def case_topk(tp: int, seed: int):
    from mrl import ops

    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed * 100 + layout.dp_rank)
    rank, errors = layout.tp_rank, {}
    x = _full_logits(gen, torch.float32)
    for vocab, vs in ((PADDED_V, None), (TRUE_V, TRUE_V)):
        for k in (1, 5, min(PADDED_V // tp + 3, vocab)):  # more than one shard holds
            got = ops.vocab_parallel_topk(_shard(x, tp, rank), k, group, vocab_size=vs, temperature=0.8)
            want_lp, want_ids = torch.log_softmax(x[..., :vocab].double() / 0.8, -1).topk(k, dim=-1)
            errors[f"V={vocab} k={k} logprobs"] = _rel(got.logprobs, want_lp)
            errors[f"V={vocab} k={k} indices"] = 0.0 if torch.equal(got.indices, want_ids) else float("inf")
    return errors


def case_collective_counts(tp: int, seed: int):
    """All-reduces (and all-gathers) per forward and per backward of each op."""
    import torch.distributed as dist

    from mrl import ops

    layout, group = _layout(tp)
    gen = torch.Generator().manual_seed(seed)
    x = _shard(_full_logits(gen, torch.float32), tp, layout.tp_rank).requires_grad_(True)
    y = _labels(gen, tp, PADDED_V)
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def counting(name):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return wrapped

    def count(fn):
        calls.clear()
        result = fn()
        return result, len(calls)

    ops_under_test = {
        "logprobs": lambda: ops.vocab_parallel_logprobs(x, y, group),
        "entropy": lambda: ops.vocab_parallel_entropy(x, group),
        "fused": lambda: torch.stack(ops.vocab_parallel_logprobs_and_entropy(x, y, group)),
        "cross_entropy smoothed": lambda: ops.vocab_parallel_cross_entropy(x, y, group, label_smoothing=0.1),
        "kl": lambda: ops.vocab_parallel_kl(x, x.detach().flip(-1), group),
        "log_softmax": lambda: ops.vocab_parallel_log_softmax(x, group),
    }
    counts = {}
    for name, attr in originals.items():
        setattr(dist, name, counting(name))
    try:
        for op_name, op in ops_under_test.items():
            out, fwd = count(op)
            _, bwd = count(lambda: out.sum().backward())
            counts[op_name] = (fwd, bwd)
        _, counts["topk"] = count(lambda: ops.vocab_parallel_topk(x, 3, group))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return counts


def case_bad_arguments(tp: int):
    """Errors name the argument; every rank of the group raises the same way (no hang)."""
    from mrl import ops

    layout, group = _layout(tp)
    local = PADDED_V // tp
    x = torch.zeros(B, T, local)
    y = torch.zeros(B, T, dtype=torch.long)
    messages = {}
    attempts = {
        "label too large": lambda: ops.vocab_parallel_logprobs(x, y + PADDED_V, group),
        "label in padding": lambda: ops.vocab_parallel_logprobs(x, y + TRUE_V, group, vocab_size=TRUE_V),
        "negative label": lambda: ops.vocab_parallel_cross_entropy(x, y - 1, group),
        "labels shape": lambda: ops.vocab_parallel_logprobs(x, y[:, :-1], group),
        "vocab_size": lambda: ops.vocab_parallel_entropy(x, group, vocab_size=PADDED_V + 1),
        "temperature": lambda: ops.vocab_parallel_entropy(x, group, temperature=0.0),
        "chunk_size": lambda: ops.vocab_parallel_logsumexp(x, group, chunk_size=0),
        "label_smoothing": lambda: ops.vocab_parallel_cross_entropy(x, y, group, label_smoothing=1.5),
        "kl shapes": lambda: ops.vocab_parallel_kl(x, x[:1], group),
        "topk k": lambda: ops.vocab_parallel_topk(x, PADDED_V + 1, group),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


# Tests ----------------------------------------------------------------------------------------


def _assert_small(results: list[dict], tol: float) -> None:
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"rank {rank}: errors above {tol}: {bad}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_values_and_grads_match_full_vocab_reference(ranks4, tp, dtype_name):
    chunk = 5 if dtype_name == "float32" else None
    results = ranks4.run(case_values_and_grads, tp, 1 + tp, dtype_name, chunk)
    _assert_small(results, TOL[getattr(torch, dtype_name)])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chunking_hostile_inputs_and_ignored_batches(ranks4, tp):
    results = ranks4.run(case_chunking_and_hostile, tp, 7 + tp)

    def pick(*words):
        return [{k: v for k, v in r.items() if all(w in k for w in words)} for r in results]

    _assert_small(pick("chunk"), 1e-6)
    _assert_small(pick("ignored") + pick("tokens"), 0.0)
    _assert_small(pick("float32", "value"), 1e-5)
    # At |logits| ~ 1e4 one fp32 ulp of a logit is ~1e-3: that bounds any fp32 computation of
    # logit differences, so gradients are compared on their natural O(1) scale.
    _assert_small(pick("float32", "grad"), 5e-3)
    _assert_small(pick("bfloat16"), 1e-2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_topk_matches_torch_topk(ranks4, tp):
    _assert_small(ranks4.run(case_topk, tp, 3 + tp), 1e-6)


@pytest.mark.parametrize("tp", [2, 4])
def test_collective_counts(ranks4, tp):
    counts = ranks4.run(case_collective_counts, tp, 0)[0]
    assert counts["logprobs"] == (2, 0), counts
    assert counts["entropy"] == (2, 0), counts
    fused_fwd, fused_bwd = counts["fused"]
    assert fused_fwd <= counts["logprobs"][0] + 1 and fused_bwd == 0, counts
    assert counts["cross_entropy smoothed"] == (2, 0), counts
    assert counts["kl"] == (2, 0), counts
    assert counts["log_softmax"] == (2, 1), counts
    assert counts["topk"] == 2, counts


def test_bad_arguments_raise_value_errors_naming_them(ranks4):
    for messages in ranks4.run(case_bad_arguments, 2):
        expected_words = {
            "label too large": "labels", "label in padding": "labels", "negative label": "labels",
            "labels shape": "labels", "vocab_size": "vocab_size", "temperature": "temperature",
            "chunk_size": "chunk_size", "label_smoothing": "label_smoothing", "kl shapes": "logits_q",
            "topk k": "k must",
        }
        for name, word in expected_words.items():
            assert messages[name] is not None and word in messages[name], (name, messages[name])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_single_rank_matches_reference(dtype):
    """The same ops on a CUDA tensor (group=None): values and gradients against float64."""
    from mrl import ops

    gen = torch.Generator().manual_seed(5)
    full = _full_logits(gen, dtype, shape=(3, 257, 1000))
    labels = torch.randint(0, 990, (3, 257), generator=gen)
    labels[0, :4] = IGNORE
    weights = torch.randn(2, 3, 257, generator=gen, dtype=torch.float64)
    x = full.cuda().requires_grad_(True)
    logp, ent = ops.vocab_parallel_logprobs_and_entropy(x, labels.cuda(), vocab_size=990, chunk_size=100)
    (grad,) = torch.autograd.grad((logp * weights[0].cuda() + ent * weights[1].cuda()).sum(), x)

    ref_x = full.double().requires_grad_(True)
    ref_logp = _ref_logp(ref_x, 990)
    ref_lp, ref_ent = _ref_gather(ref_logp, labels), _ref_entropy(ref_logp)
    (ref_grad,) = torch.autograd.grad((ref_lp * weights[0] + ref_ent * weights[1]).sum(), ref_x)
    tol = TOL[dtype]
    assert _rel(logp.cpu(), ref_lp.detach()) <= tol
    assert _rel(ent.cpu(), ref_ent.detach()) <= tol
    assert grad.dtype == dtype and _rel(grad.cpu(), ref_grad) <= tol
    assert torch.equal(x.detach().cpu(), full)
