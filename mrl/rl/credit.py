"""Token-level credit: per-character rewards mapped onto tokens, group-relative per position.

A reward function may return per-character credits (one per character of the completion, plus
one for its end) instead of one outcome number. Each completion token then gets the mean credit
of the characters it decodes to; the end credit goes to the eos token (or, for a completion cut
at max_new_tokens, is averaged into its last token).

Token-level GRPO advantages compare the responses of one prompt position by position: with
``r[i, t]`` the credit of token t of response i and ``G_t`` the responses that have a token t,
``A[i, t] = (r[i, t] − mean_{G_t} r[·, t]) / (std_{G_t} r[·, t] + ε)`` (without the division
when ``normalize_std`` is off). Positions that only one response reaches, or where all responses
agree, get 0 — the per-position analogue of GRPO's zero-variance groups. That estimator lives with
the others in ``mrl.rl.advantages`` (``token_group_advantages``); the token-level estimators there
(REINFORCE++, GAE, ...) take the credits as per-token rewards.
"""

from __future__ import annotations


def token_credits(decode, tokens: list[int], char_credits: list[float], eos_id: int) -> list[float]:
    """Credit per completion token from per-character credits (module docstring)."""
    body = tokens[:-1] if tokens and tokens[-1] == eos_id else tokens
    credits, decoded = [], ""
    for t in range(len(body)):
        text = decode(body[: t + 1])
        if text.endswith("\ufffd") and t + 1 < len(body):
            text = text[:-1]  # an incomplete multi-byte character: it belongs to a later token
        chars = char_credits[len(decoded): len(text)]
        credits.append(sum(chars) / len(chars) if chars else 0.0)
        decoded = text if len(text) >= len(decoded) else decoded
    end = char_credits[-1]
    if len(body) < len(tokens):
        credits.append(end)  # the eos token
    elif credits:
        credits[-1] = (credits[-1] + end) / 2
    return credits
