"""The fused vocab-parallel LM head: per-token softmax quantities straight from hidden states.

``FusedHead(hidden [B, S, H], weight [V/tp, H])`` stands where the logits shard
``x = hidden · weightᵀ`` ``[B, S, V/tp]`` would, and the ops of ``mrl.ops`` accept it in place of
logits (``vocab_parallel_softmax_stats`` and the functions built on it, ``vocab_parallel_kl``).
The logits are never materialised beyond one chunk of tokens:

* forward, per chunk of ``c`` tokens: ``x_c = h_c · Wᵀ`` (one GEMM, fp32 when ``fp32``), the
  shard's statistics of ``x_c`` (max, Σe, Σe·z, Σz, the label logit) into ``[tokens]`` vectors;
  then the same two collectives as the unfused op for all chunks together (one MAX, one packed SUM);
* backward, per chunk, without communication: recompute ``x_c``, form ``∂/∂x_c`` exactly as the
  unfused op does, then ``∂h_c = ∂x_c · W`` and ``∂W += ∂x_cᵀ · h_c``.

Peak extra memory is a few ``[c, V/tp]`` chunk buffers plus an fp32 ``∂W`` accumulator (none when
Megatron's gradient-accumulation fusion lets ``∂W`` go straight into ``weight.main_grad``), instead
of 3-4 buffers of ``[tokens, V/tp]``. Time: one extra GEMM (the recompute) over the unfused path's three.

``hidden`` here is already the full sequence replicated over the TP group (after the sequence-
parallel all-gather); the model wraps it so that ``∂h`` is all-reduced (or reduce-scattered under
sequence parallelism) across TP ranks, as ``ColumnParallelLinear`` does for its input.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import LocalStats, local_stats, row_chunks, softmax_grad
from mrl.ops._shard import VocabShard, check_labels, chunk_rows, label_logits

# Bytes of one chunk of fp32 logits when ``chunk_size`` is not given: large enough for efficient
# GEMMs, small against a [tokens, V/tp] buffer.
_HEAD_CHUNK_BYTES_CPU = 1 << 26
_HEAD_CHUNK_BYTES_CUDA = 1 << 28


class FusedHead:
    """Hidden states and the vocab-sharded output weight whose product is the logits shard."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, fp32: bool = True,
                 accumulate_main_grad: bool = False) -> None:
        if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"FusedHead needs hidden [..., H] and weight [V/tp, H], got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        self.hidden = hidden  # [B, S, H]
        self.weight = weight  # [V/tp, H]
        self.fp32 = fp32
        self.accumulate_main_grad = accumulate_main_grad

    # The parts of the tensor interface the losses read ------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def dim(self) -> int:
        return self.hidden.dim()

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.fp32 else self.hidden.dtype

    def is_floating_point(self) -> bool:
        return True

    def logits(self) -> torch.Tensor:
        """The logits shard ``[..., V/tp]``, materialised (small inputs only: e.g. last tokens)."""
        h, w = (self.hidden.float(), self.weight.float()) if self.fp32 else (self.hidden, self.weight)
        return h @ w.t()

    def detach(self) -> "FusedHead":
        """The same head without autograd history (``Tensor.detach``'s counterpart)."""
        return FusedHead(self.hidden.detach(), self.weight.detach(), fp32=self.fp32)

    def detached(self) -> "FusedHead":
        """A copy of the hidden states with no autograd history (a frozen reference's head, kept in a
        batch): the weight is shared, not copied."""
        return FusedHead(self.hidden.detach().clone(), self.weight.detach(), fp32=self.fp32)

    def chunk_logits(self, rows: slice) -> torch.Tensor:
        """``x`` of the flattened tokens ``rows``: ``[c, V/tp]`` (fp32 when ``fp32``)."""
        h = self.hidden.reshape(-1, self.hidden.shape[-1])[rows]
        if self.fp32:
            return h.float() @ self._weight32().t()
        return h @ self.weight.t()

    def _weight32(self) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return self.weight
        if getattr(self, "_w32", None) is None:
            self._w32 = self.weight.detach().float()  # one fp32 copy per use of the head
        return self._w32


def head_chunk_rows(chunk_size: int | None, head: FusedHead) -> int:
    """Tokens per chunk of the fused head: ``chunk_size`` or a GEMM-friendly default."""
    if chunk_size is not None:
        return int(chunk_size)
    budget = _HEAD_CHUNK_BYTES_CUDA if head.device.type == "cuda" else _HEAD_CHUNK_BYTES_CPU
    return max(16, budget // (4 * head.weight.shape[0]))


def head_local_stats(head: FusedHead, shard: VocabShard, scale: float, chunk: int, *, with_u: bool,
                     with_sum_z: bool, labels: torch.Tensor | None, ignore_index: int):
    """``LocalStats`` of every token and the label logits, one chunk of logits at a time."""
    tokens = head.hidden.numel() // head.hidden.shape[-1]
    f32 = dict(dtype=torch.float32, device=head.device)
    m = torch.full((tokens,), float("-inf"), **f32)
    s = torch.zeros(tokens, **f32)
    u = torch.zeros(tokens, **f32) if with_u else None
    sum_z = torch.zeros(tokens, **f32) if with_sum_z else None
    label_z = col = owned = None
    if labels is not None:
        col, owned = shard.localize(labels, ignore_index)
        label_z = torch.zeros(tokens, **f32)
    for r0, r1 in row_chunks(tokens, chunk):
        x = head.chunk_logits(slice(r0, r1))  # [c, V/tp]
        part = local_stats(x, shard, scale, chunk_rows(None, x, shard.valid), with_u=with_u, with_sum_z=with_sum_z)
        m[r0:r1], s[r0:r1] = part.max, part.sumexp
        if u is not None:
            u[r0:r1] = part.sumexp_z
        if sum_z is not None:
            sum_z[r0:r1] = part.sum_z
        if labels is not None:
            label_z[r0:r1] = label_logits(x, col[r0:r1], owned[r0:r1], scale)
        del x
    return LocalStats(m, s, u, sum_z), label_z, col, owned


class HeadGrads:
    """Accumulates ``∂h`` and ``∂W`` of a fused head from chunks of ``∂x``."""

    def __init__(self, head: FusedHead, need_hidden: bool, need_weight: bool) -> None:
        self.head = head
        h = head.hidden
        tokens, width = h.numel() // h.shape[-1], h.shape[-1]
        self.grad_h = torch.zeros((tokens, width), dtype=torch.float32, device=h.device) if need_hidden else None
        self.grad_w = None
        self.into_main_grad = need_weight and head.accumulate_main_grad and getattr(head.weight, "main_grad", None) is not None
        if need_weight and not self.into_main_grad:
            self.grad_w = torch.zeros(head.weight.shape, dtype=torch.float32, device=h.device)

    def add(self, rows: slice, grad_x: torch.Tensor) -> None:
        """Fold ``∂x`` of the tokens ``rows`` ``[c, V/tp]`` into ``∂h`` and ``∂W``."""
        head = self.head
        h = head.hidden.reshape(-1, head.hidden.shape[-1])[rows]  # [c, H]
        if head.fp32:
            w, h, g = head._weight32(), h.float(), grad_x.float()
        else:
            w, g = head.weight, grad_x.to(head.weight.dtype)
        if self.grad_h is not None:
            self.grad_h[rows] += (g @ w).float()
        if self.into_main_grad:
            head.weight.main_grad.add_((g.t() @ h).to(head.weight.main_grad.dtype))
        elif self.grad_w is not None:
            if g.dtype == torch.float32:
                self.grad_w.addmm_(g.t(), h)
            else:
                self.grad_w += (g.t() @ h).float()

    def result(self):
        """``(∂hidden, ∂weight)`` in the inputs' dtypes (``∂weight`` zeros when it went to main_grad)."""
        head = self.head
        grad_h = None if self.grad_h is None else self.grad_h.view(head.hidden.shape).to(head.hidden.dtype)
        grad_w = None if self.grad_w is None else self.grad_w.to(head.weight.dtype)
        if self.into_main_grad:
            head.weight.grad_added_to_main_grad = True  # Megatron DDP's convention
            grad_w = torch.zeros_like(head.weight)
        return grad_h, grad_w


class _FusedHeadStats(torch.autograd.Function):
    """``vocab_parallel_softmax_stats`` of ``hidden · weightᵀ`` (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, shard: VocabShard, scale: float, chunk: int,
                ignore_index: int, want, fp32: bool, main_grad: bool):
        from mrl.ops.vocab_parallel import finish_stats, reduce_stats

        head = FusedHead(hidden, weight, fp32=fp32, accumulate_main_grad=main_grad)
        _, want_entropy, _, want_smooth = want
        flat_labels = None if labels is None else labels.reshape(-1)
        stats, label_z, col, owned = head_local_stats(head, shard, scale, chunk, with_u=want_entropy,
                                                      with_sum_z=want_smooth, labels=flat_labels,
                                                      ignore_index=ignore_index)
        big_m, packed = reduce_stats(stats, shard, group, label_z)
        kept = None if flat_labels is None else flat_labels != ignore_index
        outputs, mean_z = finish_stats(big_m, packed, kept, want, shard.vocab_size)
        ctx.set_materialize_grads(False)
        ctx.shard, ctx.scale, ctx.chunk, ctx.fp32, ctx.main_grad = shard, scale, chunk, fp32, main_grad
        ctx.save_for_backward(hidden, weight, big_m, packed[0], mean_z, col, owned, kept)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_lse, g_smooth):
        from mrl.ops.vocab_parallel import grad_coefficients

        hidden, weight, big_m, big_s, mean_z, col, owned, kept = ctx.saved_tensors
        grads = (g_logp, g_entropy, g_lse, g_smooth)
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w) or all(g is None for g in grads):
            return (None,) * 11
        shard, scale = ctx.shard, ctx.scale
        alpha, beta, label_coef, const = grad_coefficients(grads, kept, owned, mean_z, scale, shard.vocab_size, big_m)
        head = FusedHead(hidden, weight, fp32=ctx.fp32, accumulate_main_grad=ctx.main_grad)
        out = HeadGrads(head, need_h, need_w)
        for r0, r1 in row_chunks(big_m.shape[0], ctx.chunk):
            rows = slice(r0, r1)
            x = head.chunk_logits(rows)  # [c, V/tp], recomputed
            grad_x = softmax_grad(
                x, shard, scale, r1 - r0, shift=big_m[rows], norm=big_s[rows], alpha=alpha[rows],
                beta=None if beta is None else beta[rows],
                label_col=None if col is None else col[rows],
                label_coef=None if label_coef is None else label_coef[rows],
                const=None if const is None else const[rows],
            )
            del x
            out.add(rows, grad_x)
        grad_h, grad_w = out.result()
        return (grad_h, grad_w) + (None,) * 9


def fused_head_stats(head: FusedHead, labels, group, want, *, ignore_index: int, scale: float,
                     vocab_size: int | None, chunk_size: int | None):
    """The outputs of ``vocab_parallel_softmax_stats`` for a fused head (flattened ``[tokens]``)."""
    shard = VocabShard.of(head, group, vocab_size)
    if labels is not None:
        check_labels(labels, head, shard, ignore_index)
    chunk = head_chunk_rows(chunk_size, head)
    return _FusedHeadStats.apply(head.hidden, head.weight, labels, group, shard, scale, chunk, ignore_index,
                                 want, head.fp32, head.accumulate_main_grad)


class _FusedHeadKL(torch.autograd.Function):
    """``vocab_parallel_kl`` of two fused heads: KL(softmax(h_p·W_pᵀ/T) ‖ softmax(h_q·W_qᵀ/T))."""

    @staticmethod
    def forward(ctx, hidden_p, weight_p, hidden_q, weight_q, group, shard: VocabShard, scale: float,
                chunk: int, fp32: bool):
        from mrl.ops.kl import _local_kl_stats, kl_from_sums, reduce_kl_stats

        head_p, head_q = FusedHead(hidden_p, weight_p, fp32=fp32), FusedHead(hidden_q, weight_q, fp32=fp32)
        tokens = hidden_p.numel() // hidden_p.shape[-1]
        local = torch.zeros(5, tokens, dtype=torch.float32, device=hidden_p.device)  # m_p, m_q, s_p, s_q, w
        local[:2] = float("-inf")
        for r0, r1 in row_chunks(tokens, chunk):
            xp, xq = head_p.chunk_logits(slice(r0, r1)), head_q.chunk_logits(slice(r0, r1))  # [c, V/tp]
            local[:, r0:r1] = _local_kl_stats(xp, xq, shard, scale, chunk_rows(None, xp, shard.valid))
            del xp, xq
        big, sums, mean_d = reduce_kl_stats(local, shard, group)
        ctx.shard, ctx.scale, ctx.chunk, ctx.fp32 = shard, scale, chunk, fp32
        ctx.save_for_backward(hidden_p, weight_p, hidden_q, weight_q, big, sums, mean_d)
        return kl_from_sums(sums, mean_d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        from mrl.ops.kl import kl_grad_chunk

        hidden_p, weight_p, hidden_q, weight_q, big, sums, mean_d = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return (None,) * 9
        shard, scale = ctx.shard, ctx.scale
        head_p = FusedHead(hidden_p, weight_p, fp32=ctx.fp32)
        head_q = FusedHead(hidden_q, weight_q, fp32=ctx.fp32)
        out_p = HeadGrads(head_p, needs[0], needs[1]) if needs[0] or needs[1] else None
        out_q = HeadGrads(head_q, needs[2], needs[3]) if needs[2] or needs[3] else None
        g = grad_kl.reshape(-1, 1).float() * scale  # [tokens, 1]
        inv_sp, inv_sq = sums[:2].reciprocal().unsqueeze(-1)  # [tokens, 1]
        tokens, cols = big.shape[1], shard.valid
        width = min(ctx.chunk, tokens)
        bufs = torch.empty(4, width, cols, dtype=torch.float32, device=hidden_p.device)
        grad_p = torch.zeros(width, shard.local_size, dtype=torch.float32, device=hidden_p.device) if out_p else None
        grad_q = torch.zeros(width, shard.local_size, dtype=torch.float32, device=hidden_p.device) if out_q else None
        for r0, r1 in row_chunks(tokens, ctx.chunk):
            rows, n = slice(r0, r1), r1 - r0
            xp, xq = head_p.chunk_logits(rows), head_q.chunk_logits(rows)  # recomputed [c, V/tp]
            kl_grad_chunk(xp, xq, shard, scale, big[:, rows], inv_sp[rows], inv_sq[rows], mean_d[rows], g[rows],
                          None if grad_p is None else grad_p[:n], None if grad_q is None else grad_q[:n], bufs)
            del xp, xq
            if out_p is not None:
                out_p.add(rows, grad_p[:n])
            if out_q is not None:
                out_q.add(rows, grad_q[:n])
        grads_p = out_p.result() if out_p else (None, None)
        grads_q = out_q.result() if out_q else (None, None)
        return grads_p + grads_q + (None,) * 5


def fused_head_kl(head_p: FusedHead, head_q: FusedHead, group, *, scale: float, vocab_size: int | None,
                  chunk_size: int | None) -> torch.Tensor:
    """``vocab_parallel_kl`` for two fused heads (flattened ``[tokens]``)."""
    if head_p.shape != head_q.shape:
        raise ValueError(f"the two heads must give logits of one shape, got {tuple(head_p.shape)} and "
                         f"{tuple(head_q.shape)}")
    shard = VocabShard.of(head_p, group, vocab_size)
    chunk = head_chunk_rows(chunk_size, head_p)
    return _FusedHeadKL.apply(head_p.hidden, head_p.weight, head_q.hidden, head_q.weight, group, shard, scale,
                              chunk, head_p.fp32)
