"""KL(p‖q) per token from two vocab-parallel logits shards, differentiable in both.

With ``z_p = x_p / temperature``, ``z_q = x_q / temperature`` (fp32), their global maxima
``M_p, M_q``, normalisers ``S_p = Σ e^{z_p - M_p}``, ``S_q = Σ e^{z_q - M_q}`` and the raw
difference ``r_v = (z_p - z_q)_v``:

    R = Σ_v e^{(z_p - M_p)_v} r_v        E_p[r] = R/S_p
    KL(p‖q) = Σ_v p_v (log p_v - log q_v) = E_p[r] - (M_p + log S_p) + (M_q + log S_q)

Forward: per chunk the shard's maxima and ``s_p, s_q, r`` relative to them, one all-reduce MAX of
both maxima and one packed all-reduce SUM. Backward, without communication:

    ∂KL/∂z_p = p ⊙ (r - E_p[r])        ∂KL/∂z_q = q - p

``R`` holds ``r`` unshifted, so moving it to another maximum (another rank's, or another block's
of the fused head) only multiplies it by ``e^{m - M}``: no sum of large shifts that the backward's
``r`` would round differently (which matters for logits of size 1e4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import empty_grad, exp_, row_chunks, shift_into
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.fused_head import FusedHead, fused_head_kl


def raw_difference_into(out: torch.Tensor, xp: torch.Tensor, xq: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = z_p - z_q = scale·(x_p - x_q)`` in fp32 (the one expression forward and backward share)."""
    out.copy_(xp).sub_(xq)  # in fp32 whatever the logits' dtype
    return out if scale == 1.0 else out.mul_(scale)


def _local_kl_stats(xp, xq, shard: VocabShard, scale: float, chunk: int) -> torch.Tensor:
    """``[5, tokens]`` fp32: m_p, m_q, s_p, s_q, r of each row over this shard's real columns."""
    rows, cols = xp.shape[0], shard.valid
    out = torch.zeros(5, rows, dtype=torch.float32, device=xp.device)
    out[:2] = float("-inf")
    if rows == 0 or cols == 0:
        return out
    m_p, m_q, s_p, s_q, r = out
    bufs = torch.empty(3, min(chunk, rows), cols, dtype=torch.float32, device=xp.device)
    for r0, r1 in row_chunks(rows, chunk):
        n = r1 - r0
        xpc, xqc = xp[r0:r1, :cols], xq[r0:r1, :cols]
        m_p[r0:r1] = torch.amax(xpc, dim=-1).float() * scale
        m_q[r0:r1] = torch.amax(xqc, dim=-1).float() * scale
        tp = shift_into(bufs[0, :n], xpc, m_p[r0:r1], scale)  # z_p - m_p
        tq = shift_into(bufs[1, :n], xqc, m_q[r0:r1], scale)  # z_q - m_q
        diff = raw_difference_into(bufs[2, :n], xpc, xqc, scale)  # z_p - z_q
        torch.sum(exp_(tp), dim=-1, out=s_p[r0:r1])
        torch.sum(exp_(tq), dim=-1, out=s_q[r0:r1])
        torch.sum(diff.mul_(tp), dim=-1, out=r[r0:r1])
    return out


def rebase_kl_stats(local: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """``[3, tokens]`` S_p, S_q, R of ``local`` (``_local_kl_stats``, finite maxima) relative to the
    maxima ``big`` ``[2, tokens]`` (each ≥ its own): each sum times ``e^{m - M}`` of its side (R: p's).
    Sums of rebased stats merge blocks."""
    m_p, m_q, s_p, s_q, r = local
    f_p, f_q = (m_p - big[0]).exp(), (m_q - big[1]).exp()
    return torch.stack([s_p * f_p, s_q * f_q, r * f_p])


def reduce_kl_stats(local: torch.Tensor, shard: VocabShard, group):
    """``(M [2, tokens], sums [3, tokens] = S_p, S_q, R, E_p[r] [tokens])`` from every rank's
    ``_local_kl_stats``: one all-reduce MAX, one all-reduce SUM."""
    big = all_reduce_(local[:2].clone(), dist.ReduceOp.MAX, group)  # [2, tokens]
    if shard.valid > 0:
        parts = rebase_kl_stats(local, big)
    else:
        parts = torch.zeros_like(local[2:])
    sums = all_reduce_(parts, dist.ReduceOp.SUM, group)  # [3, tokens]
    return big, sums, sums[2] / sums[0]


def kl_from_sums(big: torch.Tensor, sums: torch.Tensor, mean_r: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = E_p[r] - (M_p - M_q) - log S_p + log S_q."""
    return mean_r - (big[0] - big[1]) - sums[0].log() + sums[1].log()


def kl_grad_chunk(xp, xq, shard: VocabShard, scale: float, big, inv_sp, inv_sq, mean_r, g, grad_p, grad_q,
                  bufs: torch.Tensor) -> None:
    """Write ``g·∂KL/∂x_p`` into ``grad_p`` and ``g·∂KL/∂x_q`` into ``grad_q`` (either may be None) for
    one chunk of rows ``[c, V/tp]``; ``big`` ``[2, c]`` holds M_p, M_q, ``g`` ``[c, 1]`` carries
    ``scale``, ``bufs`` is fp32 work space of at least ``[3, c, valid]``."""
    rows, cols = xp.shape[0], shard.valid
    tp = shift_into(bufs[0, :rows], xp[:, :cols], big[0], scale)  # z_p - M_p
    p = exp_(tp).mul_(inv_sp)
    if grad_q is not None:
        tq = shift_into(bufs[1, :rows], xq[:, :cols], big[1], scale)  # z_q - M_q
        q = exp_(tq).mul_(inv_sq)
        grad_q[:, :cols] = q.sub_(p).mul_(g)
    if grad_p is not None:
        d = raw_difference_into(bufs[2, :rows], xp[:, :cols], xq[:, :cols], scale).sub_(mean_r.unsqueeze(-1))
        grad_p[:, :cols] = d.mul_(p).mul_(g)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_p, logits_q, group, shard: VocabShard, scale: float, chunk: int):
        xp = logits_p.reshape(-1, shard.local_size)  # [tokens, V/tp]
        xq = logits_q.reshape(-1, shard.local_size)
        big, sums, mean_r = reduce_kl_stats(_local_kl_stats(xp, xq, shard, scale, chunk), shard, group)
        ctx.shard, ctx.scale, ctx.chunk = shard, scale, chunk
        ctx.save_for_backward(logits_p, logits_q, big, sums, mean_r)
        return kl_from_sums(big, sums, mean_r)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logits_p, logits_q, big, sums, mean_r = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        shard, scale = ctx.shard, ctx.scale
        xp = logits_p.reshape(-1, shard.local_size)
        xq = logits_q.reshape(-1, shard.local_size)
        g = grad_kl.reshape(-1, 1).float() * scale  # [tokens, 1]
        inv_sp, inv_sq = sums[:2].reciprocal().unsqueeze(-1)  # [tokens, 1] 1/S_p, 1/S_q
        grad_p = empty_grad(xp, shard) if need_p else None
        grad_q = empty_grad(xq, shard) if need_q else None
        rows, cols = xp.shape[0], shard.valid
        if rows and cols:
            bufs = torch.empty(3, min(ctx.chunk, rows), cols, dtype=torch.float32, device=xp.device)
            for r0, r1 in row_chunks(rows, ctx.chunk):
                kl_grad_chunk(xp[r0:r1], xq[r0:r1], shard, scale, big[:, r0:r1], inv_sp[r0:r1], inv_sq[r0:r1],
                              mean_r[r0:r1], g[r0:r1],
                              None if grad_p is None else grad_p[r0:r1], None if grad_q is None else grad_q[r0:r1],
                              bufs)
        return (
            None if grad_p is None else grad_p.view(logits_p.shape),
            None if grad_q is None else grad_q.view(logits_q.shape),
            None, None, None, None,
        )


def vocab_parallel_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL(p‖q) ``[...]`` fp32 of ``p = softmax(logits_p/T)``, ``q = softmax(logits_q/T)``.

    Both are this rank's vocabulary shards ``[..., V/tp]`` of the same shape; the result is
    differentiable in both (pass ``logits_q.detach()`` for a fixed reference). Rounding can leave
    it a few ulps below 0 when p = q. Both may instead be ``FusedHead`` s (hidden states and output
    weights): the exact KL without materialising either's logits.
    """
    if isinstance(logits_p, FusedHead) or isinstance(logits_q, FusedHead):
        if not (isinstance(logits_p, FusedHead) and isinstance(logits_q, FusedHead)):
            raise ValueError("vocab_parallel_kl takes two logits tensors or two fused heads, not one of each")
        kl = fused_head_kl(logits_p, logits_q, group, scale=check_temperature(temperature),
                           vocab_size=vocab_size, chunk_size=chunk_size)
        return kl.view(logits_p.shape[:-1])
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"logits_p and logits_q must have the same shape, got {tuple(logits_p.shape)} and "
            f"{tuple(logits_q.shape)}"
        )
    shard = VocabShard.of(logits_p, group, vocab_size)
    if not logits_q.is_floating_point():
        raise ValueError(f"logits_q must be a floating-point tensor, got {logits_q.dtype}")
    scale = check_temperature(temperature)
    chunk = chunk_rows(chunk_size, logits_p, shard.valid)
    kl = _VocabParallelKL.apply(logits_p, logits_q, group, shard, scale, chunk)
    return kl.view(logits_p.shape[:-1])
