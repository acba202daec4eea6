"""Token sequences with their loss boundary, truncation, and next-token labels.

A sequence is ``[bos] + prompt + response`` (the response normally ends with eos). The model
predicts token t+1 at position t, so for a sequence x of length n:

    labels[t]    = x[t+1]  if x[t+1] is a response token, else IGNORE_INDEX   (t < n-1)
    labels[n-1]  = IGNORE_INDEX
    loss_mask[t] = 1 where labels[t] != IGNORE_INDEX, else 0

Prompt and response are tokenized separately and concatenated, so the loss boundary is exact
for every tokenizer (text at the boundary should carry its own whitespace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mrl.data.records import RecordError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSequence:
    """One tokenized sequence; tokens[target_start:] are the prediction targets."""

    tokens: np.ndarray
    """[n] int64 token ids."""
    target_start: int
    """Index of the first target token (the first response token); >= 1."""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - self.target_start

    def labels(self) -> np.ndarray:
        """[n] int64 next-token labels, IGNORE_INDEX where no loss."""
        out = np.full(len(self.tokens), IGNORE_INDEX, dtype=np.int64)
        out[self.target_start - 1 : -1] = self.tokens[self.target_start :]
        return out

    def loss_mask(self) -> np.ndarray:
        """[n] float32, 1 where labels has a target."""
        out = np.zeros(len(self.tokens), dtype=np.float32)
        out[self.target_start - 1 : -1] = 1.0
        return out


def build_sequences(
    prefix: list[int],
    prompt: list[int],
    responses: list[list[int]],
    *,
    seq_length: int,
    truncation: str,
) -> list[TokenSequence]:
    """``prefix + prompt + response`` for each response, fitted into ``seq_length``.

    ``prefix`` is [bos] or [] and is never cut; the prompt is shared by all responses (a
    preference pair, a rollout group). Truncation policies:
      error                 a sequence longer than seq_length raises RecordError;
      truncate_left_prompt  drop the prompt's first tokens until the longest sequence fits;
      truncate_right        cut each sequence at seq_length (losing the response tail and eos).
    Every sequence keeps at least one target token, else RecordError.
    """
    longest = len(prefix) + len(prompt) + max(len(r) for r in responses)
    if any(not r for r in responses):
        raise RecordError("a response has no tokens")
    if longest > seq_length:
        if truncation == "error":
            raise RecordError(
                f"sequence of {longest} tokens exceeds data.seq_length={seq_length} "
                "(data.truncation=error)"
            )
        if truncation == "truncate_left_prompt":
            cut = longest - seq_length
            if cut > len(prompt):
                raise RecordError(
                    f"response of {longest - len(prefix) - len(prompt)} tokens does not fit "
                    f"data.seq_length={seq_length} even with the whole prompt cut"
                )
            prompt = prompt[cut:]
        elif len(prefix) + len(prompt) >= seq_length:
            raise RecordError(
                f"the prompt alone ({len(prefix) + len(prompt)} tokens) fills data.seq_length="
                f"{seq_length}; no response token is left after truncate_right"
            )
    start = len(prefix) + len(prompt)
    start = max(start, 1)  # the first token of a sequence is never a target
    out = []
    for response in responses:
        tokens = np.asarray((prefix + prompt + response)[:seq_length], dtype=np.int64)
        if len(tokens) <= start:
            raise RecordError("no target token is left in the sequence")
        out.append(TokenSequence(tokens, start))
    return out


def fit_prompt(prefix: list[int], prompt: list[int], *, seq_length: int, truncation: str) -> np.ndarray:
    """``prefix + prompt`` for generation, leaving room for at least one generated token."""
    room = seq_length - 1
    total = len(prefix) + len(prompt)
    if total > room:
        if truncation == "error":
            raise RecordError(
                f"prompt of {total} tokens leaves no room to generate within data.seq_length="
                f"{seq_length} (data.truncation=error)"
            )
        keep = room - len(prefix)
        if keep < 1:
            raise RecordError(f"data.seq_length={seq_length} leaves no room for any prompt token")
        prompt = prompt[-keep:] if truncation == "truncate_left_prompt" else prompt[:keep]
    return np.asarray(prefix + prompt, dtype=np.int64)


def align_to_labels(values: list[float], sequence: TokenSequence) -> np.ndarray:
    """Per-target values (one per response token) laid out like labels: [n] float32, 0 elsewhere."""
    out = np.zeros(len(sequence), dtype=np.float32)
    out[sequence.target_start - 1 : -1] = values[: sequence.num_targets]
    return out


def prefix_for(bos_id: Optional[int]) -> list[int]:
    return [] if bos_id is None else [bos_id]
