"""Per-token quantities of the full softmax from vocab-parallel logits shards.

Each TP rank holds ``x``, a contiguous vocabulary shard ``[..., V/tp]`` of the logits. With
``z = x / temperature`` (fp32) and for one token row:

    lse = log Σ_v e^{z_v}          log p_y = z_y - lse          H = lse - E_p[z]

One autograd Function computes any subset of {log p_y, H, lse, mean_v(-log p_v)} in one pass:

* forward: per chunk of tokens, the shard's ``m_r = max z``, ``s_r = Σ e^{z-m_r}`` and, when
  needed, ``u_r = Σ e^{z-m_r}(z-m_r)`` and ``Σ (z-m_r)``; then one all-reduce MAX gives
  ``M = max_r m_r`` and one packed all-reduce SUM of ``s_r e^{m_r-M}``,
  ``(u_r + (m_r-M) s_r) e^{m_r-M}``, ``Σ (z-M)`` and the label logit gives ``S``, ``U``, ... with
  ``lse = M + log S`` and ``E_p[z] - M = U/S``. Two collectives whatever is asked for.
* backward: no communication. The saved input and the per-token ``M, S, U/S`` recompute
  ``p = e^{z-M}/S`` chunk by chunk and write ``∂/∂z_j = p_j(α + β(z_j - M)) + a·1[j=y] - d/V``
  into one buffer, where ``α = c + d - a + b·U/S`` and ``β = -b`` with ``a, b, c, d`` the
  upstream gradients of log p_y, H, lse and the smoothing term.

The input is never modified and never gathered; results are fp32 whatever the input dtype.
``logits`` may also be a ``FusedHead`` (hidden states and the output weight): the same results
without materialising the logits (``mrl.ops.fused_head``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mrl.ops._kernels import LocalStats, local_stats, rebase_stats, softmax_grad
from mrl.ops._shard import VocabShard, check_labels, check_temperature, chunk_rows, label_logits
from mrl.ops.fused_head import FusedHead, fused_head_stats
from mrl.ops.comm import all_reduce_

# Which per-token outputs the Function computes: (log p_y, entropy, lse, mean_v -log p_v).
_Want = tuple[bool, bool, bool, bool]


class SoftmaxStats(NamedTuple):
    """Per-token results of ``vocab_parallel_softmax_stats``; None where not asked for."""

    logprobs: torch.Tensor | None
    """log p(label), 0 where label == ignore_index. fp32 ``[...]``."""

    entropy: torch.Tensor | None
    """H(p) = -Σ_v p_v log p_v. fp32 ``[...]``."""

    logsumexp: torch.Tensor | None
    """log Σ_v e^{z_v}. fp32 ``[...]``."""


def reduce_stats(stats: LocalStats, shard: VocabShard, group, label_z: torch.Tensor | None = None):
    """Global ``M`` ``[tokens]`` and the packed sums ``[parts, tokens]`` of every rank's stats.

    Rows of the packed sums, in order: S = Σ e^{z-M}; U = Σ e^{z-M}(z-M) if ``stats`` has u;
    Σ (z-M) if ``stats`` has Σ z; the label logit if ``label_z`` (0 on ranks not holding it).
    """
    big_m = all_reduce_(stats.max.clone(), dist.ReduceOp.MAX, group)  # [tokens] M
    if shard.valid > 0:
        rebased = rebase_stats(stats, big_m, shard.valid)
        parts = [t for t in rebased[1:] if t is not None]
    else:  # a shard of padding only contributes nothing
        zero = torch.zeros_like(big_m)
        parts = [zero] + [zero for t in stats[2:] if t is not None]
    if label_z is not None:
        parts.append(label_z)
    return big_m, all_reduce_(torch.stack(parts), dist.ReduceOp.SUM, group)


def finish_stats(big_m: torch.Tensor, packed: torch.Tensor, kept: torch.Tensor | None, want: _Want,
                 vocab_size: int) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The asked-for outputs (log p_y, H, lse, mean_v -log p_v) from ``reduce_stats``, and ``E_p[z] - M``."""
    want_logp, want_entropy, want_lse, want_smooth = want
    log_s = packed[0].log()
    mean_z = packed[1] / packed[0] if want_entropy else None  # E_p[z] - M
    outputs: list[torch.Tensor | None] = [None, None, None, None]
    if want_logp:
        outputs[0] = torch.where(kept, packed[-1] - big_m - log_s, 0.0)
    if want_entropy:
        outputs[1] = log_s - mean_z
    if want_lse:
        outputs[2] = big_m + log_s
    if want_smooth:
        mean_logit = packed[1 + want_entropy] / vocab_size  # mean_v z_v - M
        outputs[3] = torch.where(kept, log_s - mean_logit, 0.0)
    return outputs, mean_z


def grad_coefficients(grads, kept, owned, mean_z, scale: float, vocab_size: int, like: torch.Tensor):
    """``(α, β, label_coef, const)`` of ``∂/∂z_j = p_j(α + β(z_j - M)) + a·1[j=y] - d/V`` (times
    ``scale``) from the upstream gradients ``(a, b, c, d)`` of (log p_y, H, lse, smoothing term)."""
    g_logp, g_entropy, g_lse, g_smooth = grads
    alpha = torch.zeros_like(like)
    beta = label_coef = const = None
    if g_logp is not None:
        a = torch.where(kept, g_logp.reshape(-1).float(), 0.0) * scale
        alpha -= a
        label_coef = torch.where(owned, a, 0.0)
    if g_entropy is not None:
        b = g_entropy.reshape(-1).float() * scale
        alpha += b * mean_z
        beta = -b
    if g_lse is not None:
        alpha += g_lse.reshape(-1).float() * scale
    if g_smooth is not None:
        d = torch.where(kept, g_smooth.reshape(-1).float(), 0.0) * scale
        alpha += d
        const = d / vocab_size
    return alpha, beta, label_coef, const


class _VocabParallelStats(torch.autograd.Function):
    """The one-pass forward and communication-free backward described in the module docstring."""

    @staticmethod
    def forward(ctx, logits, labels, group, shard: VocabShard, scale: float, chunk: int,
                ignore_index: int, want: _Want):
        _, want_entropy, _, want_smooth = want
        x = logits.reshape(-1, shard.local_size)  # [tokens, V/tp]
        stats = local_stats(x, shard, scale, chunk, with_u=want_entropy, with_sum_z=want_smooth)

        label_z = None
        if labels is not None:
            labels = labels.reshape(-1)
            col, owned = shard.localize(labels, ignore_index)
            label_z = label_logits(x, col, owned, scale)
        big_m, packed = reduce_stats(stats, shard, group, label_z)

        kept = None if labels is None else labels != ignore_index
        outputs, mean_z = finish_stats(big_m, packed, kept, want, shard.vocab_size)

        ctx.set_materialize_grads(False)
        ctx.shard, ctx.scale, ctx.chunk = shard, scale, chunk
        if labels is None:
            col = owned = kept
        ctx.save_for_backward(logits, big_m, packed[0], mean_z, col, owned, kept)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_lse, g_smooth):
        logits, big_m, big_s, mean_z, col, owned, kept = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or all(g is None for g in (g_logp, g_entropy, g_lse, g_smooth)):
            return (None,) * 8
        shard, scale = ctx.shard, ctx.scale
        alpha, beta, label_coef, const = grad_coefficients(
            (g_logp, g_entropy, g_lse, g_smooth), kept, owned, mean_z, scale, shard.vocab_size, big_m)
        x = logits.reshape(-1, shard.local_size)
        grad = softmax_grad(
            x, shard, scale, ctx.chunk, shift=big_m, norm=big_s, alpha=alpha, beta=beta,
            label_col=col, label_coef=label_coef, const=const,
        )
        return (grad.view(logits.shape),) + (None,) * 7


def _apply(logits, labels, group, want: _Want, *, ignore_index, temperature, vocab_size, chunk_size):
    scale = check_temperature(temperature)
    if isinstance(logits, FusedHead):  # logits = hidden · weightᵀ, never materialised
        outputs = fused_head_stats(logits, labels, group, want, ignore_index=ignore_index, scale=scale,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
        shape = logits.shape[:-1]
        return tuple(None if out is None else out.view(shape) for out in outputs)
    shard = VocabShard.of(logits, group, vocab_size)
    if labels is not None:
        check_labels(labels, logits, shard, ignore_index)
    chunk = chunk_rows(chunk_size, logits, shard.valid)
    outputs = _VocabParallelStats.apply(logits, labels, group, shard, scale, chunk, ignore_index, want)
    shape = logits.shape[:-1]
    return tuple(None if out is None else out.view(shape) for out in outputs)


def vocab_parallel_softmax_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    group=None,
    *,
    logprobs: bool = True,
    entropy: bool = False,
    logsumexp: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> SoftmaxStats:
    """Any of log p(label), H(p), logsumexp from one read of the shard and two all-reduces.

    Args:
        logits: this rank's vocabulary shard ``[..., V/tp]``, any float dtype; never modified.
        labels: global vocabulary ids ``[...]`` (needed for ``logprobs``).
        group: the tensor-parallel process group; None when the tensor holds the whole vocabulary.
        ignore_index: label value whose log-prob (and its gradient) is 0.
        temperature: the softmax is taken over ``logits / temperature``.
        vocab_size: true vocabulary size; padded columns (global id >= vocab_size) are excluded.
        chunk_size: tokens per chunk in forward and backward (None: a cache-sized default).
    """
    if logprobs and labels is None:
        raise ValueError("labels are required when logprobs=True")
    want = (logprobs, entropy, logsumexp, False)
    logp, ent, lse, _ = _apply(
        logits, labels if logprobs else None, group, want, ignore_index=ignore_index,
        temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    return SoftmaxStats(logp, ent, lse)


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = -100, *,
    temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(label) ``[...]`` fp32 from vocab shards; 0 (and no gradient) where label == ignore_index.

    Forward: one all-reduce MAX and one all-reduce SUM. Backward: no communication.
    """
    return _apply(
        logits, labels, group, (True, False, False, False), ignore_index=ignore_index,
        temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
    )[0]


def vocab_parallel_entropy(
    logits: torch.Tensor, group=None, *,
    temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int | None = None,
) -> torch.Tensor:
    """H(p) = -Σ_v p_v log p_v ``[...]`` fp32 from vocab shards (∂H/∂z_j = -p_j(z_j - E_p[z]))."""
    return _apply(
        logits, None, group, (False, True, False, False), ignore_index=-100,
        temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
    )[1]


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = -100, *,
    temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), H(p)) in one pass, with the collectives of log-probs alone.

    Equal to the two separate calls: the entropy is that of every row, ignored labels included.
    """
    logp, ent, _, _ = _apply(
        logits, labels, group, (True, True, False, False), ignore_index=ignore_index,
        temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    return logp, ent


def vocab_parallel_logsumexp(
    logits: torch.Tensor, group=None, *, vocab_size: int | None = None, chunk_size: int | None = None,
) -> torch.Tensor:
    """log Σ_v e^{x_v} ``[...]`` fp32 from vocab shards (for z-loss); its gradient is softmax(x)."""
    return _apply(
        logits, None, group, (False, False, True, False), ignore_index=-100,
        temperature=1.0, vocab_size=vocab_size, chunk_size=chunk_size,
    )[2]


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy ``[...]`` fp32, 0 where label == ignore_index.

    ``(1-ε)·(-log p_y) + ε·mean_v(-log p_v)`` with the mean over the true global vocabulary
    (``vocab_size``), as ``torch.nn.functional.cross_entropy(label_smoothing=ε)`` defines it.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    smooth = label_smoothing > 0.0
    logp, _, _, mean_nll = _apply(
        logits, labels, group, (True, False, False, smooth), ignore_index=ignore_index,
        temperature=1.0, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    if not smooth:
        return -logp
    return (label_smoothing - 1.0) * logp + label_smoothing * mean_nll
