"""Where a rank's logits shard sits in the vocabulary, and the argument checks every op shares.

Megatron-Core's output layer gives TP rank ``r`` of ``tp`` the contiguous columns
``[r·V_local, (r+1)·V_local)`` of a vocabulary padded to ``V_local·tp`` ids. The true vocabulary
``[0, vocab_size)`` is a prefix of it, so on every rank the real columns are a prefix of the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrl.ops.comm import group_rank, group_size

# Bytes of one fp32 work buffer per chunk of tokens when ``chunk_size`` is not given: about the L2
# cache of a CPU core (so a chunk is read from memory once and then reused from cache), and a
# size on GPUs that keeps the work buffers a small fraction of a logits shard while each kernel
# still runs for tens of microseconds.
_CHUNK_BYTES_CPU = 1 << 21
_CHUNK_BYTES_CUDA = 1 << 28


@dataclass(frozen=True)
class VocabShard:
    """The global vocabulary ids of one rank's logits columns."""

    local_size: int
    """Columns of the shard (the padded vocabulary divided by tp)."""

    start: int
    """Global id of the shard's column 0."""

    valid: int
    """Leading columns of the shard that are real tokens (global id < vocab_size)."""

    vocab_size: int
    """True size of the global vocabulary (the padded size when no ``vocab_size`` was given)."""

    @classmethod
    def of(cls, logits: torch.Tensor, group, vocab_size: int | None) -> "VocabShard":
        """The shard of ``logits`` (``[..., V_local]``) held by this rank of ``group``."""
        if logits.dim() < 1 or logits.shape[-1] == 0:
            raise ValueError(
                f"logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
        local = logits.shape[-1]
        padded = local * group_size(group)
        if vocab_size is None:
            vocab_size = padded
        elif not 1 <= vocab_size <= padded:
            raise ValueError(
                f"vocab_size must be in [1, {padded}] (the shard width {local} × tp "
                f"{group_size(group)}), got {vocab_size}"
            )
        start = group_rank(group) * local
        return cls(local, start, min(max(vocab_size - start, 0), local), vocab_size)

    def localize(self, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of each label in this shard (0 where elsewhere) and whether this shard holds it."""
        local = labels - self.start
        owned = (local >= 0) & (local < self.valid) & (labels != ignore_index)
        return torch.where(owned, local, 0), owned


def label_logits(x, col: torch.Tensor, owned: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · x[i, col_i]`` in fp32 where this shard holds row i's label, 0 elsewhere ``[rows]``."""
    picked = x.gather(1, col.unsqueeze(-1)).squeeze(-1).float() * scale
    return torch.where(owned, picked, 0.0)


def check_labels(labels: torch.Tensor, logits: torch.Tensor, shard: VocabShard, ignore_index: int) -> None:
    """Raise ``ValueError`` unless ``labels`` are ``[...]`` ids in ``[0, vocab_size)`` or ignore_index.

    The bounds are global and known to every rank, and TP ranks hold the same labels, so every
    rank reaches the same verdict without communicating.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of logits without its last dimension, "
            f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= shard.vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        example = int(labels[bad].reshape(-1)[0])
        raise ValueError(
            f"labels contain {int(bad.sum())} id(s) outside [0, {shard.vocab_size}) that are not "
            f"ignore_index={ignore_index}, e.g. {example}"
        )


def check_temperature(temperature: float) -> float:
    """Return ``1 / temperature``; raise ``ValueError`` unless the temperature is positive."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def chunk_rows(chunk_size: int | None, logits: torch.Tensor, columns: int) -> int:
    """Tokens per chunk: ``chunk_size``, or a cache-sized default for rows of ``columns`` fp32."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
        return int(chunk_size)
    budget = _CHUNK_BYTES_CUDA if logits.is_cuda else _CHUNK_BYTES_CPU
    return max(1, budget // (4 * max(columns, 1)))
