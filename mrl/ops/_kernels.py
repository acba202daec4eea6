"""Per-shard softmax statistics and gradients, computed chunk by chunk (no communication).

Notation for one token row of a shard: ``x`` the logits (any float dtype), ``z = scale·x`` in
fp32 (``scale = 1/temperature``), restricted to the shard's real columns. The functions here read
``x`` one chunk of tokens at a time into a few fp32 work buffers of ``[chunk, V_local]``, so the
extra memory is independent of the number of tokens and a chunk stays in cache between passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mrl.ops._shard import VocabShard


class LocalStats(NamedTuple):
    """Softmax statistics of each token row over this shard's real columns, fp32 ``[tokens]``."""

    max: torch.Tensor
    """m = max_j z_j (-inf on a shard without real columns)."""

    sumexp: torch.Tensor
    """s = Σ_j e^{z_j - m}."""

    sumexp_z: torch.Tensor | None
    """u = Σ_j e^{z_j - m}(z_j - m), when asked for (entropy)."""

    sum_z: torch.Tensor | None
    """Σ_j (z_j - m), when asked for (label smoothing)."""


def rebase_stats(stats: LocalStats, big_m: torch.Tensor, cols: int) -> LocalStats:
    """``stats`` of ``cols`` columns taken relative to ``big_m >= stats.max`` instead of their own max:
    with ``δ = m - M``: ``S = s·e^δ``, ``U = (u + δ·s)·e^δ``, ``Σ(z-M) = Σ(z-m) + cols·δ``.

    Summing rebased stats merges column blocks (of one shard, or of the TP ranks). ``stats.max``
    must be finite (a block with at least one real column)."""
    delta = stats.max - big_m  # [tokens] <= 0
    rescale = delta.exp()
    u = None if stats.sumexp_z is None else (stats.sumexp_z + delta * stats.sumexp) * rescale
    sum_z = None if stats.sum_z is None else stats.sum_z + cols * delta
    return LocalStats(big_m, stats.sumexp * rescale, u, sum_z)


_LOG2E = 1.4426950408889634  # exp(t) = 2^(t·log2 e); exp2 is the faster vector routine on CPUs


def exp_(t: torch.Tensor) -> torch.Tensor:
    """``e^t`` in place, as ``2^(t·log2 e)`` (relative error ~|t|·1e-7 more than ``exp``)."""
    return t.mul_(_LOG2E).exp2_()


def exp_into(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``out = e^t`` without modifying ``t``."""
    return torch.mul(t, _LOG2E, out=out).exp2_()


def shift_into(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = scale·x - shift[:, None]`` in fp32, one pass, no temporary."""
    if scale == 1.0:
        return torch.sub(x, shift.unsqueeze(-1), out=out)
    return torch.add(shift.neg().unsqueeze(-1), x, alpha=scale, out=out)


def row_chunks(rows: int, chunk: int):
    """``(start, stop)`` of consecutive chunks of ``chunk`` rows covering ``rows``."""
    for start in range(0, rows, chunk):
        yield start, min(start + chunk, rows)


def empty_grad(x: torch.Tensor, shard: VocabShard, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised gradient buffer of ``x``'s shape whose padded columns are already 0."""
    grad = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    if shard.valid < x.shape[1]:
        grad[:, shard.valid :].zero_()
    return grad


def local_stats(
    x: torch.Tensor, shard: VocabShard, scale: float, chunk: int, *, with_u: bool, with_sum_z: bool
) -> LocalStats:
    """``LocalStats`` of ``x`` (``[tokens, V_local]``), reading it once per chunk."""
    rows, cols = x.shape[0], shard.valid
    f32 = dict(dtype=torch.float32, device=x.device)
    m = torch.full((rows,), float("-inf"), **f32)
    s = torch.zeros(rows, **f32)
    u = torch.zeros(rows, **f32) if with_u else None
    sum_z = torch.zeros(rows, **f32) if with_sum_z else None
    if rows == 0 or cols == 0:
        return LocalStats(m, s, u, sum_z)
    xv = x[:, :cols]  # [tokens, valid]
    t_buf = torch.empty(min(chunk, rows), cols, **f32)
    e_buf = torch.empty_like(t_buf) if with_u else None
    for r0, r1 in row_chunks(rows, chunk):
        xc = xv[r0:r1]
        mc = m[r0:r1]
        mc.copy_(torch.amax(xc, dim=-1))
        if scale != 1.0:
            mc.mul_(scale)  # max(scale·x) = scale·max(x) as scale > 0
        t = shift_into(t_buf[: r1 - r0], xc, mc, scale)  # [chunk, valid] z - m
        if sum_z is not None:
            torch.sum(t, dim=-1, out=sum_z[r0:r1])
        if e_buf is None:
            torch.sum(exp_(t), dim=-1, out=s[r0:r1])
        else:
            e = exp_into(e_buf[: r1 - r0], t)
            torch.sum(e, dim=-1, out=s[r0:r1])
            torch.sum(t.mul_(e), dim=-1, out=u[r0:r1])
    return LocalStats(m, s, u, sum_z)


def softmax_grad(
    x: torch.Tensor,
    shard: VocabShard,
    scale: float,
    chunk: int,
    *,
    shift: torch.Tensor,
    norm: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None = None,
    label_col: torch.Tensor | None = None,
    label_coef: torch.Tensor | None = None,
    const: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient w.r.t. ``x``, in ``x``'s dtype, of a per-row function of the softmax.

    With ``t_j = scale·x_j - shift`` and ``p_j = e^{t_j} / norm`` (all per-row vectors fp32
    ``[tokens]``), column ``j`` of row ``i`` receives

        p_j·(alpha + beta·t_j) + label_coef·1[j = label_col] - const

    on the shard's real columns and 0 on its padded ones. The caller folds the chain-rule factor
    ``scale`` into the coefficients. fp32 input is written straight into the one gradient buffer;
    other dtypes go through an fp32 chunk buffer. ``out`` (``x``'s shape and dtype, ``x`` itself
    allowed: it is read a chunk of rows before that chunk is written) replaces a new buffer.
    """
    rows, cols = x.shape[0], shard.valid
    grad = empty_grad(x, shard) if out is None else out  # [tokens, V_local]
    if out is not None and cols < x.shape[1]:
        grad[:, cols:].zero_()
    if rows == 0 or cols == 0:
        return grad
    alpha = (alpha / norm).unsqueeze(-1)  # e^t·(alpha/S) = p·alpha: 1/S folded into the coefficients
    beta = None if beta is None else (beta / norm).unsqueeze(-1)
    direct = x.dtype == torch.float32
    f32 = dict(dtype=torch.float32, device=x.device)
    width = min(chunk, rows)
    p_buf = None if direct else torch.empty(width, cols, **f32)
    t_buf = torch.empty(width, cols, **f32) if beta is not None else None
    xv, gv = x[:, :cols], grad[:, :cols]
    for r0, r1 in row_chunks(rows, chunk):
        n = r1 - r0
        dst = gv[r0:r1] if direct else p_buf[:n]  # [chunk, valid]
        if t_buf is None:
            exp_(shift_into(dst, xv[r0:r1], shift[r0:r1], scale)).mul_(alpha[r0:r1])
        else:
            t = shift_into(t_buf[:n], xv[r0:r1], shift[r0:r1], scale)
            exp_into(dst, t).mul_(t.mul_(beta[r0:r1]).add_(alpha[r0:r1]))
        if label_coef is not None:
            at = (torch.arange(n, device=x.device), label_col[r0:r1])
            dst.index_put_(at, label_coef[r0:r1], accumulate=True)
        if const is not None:
            dst.sub_(const[r0:r1].unsqueeze(-1))
        if not direct:
            gv[r0:r1].copy_(dst)
    return grad
