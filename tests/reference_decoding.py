"""A no-cache reference for incremental decoding: the whole sequence again for every new token.

``FullForwardDecoder`` has ``KVCacheDecoder``'s interface (``prefill``, ``step``, ``keep``) but
keeps each row's tokens, right-aligned at position 0 with no padding in front, and runs the
ordinary training forward (Megatron's forward-only schedule, a plain causal mask) over all of
them at every step, reading each row's logits at its last real token. It shares no code with the
KV-cache path, so it checks positions, masks and the cache independently. Used by the tests and
by ``tools/bench_rollout.py`` as the baseline.
"""

from __future__ import annotations

import torch

from mrl.losses.base import split_model_output
from mrl.train.step import run_schedule


class FullForwardDecoder:
    """Recomputes every position of every active row at each step (no KV cache)."""

    def __init__(self, chunks: list, layout, *, max_rows: int, max_length: int, padding_masks: bool = True) -> None:
        self.chunks = chunks
        self.layout = layout
        self.max_length = max_length
        self.device = next(chunks[0].parameters()).device
        self.rows: list[list[int]] = []

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor):
        self.rows = [row[int(p):].tolist() for row, p in zip(tokens, pad)]
        return self._forward()

    def step(self, tokens: torch.Tensor):
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
        return self._forward()

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]

    def _forward(self):
        length = -(-self.max_length // 8) * 8  # a multiple of tp for sequence parallelism
        layout = self.layout
        count = len(self.rows)
        # All rows in one micro-batch; interleaved pipelining needs a multiple of pp micro-batches,
        # so there each row is its own micro-batch, repeated up to such a multiple.
        groups = [list(range(count))]
        if layout.vpp:
            groups = [[min(i, count - 1)] for i in range(-(-count // layout.pp) * layout.pp)]
        batches = []
        for group in groups:
            tokens = torch.zeros((len(group), length), dtype=torch.long)  # [rows, S] right-padded
            for index, row in enumerate(group):
                tokens[index, : len(self.rows[row])] = torch.tensor(self.rows[row])
            batches.append({"tokens": tokens.to(self.device),
                            "last": torch.tensor([len(self.rows[row]) - 1 for row in group]),
                            "position_ids": torch.arange(length).expand(len(group), -1).to(self.device)})
        captured = []

        def last_logits(batch, output):
            logits, _ = split_model_output(output)  # [rows, S, V/tp]
            captured.append(logits[torch.arange(len(batch["last"])), batch["last"]].float())
            return torch.zeros(()), torch.zeros((), dtype=torch.int), {}

        run_schedule(self.chunks, batches, last_logits, forward_only=True, seq_length=length)
        return torch.cat(captured)[:count] if layout.is_last_stage else None
