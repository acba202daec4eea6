"""KV-cached sampling from the Megatron-Core policy on its own TP/PP/VPP/DP layout (``rollout.engine: megatron``).

``PolicySampler.generate(prompts, seed)``:
  1. sorts this DP rank's prompts by length and cuts them into **waves** of at most
     ``wave_rows`` rows (the KV-cache budget, see ``RolloutConfig.wave_rows``); with attention that
     takes no padding masks (Transformer Engine) a wave also holds one prompt length only;
  2. per wave: one prefill of the left-padded prompts (``KVCacheDecoder``), then one token per step;
     the last pipeline stage samples (``vocab_parallel_sample``: temperature, top-k, top-p or
     greedy, without gathering the vocabulary) and broadcasts the tokens and their log-probs to
     the other stages; rows that emit eos leave the batch (their cache rows are compacted away);
  3. returns completions and log-probs in prompt order, identical on every rank of the replica.

Noise is seeded by (seed, wave, DP rank) — and the TP rank for full-distribution draws — so a
rollout is reproducible on a given layout.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from mrl.model.decoding import KVCacheDecoder, sequence_parallel_disabled, supports_padding_masks
from mrl.ops.sampling import RowNoise, SamplingParams, vocab_parallel_sample
from mrl.parallel.layout import ParallelLayout
from mrl.rl.rollout import Rollout


class PolicySampler:
    """Samples completions from the policy model chunks on this rank's layout."""

    def __init__(self, chunks: list, layout: ParallelLayout, *, vocab_size: int, eos_id: int, pad_id: int,
                 max_new_tokens: int, max_length: int, sampling: SamplingParams, wave_rows: int,
                 decoder_factory: Callable[..., KVCacheDecoder] = KVCacheDecoder,
                 log: Callable[[str], None] | None = None) -> None:
        self.chunks = chunks
        self.layout = layout
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.sampling = sampling
        self.wave_rows = wave_rows
        self.decoder_factory = decoder_factory
        self.padding_masks = supports_padding_masks(chunks)
        self.log = log
        self._told_sequence_parallel = False

    @classmethod
    def from_config(cls, cfg, chunks: list, layout: ParallelLayout, tokenizer, log=None) -> "PolicySampler":
        rollout = cfg.rollout
        wave_rows, _ = cfg.rollout_wave_rows(layout.dp)
        sampling = SamplingParams(temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p)
        return cls(chunks, layout, vocab_size=cfg.model.vocab_size, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, max_new_tokens=rollout.max_new_tokens,
                   max_length=cfg.data.seq_length, sampling=sampling, wave_rows=wave_rows, log=log)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int, *, greedy: bool = False) -> Rollout:
        """Completions (ending with eos unless cut at max_new_tokens) and their log-probs;
        ``greedy``: the most likely (kept) token at every step instead of a draw."""
        started = time.monotonic()
        sampling = replace(self.sampling, greedy=True) if greedy else self.sampling
        self._check(prompts)
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        waves = self._waves(prompts)
        was_training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with sequence_parallel_disabled(self.chunks) as switched_off:
                self._note_sequence_parallel(switched_off)
                for index, rows in enumerate(waves):
                    tokens, lps = self._decode_wave([prompts[r] for r in rows], seed, index, sampling)
                    for row, row_tokens, row_lps in zip(rows, tokens, lps):
                        completions[row], logprobs[row] = row_tokens, row_lps
        finally:
            for chunk, mode in zip(self.chunks, was_training):
                chunk.train(mode)
        seconds = time.monotonic() - started
        generated = sum(len(c) for c in completions)
        return Rollout(completions, logprobs, {"seconds": seconds, "tokens": float(generated),
                                               "waves": float(len(waves))})

    def _check(self, prompts: list[list[int]]) -> None:
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + self.max_new_tokens > self.max_length:
            raise ValueError(f"prompt of {longest} tokens + {self.max_new_tokens} new tokens "
                             f"exceeds the sequence length {self.max_length}")

    def _waves(self, prompts: list[list[int]]) -> list[list[int]]:
        """Prompt indices of each wave: by length, at most ``wave_rows`` rows (one length without masks)."""
        order = sorted(range(len(prompts)), key=lambda r: (len(prompts[r]), r))
        waves: list[list[int]] = []
        for row in order:
            if (not waves or len(waves[-1]) == self.wave_rows
                    or (not self.padding_masks and len(prompts[waves[-1][0]]) != len(prompts[row]))):
                waves.append([])
            waves[-1].append(row)
        return waves

    def _note_sequence_parallel(self, switched_off: bool) -> None:
        if switched_off and not self._told_sequence_parallel and self.log is not None:
            self.log("decoding runs without sequence parallelism (a decode step holds one token per row)")
        self._told_sequence_parallel = self._told_sequence_parallel or switched_off

    # One wave -----------------------------------------------------------------------------------

    def _decode_wave(self, prompts: list[list[int]], seed: int, wave: int, sampling: SamplingParams):
        rows = len(prompts)
        longest = max(len(p) for p in prompts)
        pad = torch.tensor([longest - len(p) for p in prompts])  # [rows] leading pads
        tokens = torch.full((rows, longest), self.pad_id, dtype=torch.long)  # [rows, L] left-padded
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt)
        decoder = self.decoder_factory(self.chunks, self.layout, max_rows=rows,
                                       max_length=longest + self.max_new_tokens, padding_masks=self.padding_masks)
        rank_noise, shared_noise = self._generators(seed, wave, decoder.device)
        out_tokens: list[list[int]] = [[] for _ in range(rows)]
        out_lps: list[list[float]] = [[] for _ in range(rows)]
        active = torch.arange(rows)  # wave rows still decoding, in cache order
        logits = decoder.prefill(tokens, pad)
        for step in range(self.max_new_tokens):
            picked, lps = self._sample(logits, rows, active, rank_noise, shared_noise, sampling)
            for row, token, lp in zip(active.tolist(), picked.tolist(), lps.tolist()):
                out_tokens[row].append(token)
                out_lps[row].append(lp)
            going = picked != self.eos_id
            if step == self.max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                decoder.keep(going.nonzero().squeeze(1))
                active, picked = active[going], picked[going]
            logits = decoder.step(picked)
        return out_tokens, out_lps

    def _generators(self, seed: int, wave: int, device) -> tuple[torch.Generator, torch.Generator]:
        """(per-TP-rank, shared-by-TP-ranks) generators of this wave."""
        base = (seed, wave, self.layout.dp_rank)
        rank = torch.Generator(device=device).manual_seed(hash(base + (self.layout.tp_rank,)) % 2**62)
        shared = torch.Generator(device=device).manual_seed(hash(base + (-1,)) % 2**62)
        return rank, shared

    def _sample(self, logits, rows: int, active: torch.Tensor, rank_gen, shared_gen, sampling: SamplingParams):
        """Tokens and log-probs of the active rows, sampled on the last stage, known to every stage."""
        count = len(active)
        packed = torch.zeros((2, count), dtype=torch.float64, device=rank_gen.device)
        if self.layout.is_last_stage:
            sampled = vocab_parallel_sample(
                logits, self.layout.tp_group, sampling, vocab_size=self.vocab_size,
                rank_noise=RowNoise(rank_gen, rows, active), shared_noise=RowNoise(shared_gen, rows, active),
            )
            packed[0], packed[1] = sampled.tokens, sampled.logprobs
        if self.layout.pp > 1:
            source = dist.get_global_rank(self.layout.pp_group, self.layout.pp - 1)
            dist.broadcast(packed, src=source, group=self.layout.pp_group)
        return packed[0].long().cpu(), packed[1].float().cpu()
