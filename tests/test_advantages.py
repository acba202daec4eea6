"""Advantage estimators (mrl.rl.advantages) against float64 references written with plain loops,
hand-computed cases, edge cases, the DP gathering of mrl.rl.advantage_batches, and the config."""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass

import pytest
import torch

from mrl.rl import advantages as A
from mrl.rl.config import ADVANTAGE_ESTIMATORS, KL_IN_REWARD_ESTIMATORS, RolloutConfig

D = torch.float64


def _random_batch(seed: int, rows: int = 12, length: int = 9, group: int = 4):
    """Rows with gaps in their masks (a prompt, a response, padding, and a masked hole)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for i in range(rows):
        start = int(torch.randint(0, 3, (1,), generator=gen))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        mask[i, start:end] = True
        if end - start > 3 and i % 3 == 0:
            mask[i, start + 1] = False  # a hole inside the response
    return {
        "rewards": torch.rand(rows, generator=gen, dtype=D),
        "token_rewards": torch.randn(rows, length, generator=gen, dtype=D),
        "values": torch.randn(rows, length, generator=gen, dtype=D),
        "old": -torch.rand(rows, length, generator=gen, dtype=D) * 3,
        "ref": -torch.rand(rows, length, generator=gen, dtype=D) * 3,
        "mask": mask,
        "group_ids": torch.arange(rows) // group,
    }


def _valid(mask_row) -> list[int]:
    return [t for t in range(len(mask_row)) if mask_row[t]]


@dataclass
class Settings:
    """The advantage fields of RolloutConfig, without its validation (references use odd values)."""

    advantage_estimator: str = "grpo"
    normalize_std: bool = True
    leave_one_out: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    kl_in_reward_coef: float = 0.0
    pass_k: int = 2


# ---- references (plain Python over float64 numbers) ----------------------------------------------


def ref_returns(rewards_row, mask_row, gamma):
    out = [0.0] * len(mask_row)
    carry = 0.0
    for t in reversed(_valid(mask_row)):
        carry = float(rewards_row[t]) + gamma * carry
        out[t] = carry
    return out


def ref_gae(rewards_row, values_row, mask_row, gamma, lam):
    valid = _valid(mask_row)
    adv = [0.0] * len(mask_row)
    ret = [0.0] * len(mask_row)
    following = 0.0
    for k in range(len(valid) - 1, -1, -1):
        t = valid[k]
        next_value = float(values_row[valid[k + 1]]) if k + 1 < len(valid) else 0.0
        delta = float(rewards_row[t]) + gamma * next_value - float(values_row[t])
        following = delta + gamma * lam * following
        adv[t] = following
        ret[t] = following + float(values_row[t])
    return adv, ret


def ref_whiten(values, mask):
    items = [float(values[i][t]) for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    mean = sum(items) / len(items)
    var = sum((x - mean) ** 2 for x in items) / len(items)
    return [[(float(values[i][t]) - mean) / math.sqrt(var + 1e-8) if mask[i][t] else 0.0
             for t in range(len(mask[i]))] for i in range(len(mask))]


def ref_token_rewards(batch, kl_coef, rewards=None, credits=False):
    """Credits or the reward on the last valid token, minus β·(old − ref) on every valid token."""
    rewards = batch["rewards"] if rewards is None else rewards
    out = []
    for i, row in enumerate(batch["mask"]):
        valid = _valid(row)
        r = [float(batch["token_rewards"][i][t]) if credits and row[t] else 0.0 for t in range(len(row))]
        if not credits and valid:
            r[valid[-1]] += float(rewards[i])
        for t in valid:
            r[t] -= kl_coef * (float(batch["old"][i][t]) - float(batch["ref"][i][t]))
        out.append(r)
    return out


def ref_groups(group_ids):
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _close(actual: torch.Tensor, expected, tol=1e-10):
    expected = torch.tensor(expected, dtype=D)
    assert actual.shape == expected.shape
    assert torch.allclose(actual.double(), expected, rtol=tol, atol=tol), (actual, expected)


def _inputs(batch, **extra) -> A.AdvantageInputs:
    return A.AdvantageInputs(batch["rewards"], batch["group_ids"], mask=batch["mask"], values=batch["values"],
                             old_logprobs=batch["old"], ref_logprobs=batch["ref"], **extra)


# ---- registry and config ------------------------------------------------------------------------


def test_registry_and_config_name_the_same_estimators():
    assert tuple(A.ESTIMATORS) == ADVANTAGE_ESTIMATORS
    field = typing.get_type_hints(RolloutConfig)["advantage_estimator"]
    assert typing.get_args(field) == ADVANTAGE_ESTIMATORS
    assert KL_IN_REWARD_ESTIMATORS == tuple(n for n, e in A.ESTIMATORS.items() if e.kl_in_reward)
    assert RolloutConfig().advantage_estimator == "grpo"  # the default keeps GRPO


@pytest.mark.parametrize("fields,message", [
    ({"advantage_estimator": "nope"}, "advantage_estimator"),
    ({"gamma": 1.5}, "gamma"),
    ({"lam": -0.1}, "lam"),
    ({"kl_in_reward_coef": -1.0}, "kl_in_reward_coef"),
    ({"kl_in_reward_coef": 0.1, "advantage_estimator": "opo"}, "kl_in_reward_coef"),
    ({"pass_k": 1}, "pass_k"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=rf"^{message}\b"):  # bare: the converter adds rollout.
        RolloutConfig(**fields)


@pytest.mark.parametrize("fields,job,message", [
    ({"advantage_estimator": "gae"}, {}, "model.value_head"),
    ({"advantage_estimator": "remax"}, {"algorithm": "offline-rl"}, "algorithm: grpo"),
    ({"advantage_estimator": "remax", "engine": "vllm"}, {}, "rollout.engine"),
    ({"advantage_estimator": "reinforce++", "kl_in_reward_coef": 0.1}, {"reference": "none"}, "reference.source"),
    ({"advantage_estimator": "passk", "pass_k": 5}, {}, "rollout.pass_k=5"),
])
def test_job_checks_name_the_fields(fields, job, message):
    settings = {"algorithm": "grpo", "value_head": False, "reference": "initial", **job}
    with pytest.raises(ValueError, match=re_escape(message)):
        RolloutConfig(**fields).check_job(**settings)
    RolloutConfig().check_job(**settings)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_kl_in_reward_only_with_per_token_estimators():
    batch = _random_batch(0)
    with pytest.raises(ValueError, match="kl_in_reward_coef"):
        A.estimate("grpo", _inputs(batch), Settings(kl_in_reward_coef=0.1))
    with pytest.raises(ValueError, match="value_head"):
        A.estimate("gae", A.AdvantageInputs(batch["rewards"], batch["group_ids"], mask=batch["mask"]), Settings())
    with pytest.raises(ValueError, match="greedy"):
        A.estimate("remax", _inputs(batch), Settings())


# ---- GRPO / RLOO (moved here from the losses and credit modules) ----------------------------------


@pytest.mark.parametrize("normalize_std,loo", [(True, False), (False, False), (True, True), (False, True)])
def test_group_advantages_against_loops(normalize_std, loo):
    batch = _random_batch(1, rows=15)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4])[torch.randperm(15, generator=torch.Generator().manual_seed(0))]
    adv, metrics = A.group_advantages(batch["rewards"], group_ids=ids, normalize_std=normalize_std, leave_one_out=loo)
    expected = [0.0] * 15
    for members in ref_groups(ids):
        r = [float(batch["rewards"][i]) for i in members]
        n = len(r)
        if n < 2:
            continue
        mean = sum(r) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1))
        for i, x in zip(members, r):
            base = (sum(r) - x) / (n - 1) if loo else mean
            expected[i] = (x - base) / (std + 1e-6) if normalize_std else x - base
    _close(adv, expected)
    assert metrics["groups"].value.item() == 5 and metrics["zero_variance_groups"].value.item() == 1


def test_group_advantages_hand_case_and_errors():
    # Group (1, 2, 3): mean 2, unbiased std 1 -> (−1, 0, 1)/(1 + 1e-6); RLOO without std:
    # 1 − (2+3)/2 = −1.5, 2 − 2 = 0, 3 − 1.5 = 1.5. Group (5, 5): all equal -> 0.
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0], dtype=D)
    ids = torch.tensor([0, 0, 0, 1, 1])
    adv, _ = A.group_advantages(rewards, group_ids=ids)
    _close(adv, [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0])
    _close(A.estimate("rloo", A.AdvantageInputs(rewards, ids), Settings()).advantages, [-1.5, 0.0, 1.5, 0.0, 0.0])
    for loo in (False, True):  # single-member groups
        adv, metrics = A.group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1, leave_one_out=loo)
        assert adv.tolist() == [0.0, 0.0, 0.0] and metrics["zero_variance_groups"].value.item() == 3
    with pytest.raises(ValueError, match="group_size"):
        A.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="exactly one"):
        A.group_advantages(torch.zeros(4), 2, group_ids=torch.zeros(4))


# GRPO group advantages (moved from the losses tests) -----------------------------------------------------------------

def ref_group_adv(rewards, K, normalize_std, loo, eps):
    out = []
    for start in range(0, len(rewards), K):
        grp = [float(v) for v in rewards[start : start + K]]
        mean = sum(grp) / K
        std = math.sqrt(sum((v - mean) ** 2 for v in grp) / (K - 1)) if K > 1 else 0.0
        for j, v in enumerate(grp):
            if max(grp) == min(grp):
                out.append(0.0)
                continue
            base = (sum(grp) - v) / (K - 1) if loo else mean
            a = v - base
            out.append(a / (std + eps) if normalize_std else a)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("loo", [False, True])
def test_group_advantages(normalize_std, loo):
    g = torch.Generator().manual_seed(9)
    K = 4
    rewards = torch.randn(5 * K, generator=g, dtype=D)
    rewards[K : 2 * K] = 0.7  # zero-variance group
    rewards[3 * K : 4 * K] = 1.0 / 3.0  # another, with a value whose mean is inexact
    adv, metrics = A.group_advantages(rewards, K, normalize_std=normalize_std, leave_one_out=loo, eps=1e-6)
    torch.testing.assert_close(adv, ref_group_adv(rewards, K, normalize_std, loo, 1e-6), rtol=1e-12, atol=1e-14)
    assert torch.all(adv[K : 2 * K] == 0) and torch.all(adv[3 * K : 4 * K] == 0)
    assert metrics["groups"].value.item() == 5 and metrics["zero_variance_groups"].value.item() == 2
    if loo and not normalize_std:
        grp = rewards[:K]
        torch.testing.assert_close(adv[:K], K / (K - 1) * (grp - grp.mean()))


@pytest.mark.parametrize("loo", [False, True])
def test_group_advantages_by_ids_in_any_order(loo):
    g = torch.Generator().manual_seed(10)
    sizes = [3, 5, 1, 4, 2]
    rewards = torch.randn(sum(sizes), generator=g, dtype=D)
    rewards[9:13] = -0.4  # group 3 has zero variance
    ids = torch.cat([torch.full((n,), 100 + 7 * k) for k, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=g)
    adv, metrics = A.group_advantages(rewards[perm], group_ids=ids[perm], leave_one_out=loo)
    want = []
    start = 0
    for n in sizes:
        group = rewards[start : start + n]
        want.append(ref_group_adv(group, n, True, loo, 1e-6) if n > 1 else torch.zeros(1, dtype=D))
        start += n
    torch.testing.assert_close(adv, torch.cat(want)[perm], rtol=1e-12, atol=1e-14)
    assert metrics["groups"].value.item() == 5 and metrics["zero_variance_groups"].value.item() == 2


def test_group_advantages_single_member_groups_and_errors():
    for loo in (False, True):
        adv, metrics = A.group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1, leave_one_out=loo)
        assert torch.all(adv == 0) and metrics["zero_variance_groups"].value.item() == 3
    with pytest.raises(ValueError, match="group_size"):
        A.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="exactly one"):
        A.group_advantages(torch.zeros(4), 2, group_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="group_ids"):
        A.group_advantages(torch.zeros(4), group_ids=torch.zeros(3))


def test_grpo_estimator_is_group_advantages_with_the_config_flags():
    batch = _random_batch(2)
    settings = Settings(normalize_std=False, leave_one_out=True)
    by_size = A.estimate("grpo", A.AdvantageInputs(batch["rewards"], batch["group_ids"], group_size=4), settings)
    expected, _ = A.group_advantages(batch["rewards"], 4, normalize_std=False, leave_one_out=True)
    assert torch.equal(by_size.advantages, expected) and by_size.returns is None
    by_ids = A.estimate("grpo", A.AdvantageInputs(batch["rewards"], batch["group_ids"]), settings)
    assert torch.allclose(by_ids.advantages, expected, rtol=0, atol=1e-15)


# ---- per-token rewards, returns, GAE, whitening -------------------------------------------------------


def test_outcome_rewards_and_kl_penalty_against_loops():
    batch = _random_batch(3)
    batch["mask"][5] = False  # a row without valid tokens gets nothing
    tokens = A.outcome_token_rewards(batch["rewards"], batch["mask"])
    penalised = A.kl_penalized_rewards(tokens, batch["old"], batch["ref"], batch["mask"], 0.3)
    _close(tokens, ref_token_rewards(batch, 0.0))
    _close(penalised, ref_token_rewards(batch, 0.3))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_returns_to_go_against_loops(gamma):
    batch = _random_batch(4)
    out = A.returns_to_go(batch["token_rewards"], batch["mask"], gamma)
    _close(out, [ref_returns(r, m, gamma) for r, m in zip(batch["token_rewards"], batch["mask"])])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_against_loops(gamma, lam):
    batch = _random_batch(5)
    adv, ret = A.gae(batch["token_rewards"], batch["values"], batch["mask"], gamma=gamma, lam=lam)
    expected = [ref_gae(r, v, m, gamma, lam) for r, v, m in zip(batch["token_rewards"], batch["values"], batch["mask"])]
    _close(adv, [e[0] for e in expected])
    _close(ret, [e[1] for e in expected])


def test_gae_with_gamma_lambda_one_is_return_to_go_minus_value():
    batch = _random_batch(6)
    adv, ret = A.gae(batch["token_rewards"], batch["values"], batch["mask"], gamma=1.0, lam=1.0)
    rtg = A.returns_to_go(batch["token_rewards"], batch["mask"], 1.0)
    mask = batch["mask"]
    assert torch.allclose(adv[mask], (rtg - batch["values"])[mask], atol=1e-12)
    assert torch.allclose(ret[mask], rtg[mask], atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_hand_case():
    # One row, tokens at 1, 2, 4 (0 and 3 masked), r = (0, 0, 1) on them, V = (0.5, 0.25, 0.5),
    # γ = 0.5, λ = 0.5:
    #   t=4: δ = 1 + 0 − 0.5 = 0.5,             A = 0.5,                   R = 1.0
    #   t=2: δ = 0 + 0.5·0.5 − 0.25 = 0,        A = 0 + 0.25·0.5 = 0.125,  R = 0.375
    #   t=1: δ = 0 + 0.5·0.25 − 0.5 = −0.375,   A = −0.375 + 0.25·0.125 = −0.34375, R = 0.15625
    mask = torch.tensor([[False, True, True, False, True]])
    rewards = torch.tensor([[9.0, 0.0, 0.0, 9.0, 1.0]], dtype=D)  # masked values are ignored
    values = torch.tensor([[9.0, 0.5, 0.25, 9.0, 0.5]], dtype=D)
    adv, ret = A.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    _close(adv, [[0.0, -0.34375, 0.125, 0.0, 0.5]])
    _close(ret, [[0.0, 0.15625, 0.375, 0.0, 1.0]])


def test_whiten_against_loops_and_edge_cases():
    batch = _random_batch(7)
    _close(A.whiten(batch["token_rewards"], batch["mask"]), ref_whiten(batch["token_rewards"], batch["mask"]), 1e-9)
    # Hand case: valid values (1, 3): mean 2, population variance 1 -> (−1, 1)/sqrt(1 + 1e-8).
    out = A.whiten(torch.tensor([[1.0, 7.0, 3.0]], dtype=D), torch.tensor([[True, False, True]]))
    _close(out, [[-1 / math.sqrt(1 + 1e-8), 0.0, 1 / math.sqrt(1 + 1e-8)]])
    equal = A.whiten(torch.full((2, 3), 4.0), torch.ones(2, 3, dtype=torch.bool))
    assert (equal == 0).all()  # all-equal values: 0, not NaN
    assert (A.whiten(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0).all()


# ---- REINFORCE++ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,kl,credits", [(1.0, 0.0, False), (0.9, 0.05, False), (0.95, 0.1, True)])
def test_reinforce_pp_against_loops(gamma, kl, credits):
    batch = _random_batch(8)
    inputs = _inputs(batch, token_rewards=batch["token_rewards"] if credits else None)
    result = A.estimate("reinforce++", inputs, Settings(gamma=gamma, kl_in_reward_coef=kl))
    returns = [ref_returns(r, m, gamma) for r, m in zip(ref_token_rewards(batch, kl, credits=credits), batch["mask"])]
    _close(result.returns, returns)
    _close(result.advantages, ref_whiten(returns, batch["mask"]), 1e-9)
    plain = A.estimate("reinforce++", inputs, Settings(gamma=gamma, kl_in_reward_coef=kl, whiten_advantages=False))
    _close(plain.advantages, returns)


@pytest.mark.parametrize("gamma,kl,credits", [(1.0, 0.0, False), (0.9, 0.05, False), (1.0, 0.1, True)])
def test_reinforce_pp_baseline_against_loops(gamma, kl, credits):
    batch = _random_batch(9)
    inputs = _inputs(batch, token_rewards=batch["token_rewards"] if credits else None)
    result = A.estimate("reinforce++-baseline", inputs, Settings(gamma=gamma, kl_in_reward_coef=kl))
    totals = [sum(r) for r in ref_token_rewards(batch, 0.0, credits=credits)]
    centred = [0.0] * len(totals)
    for members in ref_groups(batch["group_ids"]):
        mean = sum(totals[i] for i in members) / len(members)
        for i in members:
            centred[i] = totals[i] - mean
    rewards = ref_token_rewards(batch, kl, credits=credits)
    for i, row in enumerate(batch["mask"]):  # the baseline on the last token: total − group mean
        rewards[i][_valid(row)[-1]] -= totals[i] - centred[i]
    returns = [ref_returns(r, m, gamma) for r, m in zip(rewards, batch["mask"])]
    _close(result.advantages, ref_whiten(returns, batch["mask"]), 1e-9)


def test_reinforce_pp_hand_case():
    # Two responses of one prompt, outcome rewards 1 and 0, lengths 2 and 1, γ = 1, no KL:
    # REINFORCE++: returns (1, 1 | 0): mean 2/3, population variance 2/9 -> whitened
    #   (1/3, 1/3 | −2/3)/sqrt(2/9).
    # With baseline: group mean 0.5 -> returns (0.5, 0.5 | −0.5), mean 1/6, variance 2/9 ->
    #   (1/3, 1/3 | −2/3)/sqrt(2/9): the same here, since the shift is one constant per group.
    mask = torch.tensor([[True, True], [True, False]])
    inputs = A.AdvantageInputs(torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0, 0]), mask=mask)
    scale = math.sqrt(2 / 9 + 1e-8)
    for name in ("reinforce++", "reinforce++-baseline"):
        _close(A.estimate(name, inputs, Settings()).advantages, [[1 / 3 / scale, 1 / 3 / scale], [-2 / 3 / scale, 0.0]])


# ---- ReMax, OPO, pass@k ---------------------------------------------------------------------------------


def test_remax_hand_case():
    # Two prompts; greedy completions scored 0.5 and 0: A = r − greedy reward of the row's prompt.
    inputs = A.AdvantageInputs(torch.tensor([1.0, 0.25, 0.5, 0.0]), torch.tensor([0, 0, 1, 1]),
                               greedy_rewards=torch.tensor([0.5, 0.5, 0.0, 0.0]))
    _close(A.estimate("remax", inputs, Settings()).advantages, [0.5, -0.25, 0.5, 0.0])


def test_opo_against_loops_and_hand_case():
    batch = _random_batch(10, rows=13)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3])
    inputs = A.AdvantageInputs(batch["rewards"], ids, mask=batch["mask"])
    out = A.estimate("opo", inputs, Settings()).advantages
    lengths = [len(_valid(m)) for m in batch["mask"]]
    expected = [0.0] * 13
    for members in ref_groups(ids):
        if len(members) < 2:
            continue
        b = sum(lengths[i] * float(batch["rewards"][i]) for i in members) / sum(lengths[i] for i in members)
        for i in members:
            expected[i] = float(batch["rewards"][i]) - b
    _close(out, expected)
    # Hand case: rewards (1, 0) with lengths (1, 3): b = (1·1 + 3·0)/4 = 0.25 -> (0.75, −0.25);
    # all-equal rewards (2, 2) -> 0; a single member -> 0.
    hand = A.opo_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0, 7.0], dtype=D), torch.tensor([1, 3, 2, 5, 4]),
                            torch.tensor([0, 0, 1, 1, 2]))
    _close(hand, [0.75, -0.25, 0.0, 0.0, 0.0])


def ref_passk(rewards: list[float], k: int) -> list[float]:
    """mean over k-subsets K ∋ i of max(K) − max(K ∖ i), by enumeration."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    k = min(k, n)
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        gains = [max(rewards[j] for j in (i, *rest)) - max(rewards[j] for j in rest)
                 for rest in itertools.combinations(others, k - 1)]
        out.append(sum(gains) / len(gains))
    return out


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_passk_against_subset_enumeration(k):
    gen = torch.Generator().manual_seed(11 + k)
    rewards = torch.rand(17, generator=gen, dtype=D)
    rewards[3] = rewards[1]  # a tie
    ids = torch.tensor([0] * 6 + [1] * 5 + [2] + [3] * 3 + [4] * 2)[torch.randperm(17, generator=gen)]
    out = A.estimate("passk", A.AdvantageInputs(rewards, ids), Settings(pass_k=k)).advantages
    expected = [0.0] * 17
    for members in ref_groups(ids):
        for i, value in zip(members, ref_passk([float(rewards[i]) for i in members], k)):
            expected[i] = value
    _close(out, expected)


def test_passk_hand_cases():
    # Rewards (0.2, 1.0, 0.6), k = 2: A_i = mean over the other j of max(0, r_i − r_j):
    #   0.2 -> 0;  1.0 -> (0.8 + 0.4)/2 = 0.6;  0.6 -> (0.4 + 0)/2 = 0.2.
    rewards = torch.tensor([0.2, 1.0, 0.6], dtype=D)
    _close(A.passk_advantages(rewards, torch.zeros(3, dtype=torch.long), 2), [0.0, 0.6, 0.2])
    # k = n = 3: only the best gets r_max − r_second = 0.4.
    _close(A.passk_advantages(rewards, torch.zeros(3, dtype=torch.long), 3), [0.0, 0.4, 0.0])
    # Binary rewards (1, 0, 0, 1, 0), k = 3: a correct response gets C(3, 2)/C(4, 2) = 1/2, wrong ones 0;
    # all-equal rewards -> 0.
    binary = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=D)
    _close(A.passk_advantages(binary, torch.tensor([0, 0, 0, 0, 0, 1, 1]), 3), [0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="k >= 2"):
        A.passk_advantages(binary, torch.zeros(7, dtype=torch.long), 1)


# ---- optimal token baseline -------------------------------------------------------------------------


def ref_otb(returns, weights, mask, group_ids):
    """B_t = Σ W_t G_t / Σ W_t over the group members that have a t-th valid token."""
    n = len(mask)
    energy = []
    for i in range(n):
        total, row = 0.0, []
        for t in range(len(mask[i])):
            total += float(weights[i][t]) if mask[i][t] else 0.0
            row.append(total)
        energy.append(row)
    out = [[0.0] * len(mask[i]) for i in range(n)]
    for members in ref_groups(group_ids):
        positions = {i: _valid(mask[i]) for i in members}
        for p in range(max(len(v) for v in positions.values())):
            at = [(i, positions[i][p]) for i in members if p < len(positions[i])]
            if len(at) < 2:
                continue
            den = sum(energy[i][t] for i, t in at)
            if den > 0:
                b = sum(energy[i][t] * float(returns[i][t]) for i, t in at) / den
            else:
                b = sum(float(returns[i][t]) for i, t in at) / len(at)
            for i, t in at:
                out[i][t] = float(returns[i][t]) - b
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_optimal_token_baseline_against_loops(exact):
    batch = _random_batch(12)
    gen = torch.Generator().manual_seed(3)
    sum_sq = torch.rand(batch["mask"].shape, generator=gen, dtype=D) * 0.5 if exact else None
    inputs = _inputs(batch, sum_pi_squared=sum_sq)
    result = A.estimate("optimal-token-baseline", inputs, Settings(gamma=0.9, kl_in_reward_coef=0.05))
    returns = [ref_returns(r, m, 0.9) for r, m in zip(ref_token_rewards(batch, 0.05), batch["mask"])]
    pi = batch["old"].exp()
    weights = 1 - 2 * pi + sum_sq if exact else (1 - pi) ** 2
    _close(result.returns, returns)
    _close(result.advantages, ref_otb(returns, weights.tolist(), batch["mask"].tolist(), batch["group_ids"]))


def test_optimal_token_baseline_hand_case():
    # One group of two responses; weights w = (1, 1) and (3,) -> energies W = (1, 2) and (3,);
    # returns G = (1, 1) and (0,). Position 0: B = (1·1 + 3·0)/(1 + 3) = 0.25 -> A = 0.75, −0.25;
    # position 1: only the first response -> 0.
    mask = torch.tensor([[True, True], [True, False]])
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=D)
    weights = torch.tensor([[1.0, 1.0], [3.0, 0.0]], dtype=D)
    out = A.optimal_token_baseline(returns, weights, mask, torch.tensor([0, 0]))
    _close(out, [[0.75, 0.0], [-0.25, 0.0]])


def test_score_norm_proxy_bounds_the_exact_one():
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(64, 11, generator=gen, dtype=D) * 2, -1)  # [rows, V]
    y = torch.randint(0, 11, (64,), generator=gen)
    pi = probs[torch.arange(64), y]
    exact = ((torch.nn.functional.one_hot(y, 11) - probs) ** 2).sum(-1)  # ||e_y − π||²
    assert torch.allclose(A.score_norm_proxy(pi.log(), probs.square().sum(-1)), exact, atol=1e-12)
    lower = A.score_norm_proxy(pi.log())
    assert (lower <= exact + 1e-12).all() and (exact <= 2 * lower + 1e-12).all()


# ---- the call-site glue: micro-batches, DP gathering ----------------------------------------------------


def _micro_batches(batch, split: list[int]) -> list[dict]:
    """The rows of ``batch`` as micro-batches of the given sizes, in the layout of a training batch."""
    out, start = [], 0
    for size in split:
        rows = slice(start, start + size)
        labels = torch.where(batch["mask"][rows], torch.tensor(5), torch.tensor(-100))
        out.append({"rewards": batch["rewards"][rows].float(), "group_ids": batch["group_ids"][rows], "labels": labels,
                    "old_values": batch["values"][rows].float(), "old_logprobs": batch["old"][rows].float(),
                    "ref_logprobs": batch["ref"][rows].float()})
        start += size
    return out


NAMES = ["grpo", "rloo", "gae", "reinforce++", "reinforce++-baseline", "opo", "passk", "optimal-token-baseline"]
SETTINGS = Settings(gamma=0.95, lam=0.9, kl_in_reward_coef=0.0, pass_k=3)


def _assign(name: str, batches: list[dict], group=None, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    from mrl.rl.advantage_batches import assign_advantages

    kl = 0.05 if A.ESTIMATORS[name].kl_in_reward else 0.0
    settings = Settings(**{**SETTINGS.__dict__, "advantage_estimator": name, "kl_in_reward_coef": kl})
    assign_advantages(batches, settings, group=group, rank=rank)
    advantages = torch.cat([b["advantages"] for b in batches])
    returns = torch.cat([b["returns"] for b in batches]) if "returns" in batches[0] else None
    return advantages, returns


@pytest.mark.parametrize("name", NAMES)
def test_micro_batch_split_does_not_change_the_advantages(name):
    batch = _random_batch(13, rows=16)
    whole = _assign(name, _micro_batches(batch, [16]))
    split = _assign(name, _micro_batches(batch, [4, 4, 4, 4]))
    assert torch.equal(whole[0], split[0])
    assert (whole[1] is None) == (split[1] is None) and (whole[1] is None or torch.equal(whole[1], split[1]))


def case_dp_gathering(names: list[str]) -> dict:
    """Each of 2 ranks holds half of the rows (groups split across ranks); rank 0 also the whole."""
    import torch.distributed as dist

    rank = dist.get_rank()
    batch = _random_batch(13, rows=16)
    mine = {k: (v[rank * 8:(rank + 1) * 8] if v.shape[0] == 16 else v) for k, v in batch.items()}
    mine["group_ids"] = (torch.arange(16) // 3)[rank * 8:(rank + 1) * 8]  # group 2 spans both ranks
    batch["group_ids"] = torch.arange(16) // 3
    if rank == 1:  # rank 1's micro-batches are shorter: per-token tensors get padded
        keep = int(mine["mask"].nonzero()[:, 1].max()) + 1
        mine = {k: (v[:, :keep] if v.dim() == 2 else v) for k, v in mine.items()}
    out = {}
    for name in names:
        local = _assign(name, _micro_batches(mine, [4, 4]), group=dist.group.WORLD, rank=rank)
        whole = _assign(name, _micro_batches(batch, [16]))
        rows = slice(rank * 8, (rank + 1) * 8)
        width = local[0].shape[1] if local[0].dim() == 2 else None
        expected = whole[0][rows] if width is None else whole[0][rows, :width]
        diff = (local[0] - expected).abs().max().item()
        out[name] = diff
    return out


def test_dp_gathering_gives_the_single_rank_result(ranks2):
    for result in ranks2.run(case_dp_gathering, NAMES):
        assert all(diff == 0.0 for diff in result.values()), result


def test_whiten_over_a_dp_group(ranks2):
    results = ranks2.run(case_whiten_dp)
    assert all(diff < 1e-12 for diff in results), results


def case_whiten_dp() -> float:
    import torch.distributed as dist

    batch = _random_batch(14, rows=10)
    rank = dist.get_rank()
    rows = slice(rank * 5, (rank + 1) * 5)
    local = A.whiten(batch["token_rewards"][rows], batch["mask"][rows], group=dist.group.WORLD)
    return (local - A.whiten(batch["token_rewards"], batch["mask"])[rows]).abs().max().item()


# ---- greedy rollouts (ReMax) -------------------------------------------------------------------------


def case_greedy_generation() -> tuple:
    from mrl.ops.sampling import SamplingParams
    from mrl.parallel.layout import ParallelConfig
    from tests.test_decoding import _prompts, _sampler, _setup

    layout, model, chunks = _setup(ParallelConfig(tp=2), {})
    prompts = _prompts([5, 7, 3], model.vocab_size, seed=8)
    sampling = SamplingParams(temperature=0.8, top_k=50)
    greedy = _sampler(layout, chunks, model, params=sampling).generate(prompts, seed=3, greedy=True)
    reference = _sampler(layout, chunks, model, params=SamplingParams(temperature=0.8, top_k=50, greedy=True))
    return greedy.completions, reference.generate(prompts, seed=11).completions


def test_greedy_generation_is_the_greedy_sampler(ranks2):
    for greedy, reference in ranks2.run(case_greedy_generation):
        assert greedy == reference


# ---- online GRPO end to end (4 ranks: PP=2 × DP=2) --------------------------------------------------

ONLINE = ["rollout.sft_warmup_steps=0", "train.steps=1", "train.global_batch_size=16", "train.micro_batch_size=4",
          "rollout.group_size=4", "rollout.max_new_tokens=4", "parallel.tp=1", "parallel.pp=2", "log.progress=false"]


def case_online_estimator(overrides: list[str], output_dir: str) -> dict:
    """One rollout of the tiny GRPO recipe with ``overrides``: this rank's advantages, then one step."""
    from tests.test_trainer import _trainer

    trainer = _trainer("configs/grpo-tiny-cpu.yaml", [*ONLINE, *overrides], output_dir)
    updates = trainer._rollout()
    batches = updates[0][0]
    out = {"last": trainer.layout.is_last_stage, "dp_rank": trainer.layout.dp_rank}
    if trainer.layout.is_last_stage:
        mask = torch.cat([b["labels"] != -100 for b in batches])
        adv = torch.cat([b["advantages"] for b in batches])
        adv = adv if adv.dim() == 2 else adv[:, None].expand_as(mask)
        out.update(shape=tuple(adv.shape), sum=adv[mask].double().sum().item(),
                   square=adv[mask].double().square().sum().item(), tokens=int(mask.sum()),
                   outside=adv[~mask].abs().max().item(), returns="returns" in batches[0])
    trainer.queue = updates
    out["losses"] = [r.loss for r in trainer.train()]
    return out


@pytest.mark.parametrize("overrides", [
    ["rollout.advantage_estimator=reinforce++", "loss.kl_coef=0.0", "rollout.kl_in_reward_coef=0.05"],
    ["rollout.advantage_estimator=gae", "rollout.gamma=0.9", "rollout.lam=0.8", "loss.kind=ppo", "model.value_head=true",
     "loss.value_coef=0.5"],
    ["rollout.advantage_estimator=remax", "rollout.reward=mrl.data.tasks:reverse_word_reward"],
], ids=["reinforce++-kl-in-reward", "gae-ppo", "remax"])
def test_online_grpo_with_an_estimator(ranks4, tmp_path, overrides):
    results = ranks4.run(case_online_estimator, overrides, str(tmp_path))
    last = [r for r in results if r["last"]]
    assert len(last) == 2 and {r["dp_rank"] for r in last} == {0, 1}
    assert all(math.isfinite(loss) for r in results for loss in r["losses"])
    if "remax" in overrides[0]:
        assert all(len(r["shape"]) == 2 for r in last)  # [rows] broadcast over tokens
        return
    assert all(r["shape"][1] == 32 and r["outside"] == 0.0 for r in last)  # per token, 0 off the response
    tokens = sum(r["tokens"] for r in last)
    mean = sum(r["sum"] for r in last) / tokens
    variance = sum(r["square"] for r in last) / tokens - mean**2
    assert abs(mean) < 1e-5 and abs(variance - 1.0) < 1e-4  # whitened over BOTH DP ranks' tokens
    assert all(r["returns"] for r in last)  # value targets (gae) or the discounted returns
