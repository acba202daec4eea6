"""Preference losses (``DPOLoss`` with every ``loss_type``, mixes, LD-DPO, WPO, SFT normalisers)
against float64 references written here from the formulas, on random inputs and hand-computed cases.

The reference works on the whole batch at once, as TRL's ``DPOTrainer`` does with one device and no
gradient accumulation (AOT sorts the whole batch, BCO's shift includes the batch mean); the loss
under test runs over micro-batches with ``prepare_step`` and global counts, and must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mrl.losses import DPOLossConfig, GlobalCounts, build_loss, compute_global_counts
from mrl.losses import preference as P
from mrl.ops import vocab_parallel_logprobs

D = torch.float64
IGN = -100
VOCAB, PADDED = 37, 40
TYPES = list(P.PREFERENCE_LOSSES)


def make_pairs(seed: int, pairs: int = 6, S: int = 10, scale: float = 3.0, dtype=torch.float32):
    """Rows 2i chosen, 2i + 1 rejected, of different lengths; pair 1 padding, pair 3 half-empty."""
    g = torch.Generator().manual_seed(seed)
    B = 2 * pairs
    logits = (torch.randn(B, S, PADDED, generator=g) * scale).to(dtype)
    ref_logits = torch.randn(B, S, PADDED, generator=g) * scale
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[:, :2] = IGN  # prompt
    lengths = torch.randint(1, S - 1, (B,), generator=g)
    loss_mask = (torch.arange(S) < 2 + lengths.unsqueeze(-1)).long()
    loss_mask[2:4] = 0  # a padding pair
    loss_mask[7] = 0  # pair 3: the rejected row is empty, so the pair is not valid
    return logits, {"labels": labels, "loss_mask": loss_mask, "ref_logits": ref_logits}


def mask_of(batch):
    return (batch["labels"] != IGN) & (batch["loss_mask"] != 0)


def token_logprobs(logits, labels, mask):
    logp = torch.log_softmax(logits.double()[..., :VOCAB], -1)
    picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), logp


# The float64 reference -------------------------------------------------------------------------


def ref_pair(kind, c, r, beta, eps, tau, shift=None):
    """TRL's per-pair formulas on float64 tensors (AOT is done on the whole batch elsewhere)."""
    d = c - r
    ls = F.logsigmoid
    if kind == "sigmoid":
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if kind == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * d)
    if kind == "robust":
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if kind == "exo_pair":
        e = eps or 1e-3
        return torch.sigmoid(beta * d) * (ls(beta * d) - math.log(1 - e)) + torch.sigmoid(-beta * d) * (
            ls(-beta * d) - math.log(e))
    if kind == "nca_pair":
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if kind == "bco_pair":
        return -ls(beta * c - shift) - ls(-(beta * r - shift))
    if kind == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if kind == "apo_down":
        return torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * d))
    if kind == "discopop":
        z = beta * d
        m = torch.sigmoid(z / tau)
        return -ls(z) * (1 - m) + torch.exp(-z) * m
    raise AssertionError(kind)


def ref_dpo(cfg: DPOLossConfig, x64, batch, shift_history=()):
    """The whole-batch float64 loss (TRL's form) of ``cfg``; ``shift_history``: earlier BCO batch means."""
    m = mask_of(batch)
    lp, logp_full = token_logprobs(x64, batch["labels"], m)
    ref, _ = token_logprobs(batch["ref_logits"], batch["labels"], m)
    weights = torch.ones_like(lp)
    if cfg.ld_alpha is not None:  # first min(len_c, len_r) valid tokens weigh 1, the rest α
        for i in range(0, lp.shape[0], 2):
            public = min(int(m[i].sum()), int(m[i + 1].sum()))
            for row in (i, i + 1):
                ranks = torch.cumsum(m[row].long(), 0)
                weights[row] = torch.where(ranks <= public, 1.0, cfg.ld_alpha).double()

    def reduce(x, average):
        s = (x * weights * m).sum(-1)
        return s / m.sum(-1).clamp_min(1) if average else s

    seq, ref_seq = reduce(lp, cfg.average_logprobs), reduce(ref, cfg.average_logprobs)
    valid = torch.tensor([bool(m[i].any() and m[i + 1].any()) for i in range(0, m.shape[0], 2)])
    c = (seq - ref_seq)[0::2][valid]
    r = (seq - ref_seq)[1::2][valid]
    n = int(valid.sum())
    pair_w = torch.ones(n, dtype=D)
    if cfg.use_weighting:  # TRL: mean_t (log p − logsumexp(2·log p)), clamp(exp(ω_c + ω_r), max=1)
        adjusted = lp - torch.logsumexp(2 * logp_full, -1)
        omega = ((adjusted * m).sum(-1) / m.sum(-1).clamp_min(1)).detach()
        pair_w = torch.exp(omega[0::2] + omega[1::2])[valid].clamp(max=1.0)
    total = torch.zeros((), dtype=D)
    batch_mean = (cfg.beta * torch.cat([c, r])).mean().item()
    shift = sum([*shift_history, batch_mean]) / (len(shift_history) + 1)
    for kind, weight in zip(cfg.loss_types, cfg.weights):
        if kind == "aot":
            h = (seq[0::2] - seq[1::2])[valid]
            gm = (ref_seq[0::2] - ref_seq[1::2])[valid]
            d = torch.sort(h).values - torch.sort(gm).values
            per = -(1 - cfg.label_smoothing) * F.logsigmoid(cfg.beta * d) - cfg.label_smoothing * F.logsigmoid(-cfg.beta * d)
        elif kind == "aot_unpaired":
            d = torch.sort(c).values - torch.sort(r).values
            per = -(1 - cfg.label_smoothing) * F.logsigmoid(cfg.beta * d) - cfg.label_smoothing * F.logsigmoid(-cfg.beta * d)
        else:
            per = ref_pair(kind, c, r, cfg.beta, cfg.label_smoothing, cfg.discopop_tau, shift)
        if kind in ("aot", "aot_unpaired") and cfg.use_weighting:
            # sorted positions carry no pair identity: weight by the pair whose policy side sits there
            raise AssertionError("the reference does not combine AOT with WPO")
        total = total + weight * (per * pair_w).sum() / n
    if cfg.sft_coef > 0:
        if cfg.sft_normalizer == "chosen_tokens":
            chosen_m = m[0::2] & valid.unsqueeze(-1)
            sft = -(lp[0::2] * chosen_m).sum() / chosen_m.sum()
        else:
            average = cfg.average_logprobs if cfg.sft_average_logprobs is None else cfg.sft_average_logprobs
            s = (lp * m).sum(-1)
            s = s / m.sum(-1).clamp_min(1) if average else s
            sft = -s[0::2][valid].sum() / n
        total = total + cfg.sft_coef * sft
    return total, batch_mean


def run_dpo(cfg: DPOLossConfig, logits, batch, micro: int = 1, loss_fn=None):
    """The loss over ``micro`` micro-batches as the trainer runs it: prepare_step, global counts, Σ."""
    loss_fn = loss_fn or build_loss(cfg, vocab_size=VOCAB)
    rows = batch["labels"].shape[0] // micro
    parts = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(micro)]
    if loss_fn.needs_policy_logprobs:
        for i, part in enumerate(parts):
            part["old_logprobs"] = vocab_parallel_logprobs(
                logits[i * rows:(i + 1) * rows].detach(), torch.where(mask_of(part), part["labels"], IGN),
                vocab_size=VOCAB)
        loss_fn.prepare_step(parts)
    counts = compute_global_counts(parts, paired=True)
    x = logits.clone().requires_grad_(True)
    total, metrics = torch.zeros(()), []
    for i, part in enumerate(parts):
        loss, mt = loss_fn(x[i * rows:(i + 1) * rows], part, counts)
        total = total + loss
        metrics.append(mt)
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad, metrics


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5) -> None:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} × {scale:.3g}"


CASES = [dict(loss_type=t) for t in TYPES] + [
    dict(loss_type="sigmoid", label_smoothing=0.2),
    dict(loss_type="robust", label_smoothing=0.15),
    dict(loss_type="exo_pair", label_smoothing=0.1),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="discopop", discopop_tau=0.5),
    dict(loss_type=["sigmoid", "bco_pair", "aot_unpaired"], loss_weights=[0.8, 0.2, 0.5], sft_coef=0.3),
    dict(loss_type=["ipo", "nca_pair"], average_logprobs=True, sft_coef=0.5, sft_average_logprobs=False),
    dict(loss_type="sigmoid", ld_alpha=0.3, sft_coef=1.0, sft_normalizer="chosen_tokens"),
    dict(loss_type=["apo_zero", "sppo_hard"], ld_alpha=0.0, use_weighting=True, beta=0.5),
    dict(loss_type="hinge", use_weighting=True, sft_coef=0.2, average_logprobs=True),
]


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_loss_matches_float64_reference(kwargs, micro):
    cfg = DPOLossConfig(beta=kwargs.pop("beta", 0.2), **kwargs)
    logits, batch = make_pairs(7)
    x64 = logits.double().requires_grad_(True)
    expected, _ = ref_dpo(cfg, x64, batch)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    loss, grad, metrics = run_dpo(cfg, logits, batch, micro=micro)
    assert_close(loss, expected.detach())
    assert_close(grad, expected_grad)
    assert sum(m["num_pairs"].value.item() for m in metrics) == 4
    assert torch.all(grad[2:4] == 0) and torch.all(grad[6:8] == 0)  # padding and half-empty pairs


def test_hand_computed_pair_losses():
    """β = 1, c = 1, r = −1 (Δ = 2), numbers from the formulas:

    sigmoid  −log σ(2) = 0.1269280
    ipo      (2 − 0.5)² = 2.25
    hinge    max(0, 1 − 2) = 0; at β = 0.25: 1 − 0.5 = 0.5
    robust   ε = 0.1: (0.9·0.1269280 − 0.1·2.1269280)/0.8 = (0.1142352 − 0.2126928)/0.8 = −0.1230720
    exo_pair ε = 0.1: σ(2)·(log σ(2) − ln 0.9) + σ(−2)·(log σ(−2) − ln 0.1)
             = 0.8807971·(−0.0215675) + 0.1192029·0.1756571 = −0.0189966 + 0.0209388 = 0.0019422
    nca_pair −log σ(1) − ½ log σ(−1) − ½ log σ(1) = 1.5·0.3132617 + 0.5·1.3132617 = 1.1265234
    bco_pair δ = 0.5: −log σ(0.5) − log σ(1.5) = 0.4740770 + 0.2014133 = 0.6754903
    sppo     (1 − 0.5)² + (−1 + 0.5)² = 0.5
    apo_zero (1 − σ(1)) + σ(−1) = 2·0.2689414 = 0.5378828
    apo_down σ(1) + 1 − σ(2) = 0.7310586 + 0.1192029 = 0.8502615
    discopop τ = 1: (1 − σ(2))·0.1269280 + σ(2)·e⁻² = 0.0151302 + 0.1192029 = 0.1343331;
             τ = 0.05: σ(40) ≈ 1, so ≈ e⁻² = 0.1353353
    """
    c, r = torch.tensor([1.0], dtype=D), torch.tensor([-1.0], dtype=D)
    expected = {
        "sigmoid": (0.1269280, {}), "ipo": (2.25, {}), "hinge": (0.0, {}), "robust": (-0.1230720, dict(label_smoothing=0.1)),
        "exo_pair": (0.0019422, dict(label_smoothing=0.1)), "nca_pair": (1.1265234, {}),
        "bco_pair": (0.6754903, dict(bco_shift=torch.tensor([0.5], dtype=D))), "sppo_hard": (0.5, {}),
        "apo_zero": (0.5378828, {}), "apo_down": (0.8502615, {}), "discopop": (0.1343331, dict(discopop_tau=1.0)),
    }
    for kind, (value, kwargs) in expected.items():
        assert P.pair_loss(kind, c, r, beta=1.0, **kwargs).item() == pytest.approx(value, abs=2e-7), kind
    assert P.pair_loss("hinge", c, r, beta=0.25).item() == pytest.approx(0.5)
    assert P.pair_loss("discopop", c, r, beta=1.0).item() == pytest.approx(0.1353353, abs=2e-7)


def test_hand_computed_pair_gradients():
    """(∂ℓ/∂c, ∂ℓ/∂r) at β = 1, c = 1, r = −1, from the derivatives of the formulas:

    sigmoid   ∓σ(−βΔ)·β: (−σ(−2), σ(−2)) = (−0.1192029, 0.1192029)
    ipo       ±2(Δ − 1/(2β)) = (3, −3);   hinge at β = 0.25: (−β, β) = (−0.25, 0.25)
    sppo_hard (2(c − 1/2), 2(r + 1/2)) = (1, −1)
    apo_zero  (−σ(c)σ(−c), σ(r)σ(−r)) = (−0.1966119, 0.1966119)
    nca_pair  (−σ(−c) + ½σ(c), ½σ(r)) = (−0.2689414 + 0.3655293, 0.1344707) = (0.0965879, 0.1344707)
    bco_pair  δ = 0.5: (−σ(−(c − δ)), σ(r − δ)) = (−σ(−0.5), σ(−1.5)) = (−0.3775407, 0.1824255)
    """
    expected = {
        "sigmoid": ((-0.1192029, 0.1192029), 1.0, {}), "ipo": ((3.0, -3.0), 1.0, {}),
        "hinge": ((-0.25, 0.25), 0.25, {}), "sppo_hard": ((1.0, -1.0), 1.0, {}),
        "apo_zero": ((-0.1966119, 0.1966119), 1.0, {}), "nca_pair": ((0.0965879, 0.1344707), 1.0, {}),
        "bco_pair": ((-0.3775407, 0.1824255), 1.0, dict(bco_shift=torch.tensor([0.5], dtype=D))),
    }
    for kind, (grads, beta, kwargs) in expected.items():
        c = torch.tensor([1.0], dtype=D, requires_grad=True)
        r = torch.tensor([-1.0], dtype=D, requires_grad=True)
        gc, gr = torch.autograd.grad(P.pair_loss(kind, c, r, beta=beta, **kwargs).sum(), (c, r))
        assert (gc.item(), gr.item()) == pytest.approx(grads, abs=2e-7), kind


def test_aot_hand_computed_sort_partners():
    """Two pairs, β = 1. aot: policy margins h = (3, −1), reference margins g = (0, 2); sorted
    h = (−1, 3), sorted g = (0, 2), so d = (−1, 1) and the loss is [−log σ(−1) − log σ(1)]/2 =
    (1.3132617 + 0.3132617)/2 = 0.8132617. Pair 0 (h = 3, rank 1) is matched with g = 2, pair 1
    with g = 0. aot_unpaired: c = (2, −1), r = (0, 1); sorted c = (−1, 2), sorted r = (0, 1):
    d = (−1, 1) again; c = 2 (rank 1) meets r = 1, c = −1 meets r = 0; r = 0 (rank 0) meets c = −1."""
    h, g = torch.tensor([3.0, -1.0], dtype=D), torch.tensor([0.0, 2.0], dtype=D)
    c, r = torch.tensor([2.0, -1.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    stats = P.step_statistics(["aot", "aot_unpaired"], c, r, h, g, torch.tensor([True, True]), beta=1.0)
    assert stats["aot_partner"].tolist() == [2.0, 0.0]
    assert stats["aot_rejected_partner"].tolist() == [1.0, 0.0]
    assert stats["aot_chosen_partner"].tolist() == [-1.0, 2.0]
    aot = P.pair_loss("aot", c, r, beta=1.0, policy_margin=h, aot_partner=stats["aot_partner"])
    assert aot.mean().item() == pytest.approx(0.8132617, abs=2e-7)
    unpaired = P.pair_loss("aot_unpaired", c, r, beta=1.0,
                           aot_unpaired_partners=(stats["aot_rejected_partner"], stats["aot_chosen_partner"]))
    assert unpaired.mean().item() == pytest.approx(0.8132617, abs=2e-7)


def test_ld_dpo_hand_computed_weights():
    """Chosen row with 2 valid tokens, rejected with 4: l_p = 2, so the rejected row's tokens 3 and 4
    weigh α. With token log-probs (−1, −2) and (−1, −1, −3, −5), α = 0.5: chosen −3, rejected
    −1 − 1 + 0.5·(−3 − 5) = −6."""
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    w = P.length_desensitized_weights(mask, 0.5)
    assert w.tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0.5, 0.5]]
    lp = torch.tensor([[-1.0, -2.0, 0, 0, 0], [0, -1.0, -1.0, -3.0, -5.0]])
    assert (lp * w).sum(-1).tolist() == [-3.0, -6.0]


def test_wpo_weights_hand_computed():
    """A uniform next-token distribution gives log p(y) − log Σ p² = log(1/V) − log(1/V) = 0, weight 1.
    One 2-token distribution (0.8, 0.2) whose label has p = 0.2: log 0.2 − log(0.68) = −1.2237754 per
    token; a pair of such rows (one token each) weighs exp(−2.4475508) = 0.0865052."""
    mask = torch.ones(2, 1, dtype=torch.bool)
    zero = P.wpo_log_weights(torch.full((2, 1), math.log(1 / 5)), torch.full((2, 1), math.log(1 / 5)), mask)
    assert P.wpo_pair_weights(zero).tolist() == [1.0]
    log_w = P.wpo_log_weights(torch.full((2, 1), math.log(0.2), dtype=D), torch.full((2, 1), math.log(0.68), dtype=D), mask)
    assert P.wpo_pair_weights(log_w).item() == pytest.approx(0.0865052, abs=1e-7)


def test_sft_normalizers_hand_computed():
    """One valid pair; chosen token log-probs (−1, −3) (2 tokens), rejected 1 token. "pairs" with
    sums: −(−4)/1 = 4; with means: 2; "chosen_tokens": (1 + 3)/2 = 2 over the 2 chosen tokens; a
    second, padding pair adds nothing to either count."""
    lp = torch.tensor([[-1.0, -3.0], [-0.5, 0.0], [-9.0, -9.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    pairs = torch.tensor([True, False])
    batch = {"labels": torch.where(mask, 0, IGN)}
    counts = compute_global_counts([batch], paired=True)
    assert (counts.num_pairs, counts.num_chosen_tokens) == (1, 2)
    for kwargs, expected in ((dict(), 4.0), (dict(sft_average_logprobs=True), 2.0),
                             (dict(sft_normalizer="chosen_tokens"), 2.0)):
        loss_fn = build_loss(DPOLossConfig(sft_coef=1.0, **kwargs))
        assert loss_fn._sft_loss(lp, mask, pairs, counts.num_pairs, counts.num_chosen_tokens).item() == expected


def test_bco_shift_is_a_running_mean_over_steps_and_checkpointed():
    cfg = DPOLossConfig(loss_type="bco_pair", beta=0.3)
    loss_fn = build_loss(cfg, vocab_size=VOCAB)
    history = []
    for step, seed in enumerate((11, 12, 13)):
        logits, batch = make_pairs(seed)
        x64 = logits.double().requires_grad_(True)
        expected, batch_mean = ref_dpo(cfg, x64, batch, shift_history=history)
        loss, _, metrics = run_dpo(cfg, logits, batch, micro=2, loss_fn=loss_fn)
        history.append(batch_mean)
        assert loss.item() == pytest.approx(expected.item(), rel=2e-5), step
        shift = sum(m["bco_shift"].value.item() for m in metrics)
        assert shift == pytest.approx(sum(history) / len(history), rel=1e-5)
    restored = build_loss(cfg, vocab_size=VOCAB)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.bco_shift.state_dict() == loss_fn.bco_shift.state_dict() and loss_fn.bco_shift.count == 3


def test_documented_differences_from_trl():
    """AOT: TRL sorts within each device micro-batch; mrl sorts the step's whole batch, so its loss
    does not depend on the split (and equals TRL's on one unsplit batch, checked above). LD-DPO:
    with ``ref_seq_logps`` given, only the policy is α-weighted (TRL's convention)."""
    cfg = DPOLossConfig(loss_type="aot_unpaired")
    logits, batch = make_pairs(21, pairs=8)
    whole, _, _ = run_dpo(cfg, logits, batch, micro=1)
    split, _, _ = run_dpo(cfg, logits, batch, micro=4)
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    m = mask_of(batch)
    lp = token_logprobs(logits, batch["labels"], m)[0]
    rows = [slice(4 * i, 4 * i + 4) for i in range(4)]  # TRL with 4 devices: sort inside each
    per_device = []
    for rs in rows:
        mm = m[rs]
        ok = mm[0::2].any(-1) & mm[1::2].any(-1)
        ref = token_logprobs(batch["ref_logits"][rs], batch["labels"][rs], mm)[0]
        ratio = (lp[rs] * mm).sum(-1) - (ref * mm).sum(-1)
        d = torch.sort(ratio[0::2][ok]).values - torch.sort(ratio[1::2][ok]).values
        per_device.append(-F.logsigmoid(0.1 * d).sum())
    trl = (sum(per_device) / int((m[0::2].any(-1) & m[1::2].any(-1)).sum())).item()
    assert abs(trl - whole.item()) > 1e-4  # the split changes TRL's value, not mrl's

    ld = DPOLossConfig(ld_alpha=0.5)
    logits, batch = make_pairs(22)
    m = mask_of(batch)
    ref_plain = (token_logprobs(batch["ref_logits"], batch["labels"], m)[0] * m).sum(-1).float()
    given = {k: v for k, v in batch.items() if k != "ref_logits"} | {"ref_seq_logps": ref_plain}
    x64 = logits.double().requires_grad_(True)
    w = P.length_desensitized_weights(m, 0.5).double()
    seq = (token_logprobs(x64, batch["labels"], m)[0] * w).sum(-1)
    valid = m[0::2].any(-1) & m[1::2].any(-1)
    delta = ((seq - ref_plain.double())[0::2] - (seq - ref_plain.double())[1::2])[valid]
    expected = -F.logsigmoid(0.1 * delta).mean()
    loss, _, _ = run_dpo(ld, logits, given)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    both, _, _ = run_dpo(ld, logits, batch)
    assert abs(both.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("kind", TYPES)
def test_hostile_inputs_are_finite(kind):
    """±1e4 logits (fp32 and bf16) and an all-masked micro-batch."""
    kwargs = dict(loss_type=kind, sft_coef=0.1, use_weighting=kind not in ("aot", "aot_unpaired"))
    for dtype in (torch.float32, torch.bfloat16):
        logits, batch = make_pairs(30, scale=1e4, dtype=dtype)
        loss, grad, _ = run_dpo(DPOLossConfig(**kwargs), logits, batch, micro=2)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.dtype == dtype, (kind, dtype)
    logits, batch = make_pairs(31)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    loss, grad, _ = run_dpo(DPOLossConfig(**kwargs), logits, batch)
    assert loss.item() == 0.0 and grad.abs().max() == 0.0


def test_bf16_close_to_fp32():
    cfg = DPOLossConfig(loss_type=["sigmoid", "aot"], loss_weights=[1.0, 0.5], sft_coef=0.1)
    logits, batch = make_pairs(32)
    l32, g32, _ = run_dpo(cfg, logits.bfloat16().float(), batch)
    l16, g16, _ = run_dpo(cfg, logits.bfloat16(), batch)
    assert l16.item() == pytest.approx(l32.item(), rel=1e-5)
    assert (g16.float() - g32).abs().max() <= 1e-2 * g32.abs().max()


def test_missing_step_statistics_and_config_errors_name_the_field():
    logits, batch = make_pairs(33)
    counts = compute_global_counts([batch], paired=True)
    with pytest.raises(ValueError, match="prepare_step"):
        build_loss(DPOLossConfig(loss_type="aot"), vocab_size=VOCAB)(logits, batch, counts)
    with pytest.raises(ValueError, match="num_chosen_tokens"):
        build_loss(DPOLossConfig(sft_coef=1.0, sft_normalizer="chosen_tokens"), vocab_size=VOCAB)(
            logits, batch, GlobalCounts(counts.num_tokens, counts.num_seqs, counts.num_pairs))
    with pytest.raises(ValueError, match="bco_shift"):
        bad = dict(batch, bco_shift=torch.zeros(3))
        build_loss(DPOLossConfig(loss_type="bco_pair"), vocab_size=VOCAB)(logits, bad, counts)
    for kwargs, field in (
        (dict(loss_type="kto"), "loss_type"), (dict(loss_type=[]), "loss_type"),
        (dict(loss_type=["sigmoid", "sigmoid"]), "loss_type"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_weights=[-1.0]), "loss_weights"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(label_smoothing=0.5), "label_smoothing"), (dict(discopop_tau=0.0), "discopop_tau"),
        (dict(ld_alpha=1.5), "ld_alpha"), (dict(ld_alpha=0.5, average_logprobs=True), "ld_alpha"),
        (dict(sft_normalizer="tokens"), "sft_normalizer"),
        (dict(sft_normalizer="chosen_tokens", sft_average_logprobs=True), "sft_average_logprobs"),
    ):
        with pytest.raises(ValueError, match=rf"^{field}\b"):
            DPOLossConfig(**kwargs)
    assert DPOLossConfig(loss_type=["sigmoid", "ipo"]).weights == (1.0, 1.0)
