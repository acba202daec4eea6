"""log p of several given token ids per row, from vocab-parallel logits shards (top-k distillation).

For each token row and ids ``y_1..y_k`` (global vocabulary ids, e.g. a teacher's top-k), with
``z = x / temperature`` in fp32, ``M = max z`` and ``S = Σ_v e^{z_v - M}`` over the whole vocabulary:

    log p(y_i) = z_{y_i} - M - log S
    rest       = log Σ_{v ∉ {y}} p_v = log R - log S,     R = Σ_{v ∉ {y}} e^{z_v - M}   (``rest=True``)

``rest`` sums the columns outside the ids directly (they are zeroed before the sum), so it keeps
full relative precision when the ids hold almost all the mass; 1 − Σ_i p(y_i) would cancel. It is
floored at ``REST_FLOOR`` (and has no gradient there) where R underflows.

Forward: per chunk the shard's max, Σe and (with ``rest``) Σe outside the ids; the logits at the ids
this shard holds (0 elsewhere); one all-reduce MAX of the maxima and one packed all-reduce SUM of the
rescaled sums and the ``k`` picked logits. Backward, without communication, into ONE gradient buffer:

    ∂/∂z_j = Σ_i g_i·1[j = y_i] - p_j·Σ_i g_i + g_rest·(1[j ∉ {y}]·e^{z_j - M}/R - p_j)

(``softmax_grad`` over every column, the label terms at the id columns this shard holds, and the rest
term, chunk by chunk, on the other columns only: adding it everywhere and taking it back at the ids
would cancel catastrophically when R ≪ S). With ``rest`` the ids of a row must be distinct. The
logits are never gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import exp_, row_chunks, shift_into, softmax_grad
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.fused_head import FusedHead

REST_FLOOR = -80.0
"""Lowest ``rest`` log-mass returned (e^-80 ≈ 2e-35: below it R underflows in fp32)."""


def _id_columns(col, owned, rows: int, cols: int) -> torch.Tensor:
    """``[rows, cols]`` bool: the id columns of this shard (ids held elsewhere go to a spare column)."""
    target = torch.where(owned, col, cols)  # [rows, k]
    hit = torch.zeros(rows, cols + 1, dtype=torch.bool, device=col.device)
    return hit.scatter_(1, target, torch.ones_like(target, dtype=torch.bool))[:, :cols]


def _local_sums(x, shard: VocabShard, scale: float, chunk: int, col, owned, rest: bool) -> torch.Tensor:
    """``[3, tokens]`` fp32: the shard's max m, Σ e^{z - m} and (with ``rest``) Σ e^{z - m} outside the ids."""
    rows, cols = x.shape[0], shard.valid
    out = torch.zeros(3, rows, dtype=torch.float32, device=x.device)
    out[0] = float("-inf")
    if rows == 0 or cols == 0:
        return out
    m, s, r = out
    buf = torch.empty(min(chunk, rows), cols, dtype=torch.float32, device=x.device)
    for r0, r1 in row_chunks(rows, chunk):
        xc = x[r0:r1, :cols]
        m[r0:r1] = torch.amax(xc, dim=-1).float() * scale
        e = exp_(shift_into(buf[: r1 - r0], xc, m[r0:r1], scale))  # [chunk, valid] e^{z - m}
        torch.sum(e, dim=-1, out=s[r0:r1])
        if rest:
            hit = _id_columns(col[r0:r1], owned[r0:r1], r1 - r0, cols)
            torch.sum(e.masked_fill_(hit, 0.0), dim=-1, out=r[r0:r1])
    return out


class _VocabParallelLogprobsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, group, shard: VocabShard, scale: float, chunk: int, rest: bool):
        x = logits.reshape(-1, shard.local_size)  # [tokens, V/tp]
        k = ids.shape[-1]
        ids = ids.reshape(-1, k)  # [tokens, k]
        local = ids - shard.start
        owned = (local >= 0) & (local < shard.valid)  # [tokens, k]
        col = torch.where(owned, local, 0)
        m, s, r = _local_sums(x, shard, scale, chunk, col, owned, rest)
        big_m = all_reduce_(m.clone(), dist.ReduceOp.MAX, group)  # [tokens] M
        picked = torch.where(owned, x.gather(1, col).float() * scale, 0.0)  # [tokens, k] z at owned ids
        rescale = (m - big_m).exp() if shard.valid > 0 else torch.zeros_like(big_m)
        packed = torch.cat([torch.stack([s * rescale, r * rescale]), picked.t()])  # [2 + k, tokens]
        packed = all_reduce_(packed, dist.ReduceOp.SUM, group)
        big_s, big_r = packed[0], packed[1]  # [tokens] S, R
        log_s = big_s.log()
        logp = packed[2:].t() - (big_m + log_s).unsqueeze(-1)  # [tokens, k]
        rest_logp = (big_r.log() - log_s).clamp_min(REST_FLOOR)  # [tokens]
        ctx.shard, ctx.scale, ctx.chunk = shard, scale, chunk
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, big_m, big_s, big_r, rest_logp, col, owned)
        return logp, rest_logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_rest):
        logits, big_m, big_s, big_r, rest_logp, col, owned = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_rest is None):
            return (None,) * 7
        shard, scale = ctx.shard, ctx.scale
        x = logits.reshape(-1, shard.local_size)
        g = torch.zeros_like(col, dtype=torch.float32) if grad_logp is None else grad_logp.float() * scale  # [tokens, k]
        alpha = -g.sum(-1)  # [tokens]
        h = None
        if grad_rest is not None:  # no gradient where the rest is floored
            h = torch.where(rest_logp > REST_FLOOR, grad_rest.reshape(-1).float() * scale, 0.0)  # [tokens]
            alpha = alpha - h
        grad = softmax_grad(x, shard, scale, ctx.chunk, shift=big_m, norm=big_s, alpha=alpha)
        cols = shard.valid
        if cols > 0:
            grad.scatter_add_(1, col, torch.where(owned, g, 0.0).to(grad.dtype))
        if h is not None and cols > 0 and x.shape[0] > 0:  # + g_rest·e^{z_j - M}/R off the ids
            coef = torch.where(h != 0, h / big_r, 0.0).unsqueeze(-1)  # [tokens, 1]
            buf = torch.empty(min(ctx.chunk, x.shape[0]), cols, dtype=torch.float32, device=x.device)
            for r0, r1 in row_chunks(x.shape[0], ctx.chunk):
                e = exp_(shift_into(buf[: r1 - r0], x[r0:r1, :cols], big_m[r0:r1], scale)).mul_(coef[r0:r1])
                e.masked_fill_(_id_columns(col[r0:r1], owned[r0:r1], r1 - r0, cols), 0.0)
                grad[r0:r1, :cols] += e.to(grad.dtype)
        return grad.view(logits.shape), None, None, None, None, None, None


def vocab_parallel_logprobs_at(
    logits: torch.Tensor,
    ids: torch.Tensor,
    group=None,
    *,
    rest: bool = False,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
):
    """log softmax(logits / temperature) at ``ids`` ``[..., k]`` fp32, over the full vocabulary;
    with ``rest``, also the log-mass of every other token ``[...]`` (module docstring).

    ``logits`` is this rank's shard ``[..., V/tp]``; ``ids`` are global vocabulary ids
    ``[..., k]`` in ``[0, vocab_size)`` (the same on every TP rank; distinct within a row when
    ``rest``). Differentiable in ``logits``.
    """
    if isinstance(logits, FusedHead):
        raise ValueError("vocab_parallel_logprobs_at needs a logits tensor; a fused head (model.fused_head) "
                         "is not supported here")
    shard = VocabShard.of(logits, group, vocab_size)
    if ids.dim() != logits.dim() or ids.shape[:-1] != logits.shape[:-1] or ids.shape[-1] < 1:
        raise ValueError(f"ids must be [..., k] over the logits' leading dims {tuple(logits.shape[:-1])}, "
                         f"got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an int64/int32 tensor, got {ids.dtype}")
    bad = (ids < 0) | (ids >= shard.vocab_size)
    if bool(bad.any()):
        raise ValueError(f"ids contain {int(bad.sum())} id(s) outside [0, {shard.vocab_size}), "
                         f"e.g. {int(ids[bad].reshape(-1)[0])}")
    if rest and ids.shape[-1] > 1:
        ordered = ids.sort(-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("ids must be distinct within each row when rest=True")
    scale = check_temperature(temperature)
    chunk = chunk_rows(chunk_size, logits, shard.valid)
    logp, rest_logp = _VocabParallelLogprobsAt.apply(logits, ids.long(), group, shard, scale, chunk, rest)
    logp = logp.view(ids.shape)
    return (logp, rest_logp.view(ids.shape[:-1])) if rest else logp
