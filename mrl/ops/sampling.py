"""Next-token sampling from vocab-parallel logits shards: temperature, top-k, top-p, greedy.

Nothing here gathers the vocabulary. For each row of ``z = x / T`` (``x`` the rank's shard):

* **Full distribution** (no top-k, no top-p): the Gumbel-max trick, ``argmax_v (z_v + g_v)`` with
  independent Gumbel noise ``g`` is an exact draw from ``softmax(z)``. Each TP rank takes the
  maximum over its shard with its own noise, and one all-gather of five numbers per row
  (best score, its id, its ``z``, the shard's max and ``Σ e^{z - max}``) gives every rank the winner
  and the global normaliser, hence ``log p(token) = z_tok - logsumexp(z)``.
* **Truncated** (top-k and/or top-p): every rank offers its ``c`` largest ``z`` as candidates; one
  all-gather merges them. The merged list is the global order of every value above
  ``B = max_r (rank r's c-th value)``. Top-k needs ``c = k``. Top-p keeps the shortest prefix of
  the sorted distribution whose mass reaches ``p`` (a token is kept when the mass of the tokens
  before it is below ``p``; after top-k the mass is renormalised within the top-k, as in common
  inference engines); when that prefix is not provably complete (its last value is not above
  ``B``) the candidates grow fourfold and are gathered again. The draw is a Gumbel-max over the kept
  candidates with noise identical on every TP rank, and its log-prob is that of the truncated,
  renormalised distribution: ``z_tok - logsumexp_{kept}(z)``.
* **Greedy**: the same without noise; the log-prob is that of the (possibly truncated)
  distribution at that temperature.

Noise comes from ``RowNoise``: row ``i`` of a wave always reads row ``i`` of the same draw,
whichever rows are still active, so dropping finished rows does not change what the others sample.
Padded vocabulary ids (``>= vocab_size``) are never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mrl.ops._shard import VocabShard, check_temperature
from mrl.ops.comm import all_gather_last_dim, group_size

_FIRST_CANDIDATES = 64
"""Candidates per rank in the first top-p round (grown fourfold while the nucleus is not settled)."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn."""

    temperature: float = 1.0
    """Logits are divided by this (> 0) before everything else."""

    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""

    top_p: float = 1.0
    """Keep the smallest most-likely set whose probability reaches top_p (1: all)."""

    greedy: bool = False
    """Take the most likely kept token instead of drawing one."""

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


class Sampled(NamedTuple):
    """One token per row and its log-prob under the distribution it was drawn from."""

    tokens: torch.Tensor
    """Global vocabulary ids, int64 ``[rows]``."""

    logprobs: torch.Tensor
    """fp32 ``[rows]``."""


class RowNoise:
    """Uniform noise in (0, 1] for the active rows of a fixed wave of ``rows`` rows."""

    def __init__(self, generator: torch.Generator, rows: int, active: torch.Tensor | None = None) -> None:
        self.generator = generator
        self.rows = rows
        self.active = active  # [n] row indices into the wave, or None for all rows

    def uniform(self, columns: int) -> torch.Tensor:
        draw = torch.rand((self.rows, columns), generator=self.generator, device=self.generator.device)
        draw.clamp_(min=torch.finfo(torch.float32).tiny)
        return draw if self.active is None else draw[self.active.to(draw.device)]  # [n, columns]


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform))


@torch.no_grad()
def vocab_parallel_sample(
    logits: torch.Tensor,
    group,
    params: SamplingParams,
    *,
    rank_noise: RowNoise | None,
    shared_noise: RowNoise | None,
    vocab_size: int | None = None,
) -> Sampled:
    """Draw one token per row of ``logits`` (this rank's shard ``[rows, V/tp]``) as ``params`` says.

    ``rank_noise`` must be independent across the ranks of ``group`` (full-distribution draws);
    ``shared_noise`` must be identical on them (truncated draws). Either may be None when
    ``params.greedy``. Every rank of ``group`` returns the same tokens and log-probs.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, V/tp], got {tuple(logits.shape)}")
    shard = VocabShard.of(logits, group, vocab_size)
    if params.top_k > shard.vocab_size:
        raise ValueError(f"top_k must be <= the vocabulary size {shard.vocab_size}, got {params.top_k}")
    z = logits[:, : shard.valid].float() / params.temperature  # [rows, valid]
    if params.truncated:
        return _sample_truncated(z, shard, group, params, shared_noise)
    return _sample_full(z, shard, group, params.greedy, rank_noise)


def _sample_full(z: torch.Tensor, shard: VocabShard, group, greedy: bool, noise: RowNoise | None) -> Sampled:
    rows = z.shape[0]
    packed = torch.full((rows, 5), float("-inf"), dtype=torch.float64, device=z.device)  # [rows, 5]
    packed[:, 1] = 0.0
    packed[:, 4] = 0.0
    if shard.valid:
        local_max = z.max(dim=-1).values  # [rows]
        scores = z if greedy else z + _gumbel(noise.uniform(shard.valid))
        best, index = scores.max(dim=-1)
        packed[:, 0] = best
        packed[:, 1] = index + shard.start
        packed[:, 2] = z.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        packed[:, 3] = local_max
        packed[:, 4] = (z - local_max.unsqueeze(-1)).exp().sum(dim=-1)
    gathered = all_gather_last_dim(packed, group).view(rows, group_size(group), 5)  # [rows, tp, 5]
    winner = gathered[:, :, 0].argmax(dim=-1, keepdim=True)  # [rows, 1]
    pick = gathered.gather(1, winner.unsqueeze(-1).expand(rows, 1, 5)).squeeze(1)  # [rows, 5]
    big_m = gathered[:, :, 3].max(dim=-1).values  # [rows]
    log_s = (gathered[:, :, 4] * (gathered[:, :, 3] - big_m.unsqueeze(-1)).exp()).sum(dim=-1).log()
    return Sampled(pick[:, 1].long(), (pick[:, 2] - big_m - log_s).float())


def _sample_truncated(z: torch.Tensor, shard: VocabShard, group, params: SamplingParams,
                      noise: RowNoise | None) -> Sampled:
    rows = z.shape[0]
    wanted = params.top_k if params.top_k else min(_FIRST_CANDIDATES, shard.vocab_size)
    log_norm = None if params.top_k else _global_logsumexp(z, group)  # [rows], for top-p without top-k
    while True:
        values, ids, bound = _merged_candidates(z, shard, group, wanted)  # [rows, tp·c] sorted, [rows]
        if params.top_k:
            values, ids = values[:, : params.top_k], ids[:, : params.top_k]
            log_norm = torch.logsumexp(values, dim=-1)
        keep = torch.isfinite(values)
        if params.top_p < 1.0:
            probs = (values - log_norm.unsqueeze(-1)).exp()
            before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
            keep &= before < params.top_p
            keep[:, 0] = True
            last = values.masked_fill(~keep, float("inf")).min(dim=-1).values  # [rows]
            settled = params.top_k > 0 or bool((last > bound).all()) or wanted >= shard.vocab_size
            if not settled:
                wanted = min(wanted * 4, shard.vocab_size)
                continue
        break
    width = int(keep.sum(dim=-1).max())  # the kept tokens are a prefix of each sorted row
    values, ids, keep = values[:, :width], ids[:, :width], keep[:, :width]
    scores = values.masked_fill(~keep, float("-inf"))  # [rows, width]
    if not params.greedy:
        scores = scores + _gumbel(noise.uniform(scores.shape[1]))
    choice = scores.argmax(dim=-1, keepdim=True)  # [rows, 1]
    kept_norm = torch.logsumexp(values.masked_fill(~keep, float("-inf")), dim=-1)
    return Sampled(ids.gather(-1, choice).squeeze(-1),
                   (values.gather(-1, choice).squeeze(-1) - kept_norm).float())


def _global_logsumexp(z: torch.Tensor, group) -> torch.Tensor:
    """``logsumexp`` of each row over the whole vocabulary, fp64 ``[rows]`` (one all-gather)."""
    rows = z.shape[0]
    packed = torch.zeros((rows, 2), dtype=torch.float64, device=z.device)
    packed[:, 0] = float("-inf")
    if z.shape[1]:
        local_max = z.max(dim=-1).values
        packed[:, 0] = local_max
        packed[:, 1] = (z - local_max.unsqueeze(-1)).exp().sum(dim=-1)
    gathered = all_gather_last_dim(packed, group).view(rows, group_size(group), 2)
    big_m = gathered[:, :, 0].max(dim=-1).values
    return big_m + (gathered[:, :, 1] * (gathered[:, :, 0] - big_m.unsqueeze(-1)).exp()).sum(dim=-1).log()


def _merged_candidates(z: torch.Tensor, shard: VocabShard, group, wanted: int):
    """Every rank's ``wanted`` largest ``z`` merged and sorted (fp64 values, int64 ids) ``[rows, tp·wanted]``,
    and the bound ``B`` below which the merged order may miss tokens ``[rows]``."""
    rows = z.shape[0]
    candidates = torch.full((rows, 2, wanted), float("-inf"), dtype=torch.float64, device=z.device)
    candidates[:, 1] = -1.0
    local = min(wanted, shard.valid)
    if local:
        values, index = z.topk(local, dim=-1)  # sorted, largest first
        candidates[:, 0, :local] = values
        candidates[:, 1, :local] = index + shard.start
    gathered = all_gather_last_dim(candidates.view(rows, 2 * wanted), group)
    gathered = gathered.view(rows, group_size(group), 2, wanted)
    bound = gathered[:, :, 0, -1].max(dim=-1).values  # each rank's smallest offer; -inf when it offered all
    values, order = gathered[:, :, 0].reshape(rows, -1).sort(dim=-1, descending=True, stable=True)
    ids = gathered[:, :, 1].reshape(rows, -1).gather(-1, order).long()
    return values, ids, bound
