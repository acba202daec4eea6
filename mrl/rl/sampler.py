"""Temperature sampling from the Megatron-Core policy across TP and PP, without gathering logits.

A small rollout source for online GRPO at the scale of the CPU recipes; a production cluster
pairs mrl with an inference engine behind the same ``RolloutSource`` interface (``generate``).

Each decoding step runs the policy forward (Megatron's forward-only schedule, so any TP/PP
layout works) over the padded rows and reads, on the last stage, the logits of each row's last
token. The next token is drawn with the Gumbel-max trick on the vocabulary shards:
``argmax_v (z_v/T + g_v)`` with independent Gumbel noise ``g`` is an exact sample of
``softmax(z/T)``; each TP rank takes the maximum over its shard with its own noise stream, and
one tiny all-gather of (max, index) picks the global winner. The tokens then go from the last
pipeline stage to the others with a broadcast. Ids of the padded vocabulary are never drawn.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from mrl.losses.base import split_model_output
from mrl.parallel.layout import ParallelLayout
from mrl.train.step import run_schedule


class RolloutSource(Protocol):
    """Produces completions for prompts (token ids in, token ids out)."""

    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        ...


class PolicySampler:
    """Samples completions from the policy model chunks on this rank's layout."""

    def __init__(self, chunks: list, layout: ParallelLayout, *, seq_length: int, vocab_size: int, eos_id: int,
                 pad_id: int, max_new_tokens: int, temperature: float, micro_batch_size: int) -> None:
        self.chunks = chunks
        self.layout = layout
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Completions (ending with eos unless cut at max_new_tokens) for ``prompts``, identical on
        every rank of this DP replica."""
        rows = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])  # [rows]
        if int(lengths.max()) + self.max_new_tokens > self.seq_length:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + {self.max_new_tokens} new tokens "
                             f"exceeds the sequence length {self.seq_length}")
        tokens = torch.full((rows, self.seq_length), self.pad_id, dtype=torch.long)  # [rows, S]
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        done = torch.zeros(rows, dtype=torch.bool)
        generator = torch.Generator().manual_seed(hash((seed, self.layout.dp_rank, self.layout.tp_rank)) % 2**62)
        was_training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            for _ in range(self.max_new_tokens):
                next_tokens = self._next_tokens(tokens, lengths, generator)  # [rows]
                next_tokens = torch.where(done, torch.full_like(next_tokens, self.pad_id), next_tokens)
                active = ~done
                tokens[active, lengths[active]] = next_tokens[active]
                lengths = lengths + active.long()
                done = done | (next_tokens == self.eos_id)
                if bool(done.all()):
                    break
        finally:
            for chunk, mode in zip(self.chunks, was_training):
                chunk.train(mode)
        return [tokens[row, len(prompts[row]): int(lengths[row])].tolist() for row in range(rows)]

    def _next_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor, generator) -> torch.Tensor:
        rows = tokens.shape[0]
        picked = torch.zeros(rows, dtype=torch.long)
        micro_batches = []
        for start in range(0, rows, self.micro_batch_size):
            chunk = tokens[start: start + self.micro_batch_size]
            micro_batches.append({
                "tokens": chunk,
                "position_ids": torch.arange(self.seq_length).unsqueeze(0).expand_as(chunk),
                "rows": torch.arange(start, start + chunk.shape[0]),
            })

        def sample(batch, output):
            logits, _ = split_model_output(output)  # [b, S, V/tp]
            rows_ = batch["rows"]
            last = logits[torch.arange(len(rows_)), lengths[rows_] - 1].float()  # [b, V/tp]
            picked[rows_] = self._gumbel_argmax(last, generator)
            zero = torch.zeros((), dtype=torch.float32)
            return zero, torch.zeros((), dtype=torch.int), {}

        run_schedule(self.chunks, micro_batches, sample, forward_only=True, seq_length=self.seq_length)
        return self._from_last_stage(picked)

    def _gumbel_argmax(self, logits: torch.Tensor, generator) -> torch.Tensor:
        """Global sample index per row from this rank's vocab shard [b, V/tp] (module docstring)."""
        shard = logits.shape[-1]
        first = self.layout.tp_rank * shard
        ids = torch.arange(first, first + shard)
        uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-20, 1.0)
        scores = logits / self.temperature - torch.log(-torch.log(uniform))  # [b, V/tp]
        scores = scores.masked_fill(ids >= self.vocab_size, float("-inf"))
        best, index = scores.max(dim=-1)  # [b]
        if self.layout.tp == 1:
            return index + first
        packed = torch.stack([best.double(), (index + first).double()], dim=-1)  # [b, 2]
        gathered = [torch.empty_like(packed) for _ in range(self.layout.tp)]
        dist.all_gather(gathered, packed, group=self.layout.tp_group)
        stacked = torch.stack(gathered)  # [tp, b, 2]
        winner = stacked[..., 0].argmax(dim=0)  # [b]
        return stacked[winner, torch.arange(stacked.shape[1]), 1].long()

    def _from_last_stage(self, picked: torch.Tensor) -> torch.Tensor:
        if self.layout.pp == 1:
            return picked
        source = dist.get_global_rank(self.layout.pp_group, self.layout.pp - 1)
        dist.broadcast(picked, src=source, group=self.layout.pp_group)
        return picked
