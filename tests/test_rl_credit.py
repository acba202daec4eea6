"""Per-character credit, its mapping onto tokens, and token-level group advantages (float64 refs)."""

from __future__ import annotations

import pytest
import torch

from mrl.data.tasks import character_credit, load_reward_fn, partial_credit
from mrl.data.tokenizer import ByteTokenizer
from mrl.rl.advantages import token_group_advantages
from mrl.rl.credit import token_credits


@pytest.mark.parametrize("text,target", [("cba", "cba"), ("abc", "cba"), ("cbx", "cba"), ("cb", "cba"), ("cbaa", "cba")])
def test_character_credit_matches_partial_credit(text, target):
    credits = character_credit(text, target)
    assert len(credits) == len(text) + 1
    assert credits[-1] == (1.0 if len(text) == len(target) else 0.0)
    if len(text) == len(target):
        assert sum(credits[:-1]) / len(text) == pytest.approx(partial_credit(text, target))


def test_reward_function_may_return_per_character_credits():
    fn = load_reward_fn("mrl.data.tasks:reverse_word_credit")
    assert fn("reverse abc=", "cbx", "cba") == [1.0, 1.0, 0.0, 1.0]
    bad = load_reward_fn("tests.test_rl_credit:_short_credits")
    with pytest.raises(ValueError, match="expected 4 finite numbers"):
        bad("reverse abc=", "cba", "cba")


def _short_credits(prompt, completion, answer):
    return [1.0]


def test_token_credits_follow_characters_and_the_end():
    tok = ByteTokenizer()
    tokens = tok.encode("cbx")
    assert token_credits(tok.decode, tokens + [tok.eos_id], [1, 1, 0, 1], tok.eos_id) == [1.0, 1.0, 0.0, 1.0]
    # cut off without eos: the end credit is averaged into the last token
    assert token_credits(tok.decode, tokens, [1, 1, 0, 1], tok.eos_id) == [1.0, 1.0, 0.5]
    # a two-byte character: its credit lands on the token that completes it
    two = tok.encode("é")
    assert token_credits(tok.decode, two + [tok.eos_id], [0.5, 0.0], tok.eos_id) == [0.0, 0.5, 0.0]


def test_token_group_advantages_against_the_formula():
    gen = torch.Generator().manual_seed(0)
    credits = torch.rand(12, 5, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 4, 5, 1, 2, 5, 5, 5, 5, 2, 4])
    present = torch.arange(5)[None, :] < lengths[:, None]
    out = token_group_advantages(credits, present, 4)
    for g in range(3):
        rows = range(4 * g, 4 * g + 4)
        for t in range(5):
            members = [i for i in rows if present[i, t]]
            for i in rows:
                if not present[i, t] or len(members) < 2:
                    assert out[i, t] == 0
                    continue
                values = torch.stack([credits[j, t] for j in members])
                expected = (credits[i, t] - values.mean()) / (values.std(unbiased=True) + 1e-6)
                assert out[i, t].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    plain = token_group_advantages(credits, present, 4, normalize_std=False)
    assert plain[0, 0].item() == pytest.approx((credits[0, 0] - credits[0:4, 0].mean()).item())
