"""The functional loss core against float64 references written here from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mrl.losses import functional as LF

D = torch.float64


def _inputs(seed: int, B: int = 5, S: int = 7):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, S, generator=g, dtype=D)
    mask = (torch.rand(B, S, generator=g) < 0.6).to(D)
    mask[1] = 0.0  # an all-masked row
    mask[0, 0] = 1.0
    return values, mask, g


# Reference aggregation: explicit loops over rows and tokens ------------------------------------

def ref_aggregate(x, m, mode, num_tokens=None, num_seqs=None, norm_length=None):
    B, S = x.shape
    total = sum(x[i, t] for i in range(B) for t in range(S) if m[i, t] > 0)
    total = total if torch.is_tensor(total) else torch.tensor(0.0, dtype=D)
    n_tok = sum(1 for i in range(B) for t in range(S) if m[i, t] > 0)
    n_seq = sum(1 for i in range(B) if any(m[i, t] > 0 for t in range(S)))
    N = num_tokens if num_tokens is not None else n_tok
    M = num_seqs if num_seqs is not None else n_seq
    if mode == "token-mean":
        return total / N if N else total * 0
    if mode == "seq-mean-token-mean":
        acc = torch.tensor(0.0, dtype=D)
        for i in range(B):
            toks = [x[i, t] for t in range(S) if m[i, t] > 0]
            if toks:
                acc = acc + sum(toks) / len(toks)
        return acc / M if M else acc * 0
    if mode == "seq-mean-token-sum":
        return total / M if M else total * 0
    L = S if norm_length is None else norm_length
    return total / (M * L) if M else total * 0


@pytest.mark.parametrize("mode", LF.AGG_MODES)
def test_aggregate_matches_formula_values_and_grads(mode):
    x, m, _ = _inputs(0)
    for kwargs in ({}, {"num_tokens": 40, "num_seqs": 9}):
        extra = {"norm_length": 11} if mode == "seq-mean-token-sum-norm" else {}
        xa = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        out = LF.aggregate(xa, m, mode, **kwargs, **extra)
        ref = ref_aggregate(xr, m, mode, **kwargs, **extra)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
        out.backward()
        ref.backward()
        torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-12, atol=1e-14)
        assert torch.all(xa.grad[m == 0] == 0)


@pytest.mark.parametrize("mode", LF.AGG_MODES)
def test_aggregate_split_with_global_counts_sums_to_whole(mode):
    x, m, _ = _inputs(1, B=8)
    whole = LF.aggregate(x, m, mode, norm_length=7)
    N, M = int(m.sum()), int((m.sum(-1) > 0).sum())
    parts = sum(
        LF.aggregate(x[i : i + 3], m[i : i + 3], mode, num_tokens=N, num_seqs=M, norm_length=7)
        for i in range(0, 8, 3)
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", LF.AGG_MODES)
def test_aggregate_all_masked_and_nonfinite_padding(mode):
    x = torch.full((3, 4), math.inf, dtype=D, requires_grad=True)
    m = torch.zeros(3, 4, dtype=D)
    for kwargs in ({}, {"num_tokens": 0, "num_seqs": 0}, {"num_tokens": torch.tensor(0), "num_seqs": torch.tensor(0)}):
        out = LF.aggregate(x, m, mode, **kwargs)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, x)
        assert torch.all(g == 0)
    # inf / NaN at masked positions of a partly valid input do not leak
    y = torch.randn(3, 4, dtype=D)
    m2 = torch.ones(3, 4, dtype=D)
    m2[:, -1] = 0
    y_bad = y.clone()
    y_bad[:, -1] = math.nan
    torch.testing.assert_close(LF.aggregate(y_bad, m2, mode), LF.aggregate(y, m2, mode))


def test_aggregate_rejects_bad_mode_and_shape():
    x, m, _ = _inputs(2)
    with pytest.raises(ValueError, match="aggregation mode"):
        LF.aggregate(x, m, "token-sum")
    with pytest.raises(ValueError, match="shape"):
        LF.aggregate(x, m[:, :-1], "token-mean")


# KL estimators ---------------------------------------------------------------------------------

def ref_kl(lp, ref, kind, in_clamp=None, out_clamp=None):
    out = torch.empty_like(lp)
    for idx in range(lp.numel()):
        logr = ref.view(-1)[idx] - lp.view(-1)[idx]
        if in_clamp is not None:
            logr = min(max(logr, -in_clamp), in_clamp)
        base = kind.rstrip("+")
        val = {"k1": -logr, "k2": logr**2 / 2, "k3": math.exp(logr) - 1 - logr, "abs": abs(logr)}[base]
        if out_clamp is not None:
            val = min(max(val, -out_clamp), out_clamp)
        out.view(-1)[idx] = val
    return out


def ref_kl_grad(lp, ref, kind, in_clamp=None, out_clamp=None):
    """d kl / d logprobs from the calculus (logr = ref − lp, d logr / d lp = −1)."""
    g = torch.empty_like(lp)
    for idx in range(lp.numel()):
        logr = float(ref.view(-1)[idx] - lp.view(-1)[idx])
        if kind.endswith("+"):  # straight-through: k2's gradient on the raw log-ratio, whatever the clamps
            g.view(-1)[idx] = -logr
            continue
        if in_clamp is not None and abs(logr) > in_clamp:
            g.view(-1)[idx] = 0.0
            continue
        val = {"k1": -logr, "k2": logr**2 / 2, "k3": math.exp(logr) - 1 - logr, "abs": abs(logr)}[kind]
        if out_clamp is not None and abs(val) > out_clamp:
            g.view(-1)[idx] = 0.0
            continue
        dval_dlogr = {"k1": -1.0, "k2": logr, "k3": math.exp(logr) - 1, "abs": math.copysign(1.0, logr)}[kind]
        g.view(-1)[idx] = -dval_dlogr
    return g


@pytest.mark.parametrize("kind", LF.KL_KINDS)
@pytest.mark.parametrize("clamps", [(None, None), (1.5, None), (None, 0.8), (2.0, 1.0)])
def test_kl_estimate_values_and_grads(kind, clamps):
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(4, 6, generator=g, dtype=D) * 1.5).requires_grad_(True)
    ref = torch.randn(4, 6, generator=g, dtype=D) * 1.5
    in_c, out_c = clamps
    kl = LF.kl_estimate(lp, ref, kind, log_ratio_clamp=in_c, output_clamp=out_c)
    torch.testing.assert_close(kl, ref_kl(lp.detach(), ref, kind, in_c, out_c), rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(kl.sum(), lp)
    torch.testing.assert_close(grad, ref_kl_grad(lp.detach(), ref, kind, in_c, out_c), rtol=1e-12, atol=1e-14)


def test_kl_estimate_hand_computed_abs_and_straight_through():
    # log π = [−1, −2], log π_ref = [−1.5, −1] → logr = ref − lp = [−0.5, 1].
    # abs: |logr| = [0.5, 1], d/dlp = −sign(logr) = [1, −1].
    # k1+: value k1 = −logr = [0.5, −1]; gradient of k2 = logr²/2: d/dlp = −logr = [0.5, −1].
    # k3+: value e^logr − 1 − logr = [e^−0.5 − 0.5, e − 2] = [0.106531, 0.718282]; gradient [0.5, −1].
    lp = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=D)
    want = {"abs": ([0.5, 1.0], [1.0, -1.0]), "k1+": ([0.5, -1.0], [0.5, -1.0]),
            "k3+": ([math.exp(-0.5) - 0.5, math.e - 2.0], [0.5, -1.0])}
    for kind, (value, grad) in want.items():
        kl = LF.kl_estimate(lp, ref, kind, output_clamp=5.0)
        (g,) = torch.autograd.grad(kl.sum(), lp)
        torch.testing.assert_close(kl.detach(), torch.tensor(value, dtype=D), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, torch.tensor(grad, dtype=D), rtol=1e-12, atol=1e-12)
    # the clamp bounds the k3+ value, never its (k2) gradient
    kl = LF.kl_estimate(lp, ref, "k3+", log_ratio_clamp=0.25, output_clamp=0.5)
    (g,) = torch.autograd.grad(kl.sum(), lp)
    torch.testing.assert_close(kl.detach(), torch.tensor([math.exp(-0.25) - 0.75, math.exp(0.25) - 1.25], dtype=D))
    torch.testing.assert_close(g, torch.tensor([0.5, -1.0], dtype=D))


def test_kl_estimate_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(100, dtype=D, generator=g) * 3
    ref = torch.randn(100, dtype=D, generator=g) * 3
    assert torch.all(LF.kl_estimate(lp, ref, "k3") >= 0)
    assert torch.all(LF.kl_estimate(lp, lp, "k3") == 0)
    with pytest.raises(ValueError, match="KL estimator"):
        LF.kl_estimate(lp, ref, "k4")


# Clipped policy gradient -----------------------------------------------------------------------

def ref_pg(lp, old, adv, m, clip_low, clip_high, dual_clip, mode, weights=None, **counts):
    """Per-token loss by the formula, then the reference aggregation."""
    B, S = lp.shape
    rows = []
    for i in range(B):
        row = []
        for t in range(S):
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            r = torch.exp(lp[i, t] - old[i, t])
            clipped = torch.clamp(r, 1 - clip_low, 1 + clip_high)
            ell = torch.maximum(-a * r, -a * clipped)
            if dual_clip is not None and a < 0:
                ell = torch.minimum(ell, -dual_clip * a)
            if weights is not None:
                ell = ell * weights[i, t]
            row.append(ell)
        rows.append(torch.stack(row))
    return ref_aggregate(torch.stack(rows), m, mode, **counts)


@pytest.mark.parametrize("mode", LF.AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_clipped_pg_loss_values_grads_metrics(mode, dual_clip):
    g = torch.Generator().manual_seed(5)
    B, S = 6, 5
    lp = torch.randn(B, S, generator=g, dtype=D) - 2
    old = lp + torch.randn(B, S, generator=g, dtype=D) * 0.6  # ratios well outside the clip range
    adv = torch.randn(B, S, generator=g, dtype=D)
    m = (torch.rand(B, S, generator=g) < 0.7).to(D)
    m[2] = 0
    counts = {"num_tokens": int(m.sum()) + 3, "num_seqs": int((m.sum(-1) > 0).sum()) + 1}
    clip_low, clip_high = 0.2, 0.28
    x = lp.clone().requires_grad_(True)
    loss, metrics = LF.clipped_pg_loss(
        x, old, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=mode, **counts
    )
    xr = lp.clone().requires_grad_(True)
    ref = ref_pg(xr, old, adv, m, clip_low, clip_high, dual_clip, mode, **counts)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-14)

    valid = m > 0
    ratio = torch.exp(lp - old)
    N = counts["num_tokens"]
    low = ((adv < 0) & (ratio < 1 - clip_low) & valid).sum().item() / N
    high = ((adv > 0) & (ratio > 1 + clip_high) & valid).sum().item() / N
    assert low > 0 and high > 0
    assert metrics["clip_frac_low"].value.item() == pytest.approx(low, rel=1e-12)
    assert metrics["clip_frac_high"].value.item() == pytest.approx(high, rel=1e-12)
    assert metrics["ratio_mean"].value.item() == pytest.approx(ratio[valid].sum().item() / N, rel=1e-12)
    assert metrics["ratio_min"].value.item() == ratio[valid].min().item()
    assert metrics["ratio_max"].value.item() == ratio[valid].max().item()
    kl_old = (ratio - 1 - torch.log(ratio))[valid].sum().item() / N
    assert metrics["approx_kl"].value.item() == pytest.approx(kl_old, rel=1e-10)
    if dual_clip is not None:
        ell = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
        active = ((adv < 0) & (ell > -dual_clip * adv) & valid).sum().item() / N
        assert metrics["dual_clip_frac"].value.item() == pytest.approx(active, rel=1e-12)
    # The gradient is zero exactly where the clip is active (no dual clip).
    if dual_clip is None:
        active = ((adv < 0) & (ratio < 1 - clip_low)) | ((adv > 0) & (ratio > 1 + clip_high))
        assert torch.all(x.grad[active] == 0)
        assert torch.all(x.grad[~active & valid] != 0)


def test_clipped_pg_loss_sequence_advantages_and_weights():
    g = torch.Generator().manual_seed(6)
    B, S = 4, 6
    lp = torch.randn(B, S, generator=g, dtype=D)
    old = lp + 0.3 * torch.randn(B, S, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    w = torch.rand(B, S, generator=g, dtype=D) * 2
    m = torch.ones(B, S, dtype=D)
    x = lp.clone().requires_grad_(True)
    loss, _ = LF.clipped_pg_loss(x, old, adv, m, weights=w)
    xr = lp.clone().requires_grad_(True)
    ref = ref_pg(xr, old, adv, m, 0.2, 0.2, None, "token-mean", weights=w)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, x), torch.autograd.grad(ref, xr)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="advantages"):
        LF.clipped_pg_loss(lp, old, adv[:-1], m)


def test_clipped_pg_loss_all_masked_and_extreme_ratios_are_finite():
    lp = torch.tensor([[0.0, -50.0, 40.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-80.0, 10.0, -10.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, -2.0]], dtype=D)
    loss, metrics = LF.clipped_pg_loss(lp, old, adv, torch.ones(1, 3, dtype=D), dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(lp.grad))
    lp.grad = None
    loss, metrics = LF.clipped_pg_loss(lp, old, adv, torch.zeros(1, 3, dtype=D))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert metrics["ratio_min"].value.item() == math.inf and metrics["ratio_max"].value.item() == -math.inf


def test_gspo_sequence_ratio_matches_sequence_formula():
    g = torch.Generator().manual_seed(7)
    B, S = 5, 6
    lp = torch.randn(B, S, generator=g, dtype=D) - 1
    old = lp + 0.05 * torch.randn(B, S, generator=g, dtype=D)
    old[0] = lp[0] + 0.5  # a sequence clipped low
    adv = torch.randn(B, generator=g, dtype=D)
    adv[0] = -abs(adv[0])
    m = (torch.rand(B, S, generator=g) < 0.8).to(D)
    m[:, 0] = 1
    eps_l, eps_h = 0.03, 0.04
    x = lp.clone().requires_grad_(True)
    old_eff = LF.sequence_level_old_logprobs(x, old, m)
    loss, metrics = LF.clipped_pg_loss(x, old_eff, adv, m, clip_low=eps_l, clip_high=eps_h, agg="seq-mean-token-mean")
    # GSPO from the paper: s_i = exp(mean_t (lp − old)), ℓ_i = max(−A s_i, −A clip(s_i)), mean over i.
    xr = lp.clone().requires_grad_(True)
    terms = []
    for i in range(B):
        idx = m[i] > 0
        s = torch.exp((xr[i][idx] - old[i][idx]).mean())
        terms.append(torch.maximum(-adv[i] * s, -adv[i] * s.clamp(1 - eps_l, 1 + eps_h)))
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, x), torch.autograd.grad(ref, xr)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert metrics["clip_frac_low"].value.item() > 0
