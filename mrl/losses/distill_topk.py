"""Top-k teacher distillation: divergences over the teacher's k most likely tokens per position.

A large teacher can ship, per position, only the ids of its top-k tokens and their log-probs
(``teacher_topk_ids``, ``teacher_topk_logprobs`` ``[B, S, k]``, log-probs of the teacher's full
softmax, so Σ_i e^{t_i} ≤ 1). The student's log-probs s_i at those ids come from its vocab-sharded
logits (``vocab_parallel_logprobs_at``: the full-vocabulary normaliser through the TP group, only
the k picked logits cross ranks). Both are then compared as distributions over a few categories:

- ``tail="bucket"`` (default): k + 1 categories, the k tokens and one bucket for everything else,
  with mass 1 − Σ_i e^{t_i} (teacher) and 1 − Σ_i e^{s_i} (student). This is the exact divergence
  between the two distributions coarsened to those categories, so it is ≤ the full-vocabulary one
  (data processing), 0 iff the student matches the teacher on the k tokens and on the tail mass, and
  it keeps the student's total mass on the teacher's top-k calibrated. The student's bucket is the
  sum over the other tokens itself (``vocab_parallel_logprobs_at(rest=True)``), accurate however
  much mass the k tokens hold; 1 − Σ_i e^{s_i} would cancel and amplify rounding by 1/(1 − Σ). The
  teacher ships only its k log-probs, so its bucket is log(1 − e^L) with L = logsumexp of them,
  L capped at log(1 − 2⁻²⁴) (the resolution of 1 − Σ in fp32): it never holds less than ≈6e-8.
- ``tail="renormalize"``: k categories, both distributions renormalised over the k tokens,
  t̃_i = t_i − logsumexp(t), s̃_i = s_i − logsumexp(s) (NeMo RL's default, ``zero_outside_topk:
  false``). Invariant to the mass outside the top-k: the student's tail is left unconstrained.

Divergences (teacher P, student Q over the categories): forward KL(P‖Q), reverse KL(Q‖P), and the
generalised JSD of GKD, β·KL(P‖M) + (1 − β)·KL(Q‖M) with M = βP + (1 − β)Q (β = 0 / 1: the two KLs).
"""

from __future__ import annotations

import math

import torch

TAILS: tuple[str, ...] = ("bucket", "renormalize")

_MAX_LOG_MASS = math.log1p(-(2.0 ** -24))  # a top-k mass of at most 1 − 2⁻²⁴ leaves a representable tail


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_categories(logprobs_k: torch.Tensor, tail: str, rest: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., k]`` log-probs of k tokens → ``[..., C]`` log-probs of the categories of ``tail``;
    ``rest`` ``[...]``: the bucket's log-mass when known exactly (else log(1 − Σ), capped)."""
    if tail == "renormalize":
        return logprobs_k - torch.logsumexp(logprobs_k, dim=-1, keepdim=True)
    if tail == "bucket":
        if rest is None:
            mass = torch.logsumexp(logprobs_k, dim=-1, keepdim=True).clamp(max=_MAX_LOG_MASS)  # [..., 1]
            bucket = log1mexp(mass)
        else:
            bucket = rest.unsqueeze(-1)
        return torch.cat([logprobs_k, bucket], dim=-1)
    raise ValueError(f"top-k tail must be one of {list(TAILS)}, got {tail!r}")


def categorical_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ_c a_c (log a_c − log b_c) over the last dim (finite log-probs)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def categorical_divergence(teacher: torch.Tensor, student: torch.Tensor, direction: str,
                           beta: float = 0.5) -> torch.Tensor:
    """``[...]`` divergence between category log-probs ``[..., C]``: "forward" KL(teacher‖student),
    "reverse" KL(student‖teacher), "jsd" JSD_β (β = 0 / 1: forward / reverse, as ``vocab_parallel_jsd``)."""
    if direction == "jsd" and beta == 0.0:
        direction = "forward"
    if direction == "jsd" and beta == 1.0:
        direction = "reverse"
    if direction == "forward":
        return categorical_kl(teacher, student)
    if direction == "reverse":
        return categorical_kl(student, teacher)
    if direction == "jsd":
        mix = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
        return beta * categorical_kl(teacher, mix) + (1.0 - beta) * categorical_kl(student, mix)
    raise ValueError(f"direction must be 'forward', 'reverse' or 'jsd', got {direction!r}")


def topk_divergence(student_logprobs_k: torch.Tensor, teacher_logprobs_k: torch.Tensor, *, tail: str,
                    direction: str = "forward", beta: float = 0.5,
                    student_rest: torch.Tensor | None = None) -> torch.Tensor:
    """``[...]`` divergence of the student from the teacher over the teacher's top-k (module docstring).

    Both ``[..., k]`` log-probs (full-vocabulary softmaxes) at the same ids, ``student_rest`` ``[...]``
    the student's log-mass outside them (``tail="bucket"``; None: from 1 − Σ); fp32 math whatever the
    input dtype; the teacher side carries no gradient.
    """
    teacher = topk_categories(teacher_logprobs_k.detach().float(), tail)
    student = topk_categories(student_logprobs_k.float(), tail, None if student_rest is None else student_rest.float())
    return categorical_divergence(teacher, student, direction, beta)
