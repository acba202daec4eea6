"""The fused vocab-parallel LM head: per-token softmax quantities straight from hidden states.

``FusedHead(hidden [B, S, H], weight [V/tp, H])`` stands where the logits shard
``x = hidden · weightᵀ`` ``[B, S, V/tp]`` would, and the ops of ``mrl.ops`` accept it in place of
logits (``vocab_parallel_softmax_stats`` and the functions built on it, ``vocab_parallel_kl``).
The logits are never materialised beyond one tile of ``r`` tokens × ``b`` vocabulary columns:

* forward, per tile: ``x = h_r · W_bᵀ`` (one GEMM, fp32 when ``fp32``), the block's statistics of
  ``x`` (max, Σe, Σe·z, Σz, the label logit), merged into the shard's ``[tokens]`` statistics by
  rebasing both to their common max; then the same two collectives as the unfused op for all
  tokens together (one MAX, one packed SUM);
* backward, per tile, without communication: recompute ``x``, form ``∂/∂x`` exactly as the unfused
  op does, then ``∂h_r += ∂x · W_b`` and ``∂W_b += ∂xᵀ · h_r``.

Tiles over the vocabulary as well as the tokens keep every GEMM's three dimensions large (a tile of
all ``V/tp`` columns holds only a few hundred tokens, and its ``∂W`` update streams the whole
``[V/tp, H]`` accumulator per tile); columns beyond the real vocabulary are never computed.
Peak extra memory is a tile and an fp32 ``∂h`` ``[tokens, H]``, plus an fp32 ``∂W`` accumulator
(none when Megatron's gradient-accumulation fusion lets ``∂W`` go straight into
``weight.main_grad``), instead of 3-4 buffers of ``[tokens, V/tp]``. Time: one extra GEMM (the
recompute) over the unfused path's three.

``hidden`` here is already the full sequence replicated over the TP group (after the sequence-
parallel all-gather); the model wraps it so that ``∂h`` is all-reduced (or reduce-scattered under
sequence parallelism) across TP ranks, as ``ColumnParallelLinear`` does for its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import LocalStats, local_stats, rebase_stats, row_chunks, softmax_grad
from mrl.ops._shard import VocabShard, check_labels, chunk_rows, label_logits

# Tile shape when ``chunk_size`` is not given. CPU: 2048 columns (GEMMs of [r, H] x [H, 2048] run
# near the core's peak) and 32 MiB of fp32 logits (4096 tokens); CUDA: larger tiles, still small
# against a [tokens, V/tp] buffer.
_TILE_COLS_CPU = 2048
_TILE_COLS_CUDA = 8192
_TILE_BYTES_CPU = 1 << 25
_TILE_BYTES_CUDA = 1 << 28


class FusedHead:
    """Hidden states and the vocab-sharded output weight whose product is the logits shard."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, fp32: bool = True,
                 accumulate_main_grad: bool = False, tile_cols: int | None = None) -> None:
        if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"FusedHead needs hidden [..., H] and weight [V/tp, H], got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        if tile_cols is not None and tile_cols < 1:
            raise ValueError(f"tile_cols must be a positive number of vocabulary columns or None, got {tile_cols}")
        self.hidden = hidden  # [B, S, H]
        self.weight = weight  # [V/tp, H]
        self.fp32 = fp32
        self.accumulate_main_grad = accumulate_main_grad
        self.tile_cols = tile_cols  # vocabulary columns per tile (None: the device's default)

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
        return FusedHead(self.hidden.detach(), self.weight.detach(), fp32=self.fp32, tile_cols=self.tile_cols)

    def detached(self) -> "FusedHead":
        """A copy of the hidden states with no autograd history (a frozen reference's head, kept in a
        batch): the weight is shared, not copied."""
        return FusedHead(self.hidden.detach().clone(), self.weight.detach(), fp32=self.fp32,
                         tile_cols=self.tile_cols)

    # Tiles ----------------------------------------------------------------------------------------

    def token_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Hidden states of the flattened tokens ``[r0, r1)`` in the GEMM dtype ``[r, H]``."""
        h = self.hidden.reshape(-1, self.hidden.shape[-1])[r0:r1]
        return h.float() if self.fp32 else h

    def weight_rows(self, c0: int, c1: int) -> torch.Tensor:
        """Output-weight rows of the shard's columns ``[c0, c1)`` in the GEMM dtype ``[b, H]``."""
        w = self.weight[c0:c1]
        return w.float() if self.fp32 else w


@dataclass(frozen=True)
class Tiles:
    """How the fused head walks its logits: ``rows`` tokens × ``cols`` vocabulary columns at a time."""

    rows: int
    cols: int

    @classmethod
    def of(cls, head: FusedHead, chunk_size: int | None) -> "Tiles":
        """``chunk_size`` tokens and ``head.tile_cols`` columns per tile, or GEMM-friendly defaults."""
        cuda = head.device.type == "cuda"
        cols = min(head.tile_cols or (_TILE_COLS_CUDA if cuda else _TILE_COLS_CPU), head.weight.shape[0])
        if chunk_size is not None:
            return cls(int(chunk_size), cols)
        budget = _TILE_BYTES_CUDA if cuda else _TILE_BYTES_CPU
        return cls(max(16, budget // (4 * cols)), cols)

    def token_ranges(self, tokens: int):
        return row_chunks(tokens, self.rows)

    def blocks(self, shard: VocabShard):
        """``(c0, c1, block)`` over the shard's real columns; ``block`` describes ``x[:, c0:c1]``."""
        for c0, c1 in row_chunks(shard.valid, self.cols):
            yield c0, c1, VocabShard(c1 - c0, shard.start + c0, c1 - c0, shard.vocab_size)


def _in_block(col: torch.Tensor, owned: torch.Tensor, c0: int, c1: int):
    """Column of each label within the block ``[c0, c1)`` (0 where outside) and whether it is there."""
    inside = owned & (col >= c0) & (col < c1)
    return torch.where(inside, col - c0, 0), inside


def _merge_(acc: LocalStats, part: LocalStats, acc_cols: int, part_cols: int) -> None:
    """``acc`` (stats of ``acc_cols`` columns) becomes the stats of its columns and ``part``'s."""
    if acc_cols == 0:
        for mine, theirs in zip(acc, part):
            if mine is not None:
                mine.copy_(theirs)
        return
    big = torch.maximum(acc.max, part.max)
    a, b = rebase_stats(acc, big, acc_cols), rebase_stats(part, big, part_cols)
    for mine, x, y in zip(acc[1:], a[1:], b[1:]):
        if mine is not None:
            torch.add(x, y, out=mine)
    acc.max.copy_(big)


def head_local_stats(head: FusedHead, shard: VocabShard, scale: float, tiles: Tiles, *, with_u: bool,
                     with_sum_z: bool, labels: torch.Tensor | None, ignore_index: int):
    """``LocalStats`` of every token over the shard and the label logits, one tile at a time."""
    tokens = head.hidden.numel() // head.hidden.shape[-1]
    f32 = dict(dtype=torch.float32, device=head.device)
    stats = LocalStats(torch.full((tokens,), float("-inf"), **f32), torch.zeros(tokens, **f32),
                       torch.zeros(tokens, **f32) if with_u else None,
                       torch.zeros(tokens, **f32) if with_sum_z else None)
    label_z = col = owned = None
    if labels is not None:
        col, owned = shard.localize(labels, ignore_index)
        label_z = torch.zeros(tokens, **f32)
    for r0, r1 in tiles.token_ranges(tokens):
        h = head.token_rows(r0, r1)  # [r, H]
        acc = LocalStats(*(None if t is None else t[r0:r1] for t in stats))
        for c0, c1, block in tiles.blocks(shard):
            x = h @ head.weight_rows(c0, c1).t()  # [r, b]
            part = local_stats(x, block, scale, chunk_rows(None, x, block.valid), with_u=with_u,
                               with_sum_z=with_sum_z)
            _merge_(acc, part, c0, block.valid)
            if labels is not None:
                label_z[r0:r1] += label_logits(x, *_in_block(col[r0:r1], owned[r0:r1], c0, c1), scale)
            del x
    return stats, label_z, col, owned


class HeadGrads:
    """Accumulates ``∂h`` and ``∂W`` of a fused head from tiles of ``∂x``."""

    def __init__(self, head: FusedHead, need_hidden: bool, need_weight: bool) -> None:
        self.head = head
        h = head.hidden
        tokens, width = h.numel() // h.shape[-1], h.shape[-1]
        self.grad_h = torch.zeros((tokens, width), dtype=torch.float32, device=h.device) if need_hidden else None
        self.grad_w = None
        self.into_main_grad = need_weight and head.accumulate_main_grad and getattr(head.weight, "main_grad", None) is not None
        if need_weight and not self.into_main_grad:
            self.grad_w = torch.zeros(head.weight.shape, dtype=torch.float32, device=h.device)

    def add(self, r0: int, r1: int, c0: int, c1: int, h: torch.Tensor, w: torch.Tensor, grad_x: torch.Tensor) -> None:
        """Fold ``∂x`` ``[r, b]`` of the tokens ``[r0, r1)`` and columns ``[c0, c1)`` into ``∂h`` and ``∂W``;
        ``h`` ``[r, H]`` and ``w`` ``[b, H]`` are that tile's operands."""
        g = grad_x if grad_x.dtype == w.dtype else grad_x.to(w.dtype)
        if self.grad_h is not None:
            _add_product(self.grad_h[r0:r1], g, w)  # ∂h_r += ∂x · W_b
        if self.into_main_grad:
            _add_product(self.head.weight.main_grad[c0:c1], g.t(), h)  # ∂W_b += ∂xᵀ · h_r
        elif self.grad_w is not None:
            _add_product(self.grad_w[c0:c1], g.t(), h)

    def result(self):
        """``(∂hidden, ∂weight)`` in the inputs' dtypes (``∂weight`` zeros when it went to main_grad)."""
        head = self.head
        grad_h = None if self.grad_h is None else self.grad_h.view(head.hidden.shape).to(head.hidden.dtype)
        grad_w = None if self.grad_w is None else self.grad_w.to(head.weight.dtype)
        if self.into_main_grad:
            head.weight.grad_added_to_main_grad = True  # Megatron DDP's convention
            grad_w = torch.zeros_like(head.weight)
        return grad_h, grad_w


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place (fused when the dtypes agree)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


class _FusedHeadStats(torch.autograd.Function):
    """``vocab_parallel_softmax_stats`` of ``hidden · weightᵀ`` (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, shard: VocabShard, scale: float, tiles: Tiles,
                ignore_index: int, want, fp32: bool, main_grad: bool):
        from mrl.ops.vocab_parallel import finish_stats, reduce_stats

        head = FusedHead(hidden, weight, fp32=fp32, accumulate_main_grad=main_grad)
        _, want_entropy, _, want_smooth = want
        flat_labels = None if labels is None else labels.reshape(-1)
        stats, label_z, col, owned = head_local_stats(head, shard, scale, tiles, with_u=want_entropy,
                                                      with_sum_z=want_smooth, labels=flat_labels,
                                                      ignore_index=ignore_index)
        big_m, packed = reduce_stats(stats, shard, group, label_z)
        kept = None if flat_labels is None else flat_labels != ignore_index
        outputs, mean_z = finish_stats(big_m, packed, kept, want, shard.vocab_size)
        ctx.set_materialize_grads(False)
        ctx.shard, ctx.scale, ctx.tiles, ctx.fp32, ctx.main_grad = shard, scale, tiles, fp32, main_grad
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
        shard, scale, tiles = ctx.shard, ctx.scale, ctx.tiles
        alpha, beta, label_coef, const = grad_coefficients(grads, kept, owned, mean_z, scale, shard.vocab_size, big_m)
        head = FusedHead(hidden, weight, fp32=ctx.fp32, accumulate_main_grad=ctx.main_grad)
        out = HeadGrads(head, need_h, need_w)
        for r0, r1 in tiles.token_ranges(big_m.shape[0]):
            rows = slice(r0, r1)
            h = head.token_rows(r0, r1)  # [r, H]
            for c0, c1, block in tiles.blocks(shard):
                w = head.weight_rows(c0, c1)  # [b, H]
                x = h @ w.t()  # [r, b], recomputed
                label_col = coef = None
                if label_coef is not None:
                    label_col, inside = _in_block(col[rows], owned[rows], c0, c1)
                    coef = torch.where(inside, label_coef[rows], 0.0)
                grad_x = softmax_grad(
                    x, block, scale, chunk_rows(None, x, block.valid), shift=big_m[rows], norm=big_s[rows],
                    alpha=alpha[rows], beta=None if beta is None else beta[rows], label_col=label_col,
                    label_coef=coef, const=None if const is None else const[rows], out=x,
                )
                out.add(r0, r1, c0, c1, h, w, grad_x)
                del x, grad_x
        grad_h, grad_w = out.result()
        return (grad_h, grad_w) + (None,) * 9


def fused_head_stats(head: FusedHead, labels, group, want, *, ignore_index: int, scale: float,
                     vocab_size: int | None, chunk_size: int | None):
    """The outputs of ``vocab_parallel_softmax_stats`` for a fused head (flattened ``[tokens]``)."""
    shard = VocabShard.of(head, group, vocab_size)
    if labels is not None:
        check_labels(labels, head, shard, ignore_index)
    return _FusedHeadStats.apply(head.hidden, head.weight, labels, group, shard, scale, Tiles.of(head, chunk_size),
                                 ignore_index, want, head.fp32, head.accumulate_main_grad)


class _FusedHeadKL(torch.autograd.Function):
    """``vocab_parallel_kl`` of two fused heads: KL(softmax(h_p·W_pᵀ/T) ‖ softmax(h_q·W_qᵀ/T))."""

    @staticmethod
    def forward(ctx, hidden_p, weight_p, hidden_q, weight_q, group, shard: VocabShard, scale: float,
                tiles: Tiles, fp32: bool):
        from mrl.ops.kl import _local_kl_stats, merge_kl_stats_, reduce_kl_stats

        head_p, head_q = FusedHead(hidden_p, weight_p, fp32=fp32), FusedHead(hidden_q, weight_q, fp32=fp32)
        tokens = hidden_p.numel() // hidden_p.shape[-1]
        local = torch.zeros(5, tokens, dtype=torch.float32, device=hidden_p.device)  # m_p, m_q, s_p, s_q, w
        local[:2] = float("-inf")
        ref = torch.zeros(2, tokens, dtype=torch.float32, device=hidden_p.device)  # d's references (a, b)
        for r0, r1 in tiles.token_ranges(tokens):
            hp, hq, acc = head_p.token_rows(r0, r1), head_q.token_rows(r0, r1), local[:, r0:r1]
            for c0, c1, block in tiles.blocks(shard):
                xp = hp @ head_p.weight_rows(c0, c1).t()  # [r, b]
                xq = hq @ head_q.weight_rows(c0, c1).t()
                if c0 == 0:  # the first block's maxima are the references: later blocks merge by rescaling
                    acc.copy_(_local_kl_stats(xp, xq, block, scale, chunk_rows(None, xp, block.valid)))
                    ref[:, r0:r1] = acc[:2]
                else:
                    merge_kl_stats_(acc, _local_kl_stats(xp, xq, block, scale, chunk_rows(None, xp, block.valid),
                                                         ref[:, r0:r1]))
                del xp, xq
        reduced = reduce_kl_stats(local, shard, group, ref)
        ctx.shard, ctx.scale, ctx.tiles, ctx.fp32 = shard, scale, tiles, fp32
        ctx.save_for_backward(hidden_p, weight_p, hidden_q, weight_q, reduced.big, reduced.sums, ref, reduced.mean_d)
        return reduced.kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        from mrl.ops.kl import kl_grad_chunk

        hidden_p, weight_p, hidden_q, weight_q, big, sums, ref, mean_d = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return (None,) * 9
        shard, scale, tiles = ctx.shard, ctx.scale, ctx.tiles
        head_p = FusedHead(hidden_p, weight_p, fp32=ctx.fp32)
        head_q = FusedHead(hidden_q, weight_q, fp32=ctx.fp32)
        out_p = HeadGrads(head_p, needs[0], needs[1]) if needs[0] or needs[1] else None
        out_q = HeadGrads(head_q, needs[2], needs[3]) if needs[2] or needs[3] else None
        g = grad_kl.reshape(-1, 1).float() * scale  # [tokens, 1]
        inv_sp, inv_sq = sums[:2].reciprocal().unsqueeze(-1)  # [tokens, 1]
        tokens = big.shape[1]
        for r0, r1 in tiles.token_ranges(tokens):
            hp, hq = head_p.token_rows(r0, r1), head_q.token_rows(r0, r1)  # [r, H]
            for c0, c1, block in tiles.blocks(shard):
                wp, wq = head_p.weight_rows(c0, c1), head_q.weight_rows(c0, c1)  # [b, H]
                xp, xq = hp @ wp.t(), hq @ wq.t()  # recomputed [r, b]
                n, sub = r1 - r0, chunk_rows(None, xp, block.valid)
                bufs = torch.empty(4, min(sub, n), block.valid, dtype=torch.float32, device=xp.device)
                grad_p = torch.empty(n, block.valid, dtype=torch.float32, device=xp.device) if out_p else None
                grad_q = torch.empty(n, block.valid, dtype=torch.float32, device=xp.device) if out_q else None
                for s0, s1 in row_chunks(n, sub):
                    at = slice(r0 + s0, r0 + s1)
                    kl_grad_chunk(xp[s0:s1], xq[s0:s1], block, scale, big[:, at], None if ref is None else ref[:, at],
                                  inv_sp[at], inv_sq[at], mean_d[at], g[at],
                                  None if grad_p is None else grad_p[s0:s1],
                                  None if grad_q is None else grad_q[s0:s1], bufs)
                del xp, xq
                if out_p is not None:
                    out_p.add(r0, r1, c0, c1, hp, wp, grad_p)
                if out_q is not None:
                    out_q.add(r0, r1, c0, c1, hq, wq, grad_q)
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
    return _FusedHeadKL.apply(head_p.hidden, head_p.weight, head_q.hidden, head_q.weight, group, shard, scale,
                              Tiles.of(head_p, chunk_size), head_p.fp32)
