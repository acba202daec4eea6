"""KL(p‖q) per token from two vocab-parallel logits shards, differentiable in both.

With ``z_p = x_p / temperature``, ``z_q = x_q / temperature`` (fp32), their global maxima
``M_p, M_q`` and normalisers ``S_p = Σ e^{z_p - M_p}``, ``S_q = Σ e^{z_q - M_q}``:

    d_v = (z_p - M_p)_v - (z_q - M_q)_v        W = Σ_v e^{(z_p - M_p)_v} d_v
    KL(p‖q) = Σ_v p_v (log p_v - log q_v) = W/S_p - log S_p + log S_q

Forward: per chunk the shard's maxima and ``s_p, s_q, w`` relative to them, one all-reduce MAX of
both maxima and one packed all-reduce SUM. Backward, without communication:

    ∂KL/∂z_p = p ⊙ (d - E_p[d])        ∂KL/∂z_q = q - p        (E_p[d] = W/S_p)

``d`` is taken against each side's own maximum, so a constant offset between the two logits
cancels element by element. In general ``d`` may be taken against any references ``(a, b)`` per
token, ``d = (z_p - a) - (z_q - b)``, and the backward must use the same ones for its ``d`` to
round as the forward's did: the fused head, whose maxima are known only after its last block,
uses its first block's maxima, so that its blocks merge by rescaling alone. Its ``W`` is moved to
the global maxima (adding ``s_p·((a - M_p) - (b - M_q))``), summed over ranks and moved back in
float64, so each rank's ``E_p[d]`` against its own references rounds as its ``d`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import empty_grad, exp_, exp_into, row_chunks, shift_into
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.fused_head import FusedHead, fused_head_kl


def _local_kl_stats(xp, xq, shard: VocabShard, scale: float, chunk: int, ref: torch.Tensor | None = None) -> torch.Tensor:
    """``[5, tokens]`` fp32: m_p, m_q, s_p, s_q, w of each row over this shard's real columns.

    ``w = Σ e^{z_p - m_p} d`` with ``d = (z_p - a) - (z_q - b)`` for the references ``ref = (a, b)``
    ``[2, tokens]``, by default the row's maxima ``(m_p, m_q)``."""
    rows, cols = xp.shape[0], shard.valid
    out = torch.zeros(5, rows, dtype=torch.float32, device=xp.device)
    out[:2] = float("-inf")
    if rows == 0 or cols == 0:
        return out
    m_p, m_q, s_p, s_q, w = out
    bufs = torch.empty(3 if ref is None else 4, min(chunk, rows), cols, dtype=torch.float32, device=xp.device)
    for r0, r1 in row_chunks(rows, chunk):
        n = r1 - r0
        xpc, xqc = xp[r0:r1, :cols], xq[r0:r1, :cols]
        m_p[r0:r1] = torch.amax(xpc, dim=-1).float() * scale
        m_q[r0:r1] = torch.amax(xqc, dim=-1).float() * scale
        tp = shift_into(bufs[0, :n], xpc, m_p[r0:r1], scale)  # z_p - m_p
        tq = shift_into(bufs[1, :n], xqc, m_q[r0:r1], scale)  # z_q - m_q
        if ref is None:
            diff = torch.sub(tp, tq, out=bufs[2, :n])
        else:
            diff = shift_into(bufs[2, :n], xpc, ref[0, r0:r1], scale)
            diff.sub_(shift_into(bufs[3, :n], xqc, ref[1, r0:r1], scale))
        torch.sum(exp_(tp), dim=-1, out=s_p[r0:r1])
        torch.sum(exp_(tq), dim=-1, out=s_q[r0:r1])
        torch.sum(diff.mul_(tp), dim=-1, out=w[r0:r1])
    return out


def merge_kl_stats_(acc: torch.Tensor, part: torch.Tensor) -> None:
    """``acc`` ``[5, tokens]`` becomes the stats of its columns and ``part``'s, both ``_local_kl_stats``
    against the same references: the sums are rescaled to the common maxima and added."""
    big = torch.maximum(acc[:2], part[:2])  # [2, tokens]
    f_acc, f_part = (acc[:2] - big).exp(), (part[:2] - big).exp()
    acc[2:4] = acc[2:4] * f_acc + part[2:4] * f_part
    acc[4] = acc[4] * f_acc[0] + part[4] * f_part[0]
    acc[:2] = big


class KLSums(NamedTuple):
    """The reduced KL statistics of every token ``[tokens]``."""

    big: torch.Tensor
    """``[2, tokens]`` the global maxima M_p, M_q."""

    sums: torch.Tensor
    """``[2+, tokens]`` S_p, S_q (fp32)."""

    ref: torch.Tensor | None
    """``[2, tokens]`` the references ``(a, b)`` of this rank's ``d``; None: ``big``."""

    mean_d: torch.Tensor
    """E_p[d] against ``ref`` (fp32)."""

    kl: torch.Tensor
    """KL(p‖q)."""


def reduce_kl_stats(local: torch.Tensor, shard: VocabShard, group, ref: torch.Tensor | None = None) -> KLSums:
    """``KLSums`` from every rank's ``_local_kl_stats`` (``d`` against ``ref``, default the row
    maxima): one all-reduce MAX, one all-reduce SUM."""
    big = all_reduce_(local[:2].clone(), dist.ReduceOp.MAX, group)  # [2, tokens]
    m_p, m_q, s_p, s_q, w = local
    if ref is None:
        if shard.valid > 0:
            delta_p, delta_q = m_p - big[0], m_q - big[1]
            f_p, f_q = delta_p.exp(), delta_q.exp()
            parts = [s_p * f_p, s_q * f_q, (w + s_p * (delta_p - delta_q)) * f_p]
        else:
            parts = [torch.zeros_like(s_p)] * 3
        sums = all_reduce_(torch.stack(parts), dist.ReduceOp.SUM, group)  # [3, tokens]
        mean_d = sums[2] / sums[0]
        return KLSums(big, sums, None, mean_d, mean_d - sums[0].log() + sums[1].log())
    shift = ((ref[0] - big[0]) - (ref[1] - big[1])).double()  # (a - M_p) - (b - M_q)
    if shard.valid > 0:
        f_p, f_q = (m_p - big[0]).exp(), (m_q - big[1]).exp()
        parts = torch.stack([s_p * f_p, s_q * f_q]).double()
        moved = (w.double() + s_p.double() * shift) * f_p.double()  # W against the global maxima
        packed = torch.cat([parts, moved.unsqueeze(0)])
    else:
        packed = torch.zeros(3, s_p.shape[0], dtype=torch.float64, device=s_p.device)
    packed = all_reduce_(packed, dist.ReduceOp.SUM, group)  # [3, tokens] float64
    mean_global = packed[2] / packed[0]
    kl = mean_global - packed[0].log() + packed[1].log()
    return KLSums(big, packed[:2].float(), ref, (mean_global - shift).float(), kl.float())


def kl_grad_chunk(xp, xq, shard: VocabShard, scale: float, big, ref, inv_sp, inv_sq, mean_d, g, grad_p, grad_q,
                  bufs: torch.Tensor) -> None:
    """Write ``g·∂KL/∂x_p`` into ``grad_p`` and ``g·∂KL/∂x_q`` into ``grad_q`` (either may be None) for
    one chunk of rows ``[c, V/tp]``; ``big`` ``[2, c]`` holds M_p, M_q, ``ref`` ``d``'s references
    (None: ``big``), ``g`` ``[c, 1]`` carries ``scale``, ``bufs`` is fp32 work space of at least
    ``[4, c, valid]``."""
    rows, cols = xp.shape[0], shard.valid
    tp = shift_into(bufs[0, :rows], xp[:, :cols], big[0], scale)  # z_p - M_p
    tq = shift_into(bufs[1, :rows], xq[:, :cols], big[1], scale)  # z_q - M_q
    p = exp_into(bufs[2, :rows], tp).mul_(inv_sp)
    if grad_q is not None:
        q = exp_into(bufs[3, :rows], tq).mul_(inv_sq)
        grad_q[:, :cols] = q.sub_(p).mul_(g)
    if grad_p is not None:
        if ref is not None:  # d against the forward's references
            tp = shift_into(tp, xp[:, :cols], ref[0], scale)
            tq = shift_into(tq, xq[:, :cols], ref[1], scale)
        d = tp.sub_(tq).sub_(mean_d.unsqueeze(-1))
        grad_p[:, :cols] = p.mul_(d).mul_(g)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_p, logits_q, group, shard: VocabShard, scale: float, chunk: int):
        xp = logits_p.reshape(-1, shard.local_size)  # [tokens, V/tp]
        xq = logits_q.reshape(-1, shard.local_size)
        reduced = reduce_kl_stats(_local_kl_stats(xp, xq, shard, scale, chunk), shard, group)
        ctx.shard, ctx.scale, ctx.chunk = shard, scale, chunk
        ctx.save_for_backward(logits_p, logits_q, reduced.big, reduced.sums, reduced.mean_d)
        return reduced.kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logits_p, logits_q, big, sums, mean_d = ctx.saved_tensors
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
            bufs = torch.empty(4, min(ctx.chunk, rows), cols, dtype=torch.float32, device=xp.device)
            for r0, r1 in row_chunks(rows, ctx.chunk):
                kl_grad_chunk(xp[r0:r1], xq[r0:r1], shard, scale, big[:, r0:r1], None, inv_sp[r0:r1], inv_sq[r0:r1],
                              mean_d[r0:r1], g[r0:r1],
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
