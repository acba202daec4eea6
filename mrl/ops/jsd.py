"""The generalised Jensen-Shannon divergence of GKD per token, from two vocab-parallel logits shards.

GKD (Agarwal et al. 2024) and TRL's ``generalized_jsd_loss``, with p = softmax(z_p) the teacher,
q = softmax(z_q) the student (``z = x / temperature``) and 0 < β < 1:

    M = β·p + (1 − β)·q
    JSD_β(p‖q) = β·KL(p‖M) + (1 − β)·KL(q‖M)

Small β weights the teacher's side; JSD_β → 0 at both ends, so β = 0 and β = 1 are defined (as in
TRL) as the two KLs: β = 0 → KL(p‖q) (forward), β = 1 → KL(q‖p) (reverse); ``vocab_parallel_jsd``
dispatches those to ``vocab_parallel_kl``.

Forward, exact over the full vocabulary: pass 1 per chunk, each shard's maxima and Σe of both
logits; one all-reduce MAX and one all-reduce SUM give the global ``M_p, S_p, M_q, S_q``. Pass 2 per
chunk, ``log p = z_p − M_p − log S_p``, ``log q`` likewise, ``log m = logaddexp(log β + log p,
log(1−β) + log q)`` and the shard's ``Σ p(log p − log m)``, ``Σ q(log q − log m)``; one all-reduce
SUM gives KL(p‖M) and KL(q‖M). Backward, without communication (recomputing the chunk):

    ∂JSD/∂z_p = β·p ⊙ (log p − log m − KL(p‖M))       ∂JSD/∂z_q = (1 − β)·q ⊙ (log q − log m − KL(q‖M))
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import empty_grad, local_stats, row_chunks
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.fused_head import FusedHead
from mrl.ops.kl import vocab_parallel_kl


def _normalizers(xp, xq, shard: VocabShard, scale: float, chunk: int, group) -> torch.Tensor:
    """``[2, 2, tokens]``: (M_p, M_q) and (log S_p, log S_q), the global max and log Σ e^{z − M}."""
    stats = [local_stats(x, shard, scale, chunk, with_u=False, with_sum_z=False) for x in (xp, xq)]
    local_m = torch.stack([s.max for s in stats])  # [2, tokens]
    big_m = all_reduce_(local_m.clone(), dist.ReduceOp.MAX, group)
    if shard.valid > 0:
        sums = torch.stack([s.sumexp for s in stats]) * (local_m - big_m).exp()
    else:
        sums = torch.zeros_like(big_m)
    log_s = all_reduce_(sums, dist.ReduceOp.SUM, group).log()
    return torch.stack([big_m, log_s])


def _log_probs_chunk(x, shift: torch.Tensor, scale: float, cols: int, out: torch.Tensor) -> torch.Tensor:
    """``out = scale·x[:, :cols] − shift[:, None]`` (fp32): log-probs of a chunk when shift = M + log S."""
    return torch.add(shift.neg().unsqueeze(-1), x[:, :cols], alpha=scale, out=out)


def _mixture_chunk(lp, lq, log_beta: float, log_1mbeta: float, out: torch.Tensor) -> torch.Tensor:
    """``out = log(β·p + (1 − β)·q)`` from the chunk's log-probs."""
    return torch.logaddexp(lp + log_beta, lq + log_1mbeta, out=out)


class _VocabParallelJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_p, logits_q, group, shard: VocabShard, scale: float, chunk: int, beta: float):
        xp = logits_p.reshape(-1, shard.local_size)  # [tokens, V/tp]
        xq = logits_q.reshape(-1, shard.local_size)
        rows, cols = xp.shape[0], shard.valid
        norms = _normalizers(xp, xq, shard, scale, chunk, group)  # [2, 2, tokens]
        shift = norms[0] + norms[1]  # [2, tokens] M + log S
        log_beta, log_1mbeta = math.log(beta), math.log1p(-beta)
        local = torch.zeros(2, rows, dtype=torch.float32, device=xp.device)  # Σ p(lp − lm), Σ q(lq − lm)
        if rows and cols:
            bufs = torch.empty(4, min(chunk, rows), cols, dtype=torch.float32, device=xp.device)
            for r0, r1 in row_chunks(rows, chunk):
                n = r1 - r0
                lp = _log_probs_chunk(xp[r0:r1], shift[0, r0:r1], scale, cols, bufs[0, :n])
                lq = _log_probs_chunk(xq[r0:r1], shift[1, r0:r1], scale, cols, bufs[1, :n])
                lm = _mixture_chunk(lp, lq, log_beta, log_1mbeta, bufs[2, :n])
                work = bufs[3, :n]
                torch.sum(torch.sub(lp, lm, out=work).mul_(lp.exp()), dim=-1, out=local[0, r0:r1])
                torch.sum(torch.sub(lq, lm, out=work).mul_(lq.exp()), dim=-1, out=local[1, r0:r1])
        kls = all_reduce_(local, dist.ReduceOp.SUM, group)  # [2, tokens] KL(p‖M), KL(q‖M)
        ctx.shard, ctx.scale, ctx.chunk, ctx.beta = shard, scale, chunk, beta
        ctx.save_for_backward(logits_p, logits_q, shift, kls)
        return beta * kls[0] + (1.0 - beta) * kls[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_jsd):
        logits_p, logits_q, shift, kls = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        shard, scale, beta = ctx.shard, ctx.scale, ctx.beta
        xp = logits_p.reshape(-1, shard.local_size)
        xq = logits_q.reshape(-1, shard.local_size)
        rows, cols = xp.shape[0], shard.valid
        g = grad_jsd.reshape(-1, 1).float() * scale  # [tokens, 1]
        grad_p = empty_grad(xp, shard) if need_p else None
        grad_q = empty_grad(xq, shard) if need_q else None
        log_beta, log_1mbeta = math.log(beta), math.log1p(-beta)
        if rows and cols and (need_p or need_q):
            bufs = torch.empty(4, min(ctx.chunk, rows), cols, dtype=torch.float32, device=xp.device)
            for r0, r1 in row_chunks(rows, ctx.chunk):
                n = r1 - r0
                lp = _log_probs_chunk(xp[r0:r1], shift[0, r0:r1], scale, cols, bufs[0, :n])
                lq = _log_probs_chunk(xq[r0:r1], shift[1, r0:r1], scale, cols, bufs[1, :n])
                lm = _mixture_chunk(lp, lq, log_beta, log_1mbeta, bufs[2, :n])
                for grad, lx, kl, weight in ((grad_p, lp, kls[0], beta), (grad_q, lq, kls[1], 1.0 - beta)):
                    if grad is None:
                        continue
                    work = torch.sub(lx, lm, out=bufs[3, :n]).sub_(kl[r0:r1].unsqueeze(-1))
                    work.mul_(lx.exp()).mul_(g[r0:r1] * weight)
                    grad[r0:r1, :cols] = work
        return (
            None if grad_p is None else grad_p.view(logits_p.shape),
            None if grad_q is None else grad_q.view(logits_q.shape),
            None, None, None, None, None,
        )


def vocab_parallel_jsd(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    group=None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """JSD_β(p‖q) ``[...]`` fp32 of ``p = softmax(logits_p/T)`` (teacher) and ``q = softmax(logits_q/T)``
    (student) over the full vocabulary (module docstring); β = 0 and β = 1 give KL(p‖q) and KL(q‖p).

    Both are this rank's vocabulary shards ``[..., V/tp]`` of one shape; differentiable in both
    (pass ``logits_p.detach()`` for a fixed teacher).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta in (0.0, 1.0):
        return vocab_parallel_jsd_endpoint(logits_p, logits_q, group, beta, temperature, vocab_size, chunk_size)
    if isinstance(logits_p, FusedHead) or isinstance(logits_q, FusedHead):
        raise ValueError("the generalised JSD needs logits tensors; a fused head (model.fused_head) is "
                         "supported only at beta 0 or 1 (the KLs)")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p and logits_q must have the same shape, got {tuple(logits_p.shape)} and "
                         f"{tuple(logits_q.shape)}")
    shard = VocabShard.of(logits_p, group, vocab_size)
    if not logits_q.is_floating_point():
        raise ValueError(f"logits_q must be a floating-point tensor, got {logits_q.dtype}")
    scale = check_temperature(temperature)
    chunk = chunk_rows(chunk_size, logits_p, shard.valid)
    jsd = _VocabParallelJSD.apply(logits_p, logits_q, group, shard, scale, chunk, float(beta))
    return jsd.view(logits_p.shape[:-1])


def vocab_parallel_jsd_endpoint(logits_p, logits_q, group, beta: float, temperature: float,
                                vocab_size: int | None, chunk_size: int | None) -> torch.Tensor:
    """β = 0: KL(p‖q); β = 1: KL(q‖p) (TRL's convention for the ends of JSD_β)."""
    first, second = (logits_p, logits_q) if beta == 0.0 else (logits_q, logits_p)
    return vocab_parallel_kl(first, second, group, temperature=temperature, vocab_size=vocab_size,
                             chunk_size=chunk_size)
