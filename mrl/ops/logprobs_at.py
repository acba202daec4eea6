"""log p of several given token ids per row, from vocab-parallel logits shards (top-k distillation).

For each token row and ids ``y_1..y_k`` (global vocabulary ids, e.g. a teacher's top-k), with
``z = x / temperature`` in fp32:

    log p(y_i) = z_{y_i} - M - log S        (M = max z, S = Σ_v e^{z_v - M}, over the whole vocabulary)

Forward: the shard's max and Σe per chunk (``local_stats``), the logits at the ids this shard holds
(0 elsewhere); one all-reduce MAX of the maxima and one packed all-reduce SUM of the rescaled sums
and the ``k`` picked logits. Backward, without communication, into ONE gradient buffer:

    ∂/∂z_j = Σ_i g_i·1[j = y_i] - p_j·Σ_i g_i

(``softmax_grad`` with α = -Σ_i g_i, then the k label terms added where this shard holds them).
The logits are never gathered: a row's k picked logits are all that crosses ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import local_stats, softmax_grad
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.fused_head import FusedHead


class _VocabParallelLogprobsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, group, shard: VocabShard, scale: float, chunk: int):
        x = logits.reshape(-1, shard.local_size)  # [tokens, V/tp]
        k = ids.shape[-1]
        ids = ids.reshape(-1, k)  # [tokens, k]
        stats = local_stats(x, shard, scale, chunk, with_u=False, with_sum_z=False)
        big_m = all_reduce_(stats.max.clone(), dist.ReduceOp.MAX, group)  # [tokens] M
        local = ids - shard.start
        owned = (local >= 0) & (local < shard.valid)  # [tokens, k]
        col = torch.where(owned, local, 0)
        picked = torch.where(owned, x.gather(1, col).float() * scale, 0.0)  # [tokens, k] z at owned ids
        rescale = (stats.max - big_m).exp() if shard.valid > 0 else torch.zeros_like(big_m)
        packed = torch.cat([(stats.sumexp * rescale).unsqueeze(0), picked.t()])  # [1 + k, tokens]
        packed = all_reduce_(packed, dist.ReduceOp.SUM, group)
        big_s = packed[0]  # [tokens] S
        logp = packed[1:].t() - (big_m + big_s.log()).unsqueeze(-1)  # [tokens, k]
        ctx.shard, ctx.scale, ctx.chunk = shard, scale, chunk
        ctx.save_for_backward(logits, big_m, big_s, col, owned)
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        logits, big_m, big_s, col, owned = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        shard, scale = ctx.shard, ctx.scale
        g = grad_logp.float() * scale  # [tokens, k]
        x = logits.reshape(-1, shard.local_size)
        grad = softmax_grad(x, shard, scale, ctx.chunk, shift=big_m, norm=big_s, alpha=-g.sum(-1))
        if shard.valid > 0:
            grad.scatter_add_(1, col, torch.where(owned, g, 0.0).to(grad.dtype))
        return grad.view(logits.shape), None, None, None, None, None


def vocab_parallel_logprobs_at(
    logits: torch.Tensor,
    ids: torch.Tensor,
    group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``ids`` ``[..., k]`` fp32, over the full vocabulary.

    ``logits`` is this rank's shard ``[..., V/tp]``; ``ids`` are global vocabulary ids
    ``[..., k]`` in ``[0, vocab_size)`` (the same on every TP rank). Differentiable in ``logits``.
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
    scale = check_temperature(temperature)
    chunk = chunk_rows(chunk_size, logits, shard.valid)
    logp = _VocabParallelLogprobsAt.apply(logits, ids.long(), group, shard, scale, chunk)
    return logp.view(ids.shape)
