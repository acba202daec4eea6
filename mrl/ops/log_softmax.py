"""The local shard of the full log-softmax, for distillation against per-token distributions.

``log p_v = z_v - M - log S`` on this rank's columns (``z = x / temperature``), with ``M`` and
``S`` from the same two all-reduces as the other ops. The backward of log-softmax needs the sum of
the upstream gradient over the whole vocabulary, ``∂/∂z_j = g_j - p_j Σ_v g_v``, so it costs one
all-reduce SUM of one number per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import empty_grad, exp_into, local_stats, row_chunks, shift_into
from mrl.ops._shard import VocabShard, check_temperature, chunk_rows
from mrl.ops.comm import all_reduce_
from mrl.ops.vocab_parallel import reduce_stats


class _VocabParallelLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, group, shard: VocabShard, scale: float, chunk: int):
        x = logits.reshape(-1, shard.local_size)  # [tokens, V/tp]
        stats = local_stats(x, shard, scale, chunk, with_u=False, with_sum_z=False)
        big_m, packed = reduce_stats(stats, shard, group)
        log_s = packed[0].log().unsqueeze(-1)  # [tokens, 1]
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # [tokens, V/tp]
        cols = shard.valid
        out[:, cols:] = float("-inf")
        for r0, r1 in row_chunks(x.shape[0], chunk):
            shift_into(out[r0:r1, :cols], x[r0:r1, :cols], big_m[r0:r1], scale).sub_(log_s[r0:r1])
        ctx.group, ctx.shard, ctx.scale, ctx.chunk = group, shard, scale, chunk
        ctx.input_dtype, ctx.input_shape = logits.dtype, logits.shape
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        shard, cols = ctx.shard, ctx.shard.valid
        g = grad_out.float()  # [tokens, V/tp]
        g_sum = all_reduce_(g[:, :cols].sum(dim=-1), dist.ReduceOp.SUM, ctx.group)  # [tokens]
        grad = empty_grad(out, shard, dtype=ctx.input_dtype)  # [tokens, V/tp]
        if cols:
            buf = torch.empty(min(ctx.chunk, out.shape[0]), cols, dtype=torch.float32, device=out.device)
            for r0, r1 in row_chunks(out.shape[0], ctx.chunk):
                p_sum = exp_into(buf[: r1 - r0], out[r0:r1, :cols]).mul_(g_sum[r0:r1].unsqueeze(-1))
                grad[r0:r1, :cols] = torch.sub(g[r0:r1, :cols], p_sum, out=p_sum).mul_(ctx.scale)
        return grad.view(ctx.input_shape), None, None, None, None


def vocab_parallel_log_softmax(
    logits: torch.Tensor,
    group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """This rank's shard ``[..., V/tp]`` fp32 of log softmax(logits / temperature) over the full vocabulary.

    Padded columns (global id >= vocab_size) hold -inf and get no gradient. Differentiable; its
    backward all-reduces one number per token.
    """
    shard = VocabShard.of(logits, group, vocab_size)
    scale = check_temperature(temperature)
    chunk = chunk_rows(chunk_size, logits, shard.valid)
    return _VocabParallelLogSoftmax.apply(logits, group, shard, scale, chunk).view(logits.shape)
