"""Policy objectives of ``loss.policy_loss`` (CISPO, REINFORCE, GPG, SAPO, GMPO, Clip-Cov, KL-Cov),
the on-policy ratio switch, the KL estimators abs / k1+ / k3+ and the step statistics: the loss
object against float64 references written here from the formulas (value and gradient w.r.t. the
logits), hand-computed cases, and the covariance selection against a whole-batch reference."""

from __future__ import annotations

import math

import pytest
import torch

from mrl.losses import GlobalCounts, PolicyLossConfig, build_loss
from mrl.losses import covariance as COV
from mrl.losses import policy_objectives as PO
from tests.test_losses import VOCAB, assert_rel, make_batch, mask_of, metric, ref_agg, ref_logprobs, run_loss

D = torch.float64


def ref_selection(batch, mode: str, ratio: float, lb: float = 1.0, ub: float = 5.0) -> torch.Tensor:
    """KL-Cov's top-k [B, S] by covariance, or Clip-Cov's band candidates, over the whole batch."""
    m = mask_of(batch)
    lp = batch["old_logprobs"].double()[m]
    adv = batch["advantages"].double()
    adv = (adv.unsqueeze(-1).expand(m.shape) if adv.dim() == 1 else adv)[m]
    cov = (lp - lp.mean()) * (adv - adv.mean())  # [N]
    out = torch.zeros(m.shape, dtype=torch.bool)
    if mode == "kl-cov":
        k = max(1, int(ratio * lp.numel()))
        chosen = torch.zeros(lp.numel(), dtype=torch.bool)
        chosen[torch.topk(cov, k).indices] = True
    else:
        chosen = (cov > lb) & (cov < ub)
    out[m] = chosen
    return out


def ref_policy(cfg: PolicyLossConfig, x64, batch, N, M, select=None, alpha=None):
    """L_policy (+ β·KL) of ``cfg`` in float64, from the formulas of the policy_objectives docstring."""
    m = mask_of(batch)
    lp = ref_logprobs(x64, batch["labels"], m, cfg.temperature)
    old = lp.detach() if cfg.force_on_policy_ratio else torch.where(m, batch["old_logprobs"].double(), 0.0)
    adv = batch["advantages"].double()
    adv = torch.where(m, adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv, 0.0)
    r = torch.exp(lp - old)
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    kind = cfg.policy_loss
    agg = lambda x: ref_agg(x, m, cfg.agg, N, M, cfg.norm_length)  # noqa: E731
    if kind == "ppo-clip":
        loss = agg(torch.maximum(-adv * r, -adv * r.clamp(lo, hi)))
    elif kind == "cispo":
        loss = agg(-r.clamp(lo, hi).detach() * adv * lp)
    elif kind == "reinforce":
        loss = agg(-adv * lp)
    elif kind == "gpg":
        loss = agg(-alpha * adv * lp)
    elif kind == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
        loss = agg(-(4 / tau) * torch.sigmoid(tau * (r - 1)) * adv)
    elif kind == "kl-cov":
        loss = agg(-adv * r + cfg.kl_cov_coef * (lp - old).abs() * select)
    elif kind == "clip-cov":
        lp_s = torch.where(select, lp.detach(), lp)
        r_s = torch.exp(lp_s - old)
        loss = agg(torch.maximum(-adv * r_s, -adv * r_s.clamp(lo, hi)))
    else:  # gmpo, one sequence at a time
        terms = []
        for i in range(lp.shape[0]):
            if not m[i].any():
                continue
            log_r, a = (lp - old)[i][m[i]], adv[i][m[i]]
            kept = torch.where(a > 0, torch.minimum(log_r, torch.tensor(cfg.clip_high, dtype=D)),
                               torch.where(a < 0, torch.maximum(log_r, torch.tensor(-cfg.clip_low, dtype=D)), 0.0))
            terms.append(-a.mean() * torch.exp(kept.mean()))
        loss = torch.stack(terms).sum() / M
    if cfg.kl_coef > 0:
        diff = lp - batch["ref_logprobs"].double()
        kl = {"abs": diff.abs(), "k1+": diff, "k3+": torch.exp(-diff) - 1 + diff, "k1": diff}[cfg.kl_estimator]
        loss = loss + cfg.kl_coef * agg(kl)
    return loss


POLICY_CONFIGS = {
    "cispo": dict(policy_loss="cispo", clip_low=0.1, clip_high=0.25),
    "cispo-seq-mean-truncated-is": dict(policy_loss="cispo", agg="seq-mean-token-mean", is_correction="truncate",
                                        is_level="sequence", is_high=1.5),
    "reinforce": dict(policy_loss="reinforce", agg="seq-mean-token-sum"),
    "gpg": dict(policy_loss="gpg"),
    "sapo": dict(policy_loss="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3),
    "gmpo": dict(policy_loss="gmpo", clip_low=0.4, clip_high=0.3),
    "clip-cov": dict(policy_loss="clip-cov", clip_cov_ratio=0.1, clip_cov_lb=0.5, clip_cov_ub=6.0),
    "kl-cov": dict(policy_loss="kl-cov", kl_cov_ratio=0.1, kl_cov_coef=0.7, agg="seq-mean-token-sum-norm",
                   norm_length=12),
    "force-on-policy": dict(force_on_policy_ratio=True, clip_high=0.28),
    "kl-abs": dict(kl_coef=0.2, kl_estimator="abs"),
}


@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_policy_objective_matches_float64_reference(name):
    cfg = PolicyLossConfig(**POLICY_CONFIGS[name])
    logits, _, batch = make_batch(20, per_seq_adv=name.startswith("gmpo"))
    if name == "gpg":
        batch["advantages"][1] = 0.0  # a zero-advantage row: α = B/(B − 1)
    if cfg.force_on_policy_ratio:
        del batch["old_logprobs"]  # never read
    m = mask_of(batch)
    N, M = int(m.sum()), int(m.any(-1).sum())
    loss_fn = build_loss(cfg, vocab_size=VOCAB)
    loss_fn.prepare_step([batch])
    loss, metrics, grad, _ = run_loss(loss_fn, logits, batch, GlobalCounts(N, M))

    select = alpha = None
    if cfg.policy_loss in ("clip-cov", "kl-cov"):
        select = batch[COV.SELECT_KEY].bool()
        ratio = cfg.clip_cov_ratio if cfg.policy_loss == "clip-cov" else cfg.kl_cov_ratio
        want = ref_selection(batch, cfg.policy_loss, ratio, cfg.clip_cov_lb, cfg.clip_cov_ub)
        if cfg.policy_loss == "kl-cov":
            assert torch.equal(select, want)
        else:  # a hashed choice of min(k, candidates) band tokens
            assert not (select & ~want).any()
            assert int(select.sum()) == min(max(1, int(cfg.clip_cov_ratio * N)), int(want.sum())) > 0
    if cfg.policy_loss == "gpg":
        alpha = M / (M - 1)
        assert torch.allclose(batch[COV.GPG_SCALE_KEY].double(), torch.full((m.shape[0],), alpha, dtype=D))
    x64 = logits.double().requires_grad_(True)
    ref = ref_policy(cfg, x64, batch, N, M, select=select, alpha=alpha)
    if cfg.is_correction != "none":  # the weights are tested in test_is_correction; here: they multiply ℓ
        w = torch.exp(batch["old_logprobs"].double() - batch["behaviour_logprobs"].double())
        seq_w = torch.exp(torch.where(m, torch.log(w), 0.0).sum(-1, keepdim=True)).clamp(0, cfg.is_high)
        x64 = logits.double().requires_grad_(True)
        ref = _weighted_cispo(cfg, x64, batch, seq_w.expand_as(w), N, M)
    ref.backward()
    assert_rel(loss.detach(), ref.detach())
    assert_rel(grad, x64.grad)
    assert metric(metrics, "loss") == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)


def _weighted_cispo(cfg, x64, batch, w, N, M):
    m = mask_of(batch)
    lp = ref_logprobs(x64, batch["labels"], m)
    r = torch.exp(lp - torch.where(m, batch["old_logprobs"].double(), 0.0))
    adv = torch.where(m, batch["advantages"].double(), 0.0)
    return ref_agg(-w * r.clamp(1 - cfg.clip_low, 1 + cfg.clip_high).detach() * adv * lp, m, cfg.agg, N, M)


@pytest.mark.parametrize("kind", ["k1+", "k3+"])
def test_straight_through_kl_has_k1_k3_value_and_k2_gradient(kind):
    logits, _, batch = make_batch(21)
    m = mask_of(batch)
    counts = GlobalCounts(int(m.sum()), int(m.any(-1).sum()))
    cfg = PolicyLossConfig(kl_coef=0.3, kl_estimator=kind, clip_high=0.28)
    loss, metrics, grad, _ = run_loss(build_loss(cfg, vocab_size=VOCAB), logits, batch, counts)
    x64 = logits.double().requires_grad_(True)
    value = ref_policy(cfg, x64, batch, counts.num_tokens, counts.num_seqs)  # k1 / k3 value
    assert_rel(loss.detach(), value.detach())
    x64 = logits.double().requires_grad_(True)
    k2 = PolicyLossConfig(kl_coef=0.3, kl_estimator="k2", clip_high=0.28)
    lp = ref_logprobs(x64, batch["labels"], m)
    grad_ref = ref_policy(PolicyLossConfig(clip_high=0.28), x64, batch, counts.num_tokens, counts.num_seqs)
    grad_ref = grad_ref + k2.kl_coef * ref_agg(0.5 * (lp - batch["ref_logprobs"].double()).square(), m, "token-mean",
                                               counts.num_tokens, counts.num_seqs)
    grad_ref.backward()
    assert_rel(grad, x64.grad)


def test_force_on_policy_ratio_is_one_in_value_with_the_policy_gradient():
    """ppo-clip, cispo and sapo on r = exp(lp − sg(lp)): the value of r = 1, the gradient of REINFORCE."""
    logits, _, batch = make_batch(22)
    m = mask_of(batch)
    counts = GlobalCounts(int(m.sum()), int(m.any(-1).sum()))
    _, _, want, _ = run_loss(build_loss(PolicyLossConfig(policy_loss="reinforce"), vocab_size=VOCAB), logits, batch,
                             counts)
    adv_mean = batch["advantages"].double()[m].sum() / counts.num_tokens
    for kind in ("ppo-clip", "cispo", "sapo"):
        loss_fn = build_loss(PolicyLossConfig(policy_loss=kind, force_on_policy_ratio=True, sapo_tau_pos=1.0,
                                              sapo_tau_neg=1.0), vocab_size=VOCAB)
        assert "old_logprobs" not in loss_fn.required_keys and not loss_fn.batch_needs.old_logprobs
        loss, metrics, grad, _ = run_loss(loss_fn, logits, batch, counts)
        assert_rel(grad, want)
        if kind == "ppo-clip":
            assert loss.item() == pytest.approx(-adv_mean.item(), rel=1e-5)
            assert metric(metrics, "ratio_max") == 1.0 and metric(metrics, "clip_frac_high") == 0.0
        if kind == "sapo":  # ℓ = −(4/τ)·σ(0)·A = −2A at τ = 1
            assert loss.item() == pytest.approx(-2 * adv_mean.item(), rel=1e-5)


# Hand-computed cases: one row, old log-probs 0, log π = [ln 1.5, ln 0.5] (r = [1.5, 0.5]),
# A = [1, −1], token mean over N = 2.

LP = [math.log(1.5), math.log(0.5)]
ADV = [1.0, -1.0]


def _hand(fn, lp=LP, adv=ADV, **kwargs):
    lp = torch.tensor([lp], dtype=D, requires_grad=True)
    old = torch.zeros_like(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, _ = fn(lp, old, torch.tensor([adv], dtype=D), mask, num_tokens=2, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad[0].tolist()


def test_hand_computed_cispo_reinforce_gpg_sapo():
    # CISPO ε = 0.2: w = clip(r) = [1.2, 0.8]; ℓ = −w·A·log π = [−1.2·0.405465, −0.8·0.693147]
    # = [−0.486558, −0.554518], loss = −0.520538; ∂/∂log π = −w·A / 2 = [−0.6, 0.4].
    loss, grad = _hand(PO.cispo_loss, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-0.5205379370888767, abs=1e-12) and grad == pytest.approx([-0.6, 0.4])
    # REINFORCE: ℓ = −A·log π = [−0.405465, −0.693147], loss = −0.549306, grad = −A/2 = [−0.5, 0.5];
    # GPG with α = 2: twice both.
    lp = torch.tensor([LP], dtype=D, requires_grad=True)
    loss, _ = PO.reinforce_loss(lp, torch.tensor([ADV], dtype=D), torch.ones(1, 2, dtype=torch.bool), num_tokens=2)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-0.5493061443340548, abs=1e-12) and grad[0].tolist() == [-0.5, 0.5]
    lp = torch.tensor([LP], dtype=D, requires_grad=True)
    loss, _ = PO.reinforce_loss(lp, torch.tensor([ADV], dtype=D), torch.ones(1, 2, dtype=torch.bool),
                                scale=torch.tensor([2.0], dtype=D), num_tokens=2)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-1.0986122886681096, abs=1e-12) and grad[0].tolist() == [-1.0, 1.0]
    # SAPO τ+ = 1, τ− = 1.05: token 1 (A > 0): σ(0.5) = 0.622459, ℓ = −4·0.622459 = −2.489837,
    # ∂ℓ/∂log π = −4σ(1 − σ)·r·A = −1.410022; token 2 (A < 0): σ(1.05·(−0.5)) = σ(−0.525) = 0.371684,
    # ℓ = +(4/1.05)·0.371684 = 1.415938, ∂ℓ/∂log π = +4σ(1 − σ)·0.5 = 0.467070.
    # loss = (−2.489837 + 1.415938)/2 = −0.536949; grad = [−0.705011, 0.233535].
    loss, grad = _hand(PO.sapo_loss, tau_pos=1.0, tau_neg=1.05)
    assert loss == pytest.approx(-0.5369494972520259, abs=1e-12)
    assert grad == pytest.approx([-0.7050111366047835, 0.23353495582134814], abs=1e-12)


def test_hand_computed_gmpo_kl_cov_clip_cov():
    # GMPO, log-space bounds [−0.4, 0.4], two rows with log r = [0.405465, −0.693147] each;
    # row 1 A = +1: l̃ = [min(l, 0.4)] = [0.4, −0.693147], mean −0.146574, ρ = 0.863662, ℓ = −0.863662;
    # row 2 A = −1: l̃ = [max(l, −0.4)] = [0.405465, −0.4], mean 0.002733, ρ = 1.002736, ℓ = +1.002736;
    # loss = (−0.863662 + 1.002736)/2 = 0.069537. ∂/∂log π: row 1 [0 (clipped), −ρ/2/2 = −0.215916],
    # row 2 [+ρ/2/2 = 0.250684, 0 (clipped)].
    lp = torch.tensor([LP, LP], dtype=D, requires_grad=True)
    loss, metrics = PO.gmpo_loss(lp, torch.zeros_like(lp), torch.tensor([1.0, -1.0], dtype=D),
                                 torch.ones(2, 2, dtype=torch.bool), clip_low=0.4, clip_high=0.4, num_tokens=4,
                                 num_seqs=2)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(0.06953705901391138, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.21591554321375223], [0.2506840727207079, 0.0]], dtype=D))
    assert metrics["clip_frac_high"].value.item() == 0.25 and metrics["clip_frac_low"].value.item() == 0.25
    # KL-Cov, coefficient 1, token 2 selected: ℓ = −A·r + |log r|·sel = [−1.5, 0.5 + 0.693147];
    # loss = −0.153426; ∂/∂log π = [−A·r, −A·r + sign(log r)]/2 = [−0.75, (0.5 − 1)/2 = −0.25].
    loss, grad = _hand(PO.kl_cov_loss, select=torch.tensor([[False, True]]), coef=1.0)
    assert loss == pytest.approx((-1.5 + 0.5 + math.log(2)) / 2, abs=1e-12) and grad == pytest.approx([-0.75, -0.25])
    # Clip-Cov, r = [1.1, 0.9] (inside the clip), token 1 selected: ℓ = −A·r = [−1.1, 0.9], loss −0.1
    # (the value is kept), ∂/∂log π = [0 (stopped), −A·r/2 = 0.45].
    lp2 = [math.log(1.1), math.log(0.9)]
    loss, grad = _hand(PO.clip_cov_loss, lp=lp2, select=torch.tensor([[True, False]]))
    assert loss == pytest.approx(-0.1, abs=1e-12) and grad == pytest.approx([0.0, 0.45])


def test_clip_cov_keeps_the_value_where_verl_zeroes_the_term():
    """The documented difference: same gradient as verl's corr = 0, loss larger by the selected terms."""
    lp = torch.tensor([[math.log(1.1), math.log(0.9), math.log(1.05)]], dtype=D, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=D)
    select = torch.tensor([[True, False, True]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    ours, _ = PO.clip_cov_loss(lp, torch.zeros_like(lp), adv, mask, select, num_tokens=3)
    (g_ours,) = torch.autograd.grad(ours, lp)
    r = torch.exp(lp)
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    verl = (per_token * (~select).to(D)).sum() / 3
    (g_verl,) = torch.autograd.grad(verl, lp)
    torch.testing.assert_close(g_ours, g_verl)
    assert ours.item() - verl.item() == pytest.approx(per_token[select].sum().item() / 3, abs=1e-12)


def test_covariance_selection_is_layout_independent_and_seeded():
    logits, _, batch = make_batch(23, B=8)
    whole = {k: v.clone() for k, v in batch.items()}
    COV.covariance_selection([whole], "clip-cov", ratio=0.1, lower=0.5, upper=6.0, seed=7)
    parts = [{k: v[i:i + 2].clone() for k, v in batch.items()} for i in range(0, 8, 2)]
    COV.covariance_selection(parts, "clip-cov", ratio=0.1, lower=0.5, upper=6.0, seed=7)
    assert torch.equal(torch.cat([p[COV.SELECT_KEY] for p in parts]), whole[COV.SELECT_KEY])
    other = {k: v.clone() for k, v in batch.items()}
    COV.covariance_selection([other], "clip-cov", ratio=0.1, lower=0.5, upper=6.0, seed=8)
    assert other[COV.SELECT_KEY].sum() == whole[COV.SELECT_KEY].sum()
    assert not torch.equal(other[COV.SELECT_KEY], whole[COV.SELECT_KEY])  # another seed, another draw
    # rows permuted: the same tokens are chosen (the hash reads values, not positions)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[perm].clone() for k, v in batch.items()}
    COV.covariance_selection([shuffled], "clip-cov", ratio=0.1, lower=0.5, upper=6.0, seed=7)
    assert torch.equal(shuffled[COV.SELECT_KEY], whole[COV.SELECT_KEY][perm])


def test_step_statistics_missing_and_config_errors_name_the_field():
    logits, _, batch = make_batch(24)
    m = mask_of(batch)
    counts = GlobalCounts(int(m.sum()), int(m.any(-1).sum()))
    for kind in ("clip-cov", "kl-cov", "gpg"):
        with pytest.raises(ValueError, match="prepare_step"):
            build_loss(PolicyLossConfig(policy_loss=kind), vocab_size=VOCAB)(logits, batch, counts)
    for kwargs, field in [(dict(policy_loss="trpo"), "policy_loss"), (dict(policy_loss="cispo", dual_clip=3.0),
                                                                      "dual_clip"),
                          (dict(policy_loss="sapo", ratio_level="sequence"), "ratio_level"),
                          (dict(sapo_tau_neg=0.0), "sapo_tau_neg"), (dict(kl_cov_ratio=0.0), "kl_cov_ratio"),
                          (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb"), (dict(kl_estimator="k2+"),
                                                                                   "kl_estimator")]:
        with pytest.raises(ValueError, match=field):
            PolicyLossConfig(**kwargs)
    # objectives without a ratio read no old log-probs
    assert "old_logprobs" not in build_loss(PolicyLossConfig(policy_loss="reinforce")).required_keys
    assert "old_logprobs" in build_loss(PolicyLossConfig(policy_loss="kl-cov", force_on_policy_ratio=True)).required_keys
