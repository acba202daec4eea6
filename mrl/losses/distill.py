"""KL regularisation / distillation over the full sharded vocabulary.

Per valid token, with p = softmax(logits / T) the policy (student) and q = softmax(ref_logits / T)
the reference (teacher), both sharded over the TP group:

- forward: KL(q || p) = Σ_v q (log q − log p)  (mode-covering, classic distillation);
- reverse: KL(p || q) = Σ_v p (log p − log q)  (mode-seeking, on-policy distillation);
- jsd: the generalised JSD of GKD, β·KL(q || M) + (1 − β)·KL(p || M), M = β·q + (1 − β)·p
  (TRL's convention: β weights the teacher; β = 0 / 1 give forward / reverse KL), ``vocab_parallel_jsd``.

Exact (no sampling), through ``vocab_parallel_kl`` / ``vocab_parallel_jsd``; divided by the step's
global token count. With ``teacher_topk`` the batch carries only the teacher's top-k ids and
log-probs per position instead of its logits (``mrl.losses.distill_topk``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mrl.losses import functional as LF
from mrl.losses.base import BatchNeeds, GlobalCounts, Loss, LossConfigBase, LossInputs, check_shape
from mrl.losses.distill_topk import TAILS, topk_divergence
from mrl.losses.metrics import Metric, Metrics
from mrl.ops import vocab_parallel_kl
from mrl.ops.jsd import vocab_parallel_jsd
from mrl.ops.logprobs_at import vocab_parallel_logprobs_at

TOPK_KEYS: tuple[str, str] = ("teacher_topk_ids", "teacher_topk_logprobs")


@dataclass
class DistillLossConfig(LossConfigBase):
    """Distillation / KL-regularisation settings."""

    kind: Literal["distill"] = "distill"
    """Loss name (selects this loss in ``build_loss``)."""

    direction: Literal["forward", "reverse", "jsd"] = "forward"
    """"forward": KL(teacher || policy); "reverse": KL(policy || teacher); "jsd": the generalised JSD
    of GKD with jsd_beta."""

    jsd_beta: float = 0.5
    """β of direction "jsd": β·KL(teacher || M) + (1 − β)·KL(policy || M), M = β·teacher + (1 − β)·policy
    (GKD / TRL); 0 gives the forward KL, 1 the reverse KL."""

    teacher_topk: Optional[int] = None
    """Distil from the teacher's top-k tokens only: the trainer keeps, per position, the ids and
    log-probs of the teacher's k most likely tokens (``teacher_topk_ids`` / ``teacher_topk_logprobs``
    [B, S, k]) instead of its logits shard; null: the full distribution (reference.keep_logits)."""

    topk_tail: Literal["bucket", "renormalize"] = "bucket"
    """With teacher_topk: "bucket" compares the k tokens plus one bucket for the rest of the
    vocabulary (exact KL of the coarsened distributions); "renormalize" renormalises both over the k."""

    temperature: float = 1.0
    """Both logits are divided by this before the softmax."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "distill":
            raise ValueError(f"kind must be 'distill' for DistillLossConfig, got {self.kind!r}")
        if self.direction not in ("forward", "reverse", "jsd"):
            raise ValueError(f"direction must be 'forward', 'reverse' or 'jsd', got {self.direction!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.teacher_topk is not None and (isinstance(self.teacher_topk, bool) or self.teacher_topk < 1):
            raise ValueError(f"teacher_topk must be a positive number of tokens or null, got {self.teacher_topk!r}")
        if self.topk_tail not in TAILS:
            raise ValueError(f"topk_tail must be one of {list(TAILS)}, got {self.topk_tail!r}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class DistillLoss(Loss):
    """Token-mean divergence to ``ref_logits`` or to the teacher's top-k (module docstring)."""

    kind = "distill"
    normalizer = "tokens"
    required_keys = ("labels", "ref_logits")

    def __init__(self, config: DistillLossConfig, *, vocab_size: int | None = None) -> None:
        super().__init__(config, vocab_size=vocab_size)
        if config.teacher_topk is not None:
            self.required_keys = ("labels", *TOPK_KEYS)

    @property
    def batch_needs(self) -> BatchNeeds:
        """The teacher (reference) pass, with its logits unless the batches carry its top-k."""
        cfg = self.config
        return BatchNeeds(keys=self.required_keys, temperature=cfg.temperature, reference_logprobs=True,
                          reference_logits=cfg.teacher_topk is None, reference_topk=cfg.teacher_topk)

    def check_inputs(self, batch, logits, values, counts: GlobalCounts) -> dict[str, torch.Tensor]:
        """The teacher's logits sharded like the policy's, or its top-k ids (integer) and log-probs."""
        k = self.config.teacher_topk
        if k is None:
            check_shape(batch, "ref_logits", tuple(logits.shape))  # [B, S, V/tp]
            return {}
        shape = (*batch["labels"].shape, k)
        ids = check_shape(batch, "teacher_topk_ids", shape)  # [B, S, k]
        teacher = check_shape(batch, "teacher_topk_logprobs", shape)  # [B, S, k]
        if ids.dtype not in (torch.int64, torch.int32) or not teacher.is_floating_point():
            raise ValueError(f"batch['teacher_topk_ids'] must be integer and batch['teacher_topk_logprobs'] "
                             f"floating-point, got {ids.dtype} and {teacher.dtype}")
        return {}

    def value_flags(self, batch, mask, num_labels: int) -> dict[str, torch.Tensor]:
        """Top-k: ids in the vocabulary and distinct, teacher log-probs finite, of total mass <= 1."""
        if self.config.teacher_topk is None:
            return {}
        ids, teacher = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]  # [B, S, k] each
        where = mask.unsqueeze(-1)
        outside = (where & ((ids < 0) | (ids >= num_labels))).any()
        ordered = ids.sort(-1).values  # [B, S, k]
        return {
            f"teacher_topk_ids outside the vocabulary [0, {num_labels})": outside,
            "teacher_topk_logprobs has NaN/inf at valid positions": (where & ~torch.isfinite(teacher)).any(),
            "teacher_topk_logprobs sum to a probability above 1 (they must be log-probs of the full softmax)":
                (mask & (torch.logsumexp(teacher.float(), -1) > 1e-3)).any(),
            "teacher_topk_ids repeat an id at a position": (mask & (ordered[..., 1:] == ordered[..., :-1]).any(-1)).any(),
        }

    def compute(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        logits, batch, mask, group = inputs.logits, inputs.batch, inputs.mask, inputs.group
        if cfg.teacher_topk is not None:
            divergence = self._topk_divergence(logits, batch, mask, group)  # [B, S]
        else:
            divergence = self._full_divergence(logits, batch["ref_logits"].detach(), group)  # [B, S]
        loss = LF.masked_mean(divergence, mask, inputs.counts.num_tokens)
        name = "jsd" if cfg.direction == "jsd" and 0.0 < cfg.jsd_beta < 1.0 else "kl"
        metrics: Metrics = {name: Metric.mean_fragment(loss), "loss": Metric.mean_fragment(loss)}
        return loss, metrics

    def _full_divergence(self, logits, ref_logits, group) -> torch.Tensor:
        """``[B, S]`` divergence over the full sharded vocabulary."""
        cfg = self.config
        common = dict(vocab_size=self.vocab_size, chunk_size=cfg.chunk_size, temperature=cfg.temperature)
        if cfg.direction == "jsd":
            return vocab_parallel_jsd(ref_logits, logits, group, beta=cfg.jsd_beta, **common)
        p, q = (logits, ref_logits) if cfg.direction == "reverse" else (ref_logits, logits)
        return vocab_parallel_kl(p, q, group, **common)

    def _topk_divergence(self, logits, batch, mask, group) -> torch.Tensor:
        """``[B, S]`` divergence over the teacher's top-k (``mrl.losses.distill_topk``); 0 at invalid tokens."""
        cfg = self.config
        k = cfg.teacher_topk
        ids, teacher = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]  # [B, S, k] each (checked)
        distinct = torch.arange(k, device=ids.device).expand_as(ids)  # invalid positions: any k distinct ids
        safe_ids = torch.where(mask.unsqueeze(-1), ids, distinct)  # [B, S, k]
        bucket = cfg.topk_tail == "bucket"
        student = vocab_parallel_logprobs_at(logits, safe_ids, group, rest=bucket, temperature=cfg.temperature,
                                             vocab_size=self.vocab_size, chunk_size=cfg.chunk_size)
        student, rest = student if bucket else (student, None)  # [B, S, k], [B, S] (the bucket's log-mass)
        teacher = torch.where(mask.unsqueeze(-1), teacher.detach().float(), torch.full_like(student, -math.log(k)))
        divergence = topk_divergence(student, teacher, tail=cfg.topk_tail, direction=cfg.direction,
                                     beta=cfg.jsd_beta, student_rest=rest)  # [B, S]
        return torch.where(mask, divergence, torch.zeros_like(divergence))
