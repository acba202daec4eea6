"""Collation of rows into padded micro-batch tensors, and attention helpers for packed rows.

Attention is causal, so padding goes on the right: a real token never attends to a padding key,
and padding positions carry no loss (labels IGNORE_INDEX, loss_mask 0). No attention mask is
needed for unpacked rows.

Packed rows (SFT with data.packing) hold several documents. Their ``position_ids`` restart at 0
for each document, ``segment_ids`` number the documents 1, 2, ... (0 for padding) and each
document's last position has no label, so no loss term crosses documents. Attention is another
matter: with the model's plain causal mask, a document attends to the documents before it in
the row. To isolate documents:

* local layers on CPU: pass ``packed_attention_mask(segment_ids)`` ([b, 1, s, s], block-diagonal
  causal) as the attention mask (``mrl.train.step.run_schedule`` does, for batches with
  segment_ids). The unfused softmax applies it, and each document's logits then equal those of
  the document run alone (RoPE is relative; learned absolute embeddings read the
  restarted position_ids). Memory is O(s²) per row.
* local layers on GPU: the fused causal softmax kernel (fp16/bf16) ignores a given mask, so
  packed rows cross-attend there; refuse packing or disable masked_softmax_fusion.
* Transformer Engine: use the THD layout with ``packed_cu_seqlens(segment_ids)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch

from mrl.data.datasets import Example
from mrl.data.sequences import IGNORE_INDEX


@dataclass
class Batch:
    """One micro-batch. Rows of a preference batch alternate chosen (even) / rejected (odd)."""

    tokens: torch.Tensor
    """[b, s] int64 input ids (pad_id in padding)."""
    labels: torch.Tensor
    """[b, s] int64 next-token targets, IGNORE_INDEX (-100) where no loss."""
    loss_mask: torch.Tensor
    """[b, s] float32, 1 where labels holds a target."""
    position_ids: torch.Tensor
    """[b, s] int64 positions (restarting per packed document)."""
    padding_mask: torch.Tensor
    """[b, s] bool, True at padding positions."""
    indices: torch.Tensor
    """[b] int64 dataset rows of this batch."""
    segment_ids: Optional[torch.Tensor] = None
    """[b, s] int64 packed document number (1, 2, ...; 0 at padding); None when not packed."""
    rewards: Optional[torch.Tensor] = None
    """[b] float32 rollout rewards."""
    group_ids: Optional[torch.Tensor] = None
    """[b] int64 rollout group (prompt) of each row."""
    behaviour_logprobs: Optional[torch.Tensor] = None
    """[b, s] float32 behaviour-policy log-probs aligned with labels (0 where no target)."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are present, by field name (the batch keys of ``mrl.losses``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.as_dict().items()})


class Collator:
    """Pads rows to a common length and stacks them into a ``Batch``.

    Lengths: ``seq_length`` when pad_to='seq_length', else the longest row rounded up to
    ``pad_to_multiple_of`` (never beyond seq_length, which is itself a multiple).
    """

    def __init__(self, *, seq_length: int, pad_id: int, pad_to: str = "seq_length",
                 pad_to_multiple_of: int = 1) -> None:
        if seq_length % pad_to_multiple_of != 0:
            raise ValueError(
                f"data.seq_length={seq_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}"
            )
        self.seq_length, self.pad_id = seq_length, pad_id
        self.pad_to, self.multiple = pad_to, pad_to_multiple_of

    def padded_length(self, longest: int) -> int:
        if longest > self.seq_length:
            raise ValueError(f"a row of {longest} tokens exceeds data.seq_length={self.seq_length}")
        if self.pad_to == "seq_length":
            return self.seq_length
        return -(-longest // self.multiple) * self.multiple

    def __call__(self, examples: Sequence[Example], indices: Sequence[int]) -> Batch:
        b = len(examples)
        s = self.padded_length(max(len(e.tokens) for e in examples))
        tokens = np.full((b, s), self.pad_id, dtype=np.int64)
        labels = np.full((b, s), IGNORE_INDEX, dtype=np.int64)
        loss_mask = np.zeros((b, s), dtype=np.float32)
        padding = np.ones((b, s), dtype=bool)
        positions = np.zeros((b, s), dtype=np.int64)
        packed = examples[0].segment_ids is not None
        segments = np.zeros((b, s), dtype=np.int64) if packed else None
        rollout = examples[0].reward is not None
        with_logprobs = examples[0].behaviour_logprobs is not None
        logprobs = np.zeros((b, s), dtype=np.float32) if with_logprobs else None
        for i, e in enumerate(examples):
            n = len(e.tokens)
            tokens[i, :n], labels[i, :n], loss_mask[i, :n] = e.tokens, e.labels, e.loss_mask
            padding[i, :n] = False
            # Padding continues the last position (arange(s) for an unpacked row).
            positions[i, :n] = e.position_ids
            positions[i, n:] = np.arange(e.position_ids[-1] + 1, e.position_ids[-1] + 1 + s - n)
            if packed:
                segments[i, :n] = e.segment_ids
            if with_logprobs:
                logprobs[i, :n] = e.behaviour_logprobs
        return Batch(
            tokens=torch.from_numpy(tokens),
            labels=torch.from_numpy(labels),
            loss_mask=torch.from_numpy(loss_mask),
            position_ids=torch.from_numpy(positions),
            padding_mask=torch.from_numpy(padding),
            indices=torch.tensor(list(indices), dtype=torch.int64),
            segment_ids=None if segments is None else torch.from_numpy(segments),
            rewards=torch.tensor([e.reward for e in examples], dtype=torch.float32) if rollout else None,
            group_ids=torch.tensor([e.group_id for e in examples], dtype=torch.int64) if rollout else None,
            behaviour_logprobs=None if logprobs is None else torch.from_numpy(logprobs),
        )


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool mask, True where attention is NOT allowed (Megatron's convention).

    Query q may attend key k iff k <= q and both lie in the same segment (padding, segment 0,
    attends only to earlier padding).
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # [s, s]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s(q), s(k)]
    return ~(same & causal).unsqueeze(1)


def packed_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """[n+1] int32 cumulative lengths of the n runs of the flattened [b·s] token stream.

    A run is a maximal stretch of one segment within one row (a padding tail is a run of its
    own), the form Transformer Engine's THD attention takes.
    """
    b, s = segment_ids.shape
    flat = segment_ids.reshape(-1)  # [b·s]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # every row starts a run
    bounds = torch.nonzero(starts).flatten()
    return torch.cat([bounds, torch.tensor([b * s], device=flat.device)]).to(torch.int32)
