"""The global top-k of the next-token distribution from vocab-parallel logits shards (no grad).

Each rank takes the top-k of its shard; one all-gather of ``[tokens, 2k]`` candidates (value and
global id, packed in fp64 where both are exact) lets every rank pick the global top-k. Its first
value is the global max ``M``, so the normaliser needs only one all-reduce SUM of
``Σ e^{z - M}``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from mrl.ops._kernels import local_stats
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_gather_last_dim, all_reduce_, group_size


class TopK(NamedTuple):
    """The k most likely tokens of each row, most likely first."""

    logprobs: torch.Tensor
    """log p of each, fp32 ``[..., k]``; ``.exp()`` gives the probabilities."""

    indices: torch.Tensor
    """Their global vocabulary ids, int64 ``[..., k]``."""


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> TopK:
    """The global top-k log-probabilities and ids of softmax(logits / temperature) over the full vocabulary.

    ``logits`` is this rank's shard ``[..., V/tp]``; padded columns (global id >= vocab_size) are
    never chosen. Every rank of ``group`` returns the same result. Ties between equal logits may be
    ordered differently from ``torch.topk`` on the full logits.
    """
    shard = VocabShard.of(logits, group, vocab_size)
    if not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k must be in [1, {shard.vocab_size}] (the vocabulary size), got {k}")
    scale = check_temperature(temperature)
    x = logits.reshape(-1, shard.local_size)  # [tokens, V/tp]
    rows, cols = x.shape[0], shard.valid

    candidates = torch.full((rows, 2, k), -1.0, dtype=torch.float64, device=x.device)
    candidates[:, 0] = float("-inf")
    local_k = min(k, cols)
    if local_k:
        values, ids = x[:, :cols].topk(local_k, dim=-1)
        candidates[:, 0, :local_k] = values.float().mul_(scale)
        candidates[:, 1, :local_k] = ids + shard.start
    gathered = all_gather_last_dim(candidates.view(rows, 2 * k), group)  # [tokens, tp·2k]
    gathered = gathered.view(rows, group_size(group), 2, k)
    top_z, where = gathered[:, :, 0].reshape(rows, -1).topk(k, dim=-1)  # [tokens, k]
    top_ids = gathered[:, :, 1].reshape(rows, -1).gather(-1, where).long()
    top_z = top_z.float()
    big_m = top_z[:, 0]  # global max of z

    stats = local_stats(x, shard, scale, chunk_rows(chunk_size, logits, cols), with_u=False, with_sum_z=False)
    local_s = stats.sumexp * (stats.max - big_m).exp() if cols else stats.sumexp
    log_s = all_reduce_(local_s, dist.ReduceOp.SUM, group).log()
    logprobs = top_z - big_m.unsqueeze(-1) - log_s.unsqueeze(-1)
    shape = (*logits.shape[:-1], k)
    return TopK(logprobs.view(shape), top_ids.view(shape))
