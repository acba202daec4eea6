"""The loss interface: batch keys, global denominators, shared config fields, input checks.

Calling convention. Every loss object is called once per micro-batch as

    loss, metrics = loss_fn(output, batch, counts, group)

- ``output``: the model's output for the micro-batch: the logits ``[B, S, V/tp]`` (this rank's
  vocabulary shard of the TP group ``group``) or, with ``model.fused_head``, a ``FusedHead`` that
  the ops take in their place, or the tuple ``(logits, values)`` when the model
  has a value head, ``values`` ``[B, S]`` (the PPO critic). A loss that needs values raises
  ``ValueError`` when it gets bare logits; one that does not ignores them.
- ``batch``: dict of tensors, keys below (``BATCH_KEYS``).
- ``counts``: ``GlobalCounts`` of the whole step, from ``compute_global_counts`` (sums over every
  micro-batch and DP rank). Each loss divides by these, so the trainer SUMS the micro-batch losses
  and gets the global mean, the same for every TP size, micro-batch count and DP size.
- ``group``: the TP process group the logits are sharded over (None: unsharded).

It returns the scalar loss (a fragment of the global mean) and ``dict[str, Metric]`` to feed a
``MetricsAccumulator``. Each loss declares ``required_keys`` (missing ones raise ``ValueError``
naming them) and ``normalizer`` ("tokens", "seqs" or "pairs"), the count its loss is divided by.

``Loss.__call__`` is the same for every loss and cannot be overridden: it splits the model
output, checks the keys, the logits' and labels' shapes, the loss's own inputs
(``check_inputs``) and, in one device reduction, their values, builds the token mask, then calls
the loss's ``compute`` with the checked ``LossInputs`` and adds the token / sequence counts to its
metrics. A new loss implements ``compute`` (and ``check_inputs`` for inputs beyond the labels).

Valid tokens are those with ``labels != ignore_index`` and, when given, ``loss_mask != 0``.

Input checks. Shapes and keys are checked on the host (free). Values (labels inside the
vocabulary, finite advantages / log-probs / returns at valid tokens) are checked with ONE combined
device reduction and one host sync per micro-batch; set ``validate: false`` in the loss config to
skip it on a GPU run that cannot afford the sync.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from mrl.config.checks import require_optional_positive_ints
from mrl.losses.metrics import Metric, Metrics
from mrl.ops.fused_head import FusedHead

IGNORE_INDEX = -100

BATCH_KEYS: dict[str, str] = {
    "labels": "[B, S] int: global next-token ids; ignore_index where there is no loss (required)",
    "loss_mask": "[B, S] 0/1: optional further mask (e.g. prompt tokens 0, response tokens 1)",
    "advantages": "[B, S] or [B] float: advantages (per token, or per sequence broadcast over tokens)",
    "old_logprobs": "[B, S] float: log π_old(label) of the policy the PPO ratio is taken against",
    "ref_logprobs": "[B, S] float: log π_ref(label) of the reference model (sampled KL estimators, DPO)",
    "ref_logits": "[B, S, V/tp] float: reference / teacher logits, sharded like the logits (exact KL)",
    "behaviour_logprobs": "[B, S] float: log-probs of the policy that generated the data (off-policy IS)",
    "returns": "[B, S] float: value targets of the critic",
    "old_values": "[B, S] float: critic values at rollout time (value clipping)",
    "ref_seq_logps": "[B] float: DPO reference log-prob of each row, reduced like the policy's",
    "aot_partner": "[B] float: AOT's sorted reference margin matched with pair i (row 2i; DPOLoss.prepare_step)",
    "aot_unpaired_partner": "[B] float: AOT-unpaired's sorted partner of each row's log-ratio (DPOLoss.prepare_step)",
    "bco_shift": "[B] float: BCO's running reward shift δ (DPOLoss.prepare_step)",
    "teacher_topk_ids": "[B, S, k] int: global ids of the teacher's k most likely tokens (top-k distillation)",
    "teacher_topk_logprobs": "[B, S, k] float: the teacher's log-probs of those ids (full-vocabulary softmax)",
}
"""Documented batch keys. DPO rows are paired: row 2i is chosen, row 2i + 1 rejected."""


@dataclass(frozen=True)
class GlobalCounts:
    """Denominators of one training step, summed over every micro-batch and DP rank."""

    num_tokens: int
    """Valid tokens (``labels != ignore_index`` and ``loss_mask``) in the global batch."""

    num_seqs: int
    """Rows with at least one valid token in the global batch."""

    num_pairs: int | None = None
    """DPO pairs (rows 2i, 2i + 1) with valid tokens in both rows; None unless computed ``paired``."""

    num_chosen_tokens: int | None = None
    """Valid tokens of the chosen rows (2i) of those pairs; None unless computed ``paired``."""


def token_mask(batch: Mapping[str, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The [B, S] bool mask of valid tokens: ``labels != ignore_index`` and ``loss_mask != 0``."""
    if "labels" not in batch:
        raise ValueError("batch is missing required key 'labels'")
    labels = batch["labels"]
    if labels.dim() != 2:
        raise ValueError(f"batch['labels'] must be [B, S], got shape {tuple(labels.shape)}")
    mask = labels != ignore_index
    if "loss_mask" in batch:
        loss_mask = batch["loss_mask"]
        if loss_mask.shape != labels.shape:
            raise ValueError(
                f"batch['loss_mask'] has shape {tuple(loss_mask.shape)}, expected {tuple(labels.shape)} like labels"
            )
        mask = mask & (loss_mask != 0)
    return mask


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B/2] bool: pairs (rows 2i, 2i + 1) whose both rows have a valid token."""
    if mask.shape[0] % 2 != 0:
        raise ValueError(f"paired (DPO) batches need an even number of rows, got {mask.shape[0]}")
    row_valid = mask.any(-1)  # [B]
    return row_valid[0::2] & row_valid[1::2]


def compute_global_counts(
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    group=None,
    *,
    ignore_index: int = IGNORE_INDEX,
    paired: bool = False,
) -> GlobalCounts:
    """Count valid tokens / sequences (/ pairs) of this rank's micro-batches, summed over ``group``.

    ``group`` is the DP group (None: one rank). One all-reduce and one host sync per step.
    """
    if not micro_batches:
        raise ValueError("compute_global_counts needs at least one micro-batch")
    device = micro_batches[0]["labels"].device if "labels" in micro_batches[0] else None
    totals = torch.zeros(4, dtype=torch.int64, device=device)  # tokens, seqs, pairs, chosen tokens
    for batch in micro_batches:
        mask = token_mask(batch, ignore_index)  # [B, S]
        pairs = chosen = torch.zeros((), dtype=torch.int64, device=device)
        if paired:
            valid = pair_mask(mask)  # [B/2]
            pairs, chosen = valid.sum(), (mask[0::2] & valid.unsqueeze(-1)).sum()
        totals += torch.stack([mask.sum(), mask.any(-1).sum(), pairs, chosen]).to(totals)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    tokens, seqs, pairs, chosen = totals.tolist()
    return GlobalCounts(num_tokens=tokens, num_seqs=seqs, num_pairs=pairs if paired else None,
                        num_chosen_tokens=chosen if paired else None)


@dataclass(frozen=True)
class BatchNeeds:
    """What a loss's batches must carry beyond the data, so the trainer can provide it
    (``Loss.batch_needs``). The trainer asks; it never compares loss or algorithm names."""

    keys: tuple[str, ...] = ("labels",)
    """Batch keys the loss reads (its ``required_keys``); missing ones raise ``ValueError``."""

    temperature: float = 1.0
    """Temperature of the loss's softmax; log-prob passes for it (reference, old policy) use it too."""

    reference_logprobs: bool = False
    """``ref_logprobs``: log-probs of the labels under the frozen reference model."""

    reference_logits: bool = False
    """``ref_logits``: the reference's vocab-sharded logits beside them (exact KL, distillation)."""

    reference_topk: int | None = None
    """k: the reference's k most likely tokens per position beside them, ``teacher_topk_ids`` and
    ``teacher_topk_logprobs`` ``[B, S, k]`` (top-k distillation; its logits are not kept)."""

    old_logprobs: bool = False
    """``old_logprobs``: the policy's log-probs before the step's update (PPO ratio, step
    statistics), unless the batches already carry them."""

    value_targets: bool = False
    """The loss trains the value head as a critic: with ``model.value_head`` the old-policy pass
    also stores ``old_values``, and the RL trainers set the critic's targets (``returns``) and
    advantages from them."""


@dataclass
class LossConfigBase:
    """Fields shared by every loss config."""

    ignore_index: int = IGNORE_INDEX
    """Label value marking tokens without loss."""

    chunk_size: int | None = None
    """Tokens per chunk in the vocab-parallel ops (bounds their fp32 temporaries), or per tile of the
    fused head (``model.fused_head``); null: the ops' default."""

    validate: bool = True
    """Check input values (labels in the vocabulary, finite advantages / log-probs) each micro-batch,
    at the cost of one device-to-host sync; shapes and keys are always checked."""

    def __post_init__(self) -> None:
        require_optional_positive_ints(self, ("chunk_size",))
        if not isinstance(self.validate, bool):
            raise ValueError(f"validate must be true or false, got {self.validate!r}")


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's inputs after ``Loss.__call__`` checked them: what ``Loss.compute`` gets."""

    logits: Any
    """``[B, S, V/tp]`` this rank's vocabulary shard of the logits (a tensor, or a ``FusedHead``)."""

    values: torch.Tensor | None
    """``[B, S]`` the value head's output, or None when the model has none."""

    batch: Mapping[str, torch.Tensor]
    """The micro-batch (``BATCH_KEYS``)."""

    mask: torch.Tensor
    """``[B, S]`` bool: valid tokens (``token_mask``)."""

    safe_labels: torch.Tensor
    """``[B, S]`` the labels, with ``ignore_index`` at every invalid token."""

    checked: dict[str, torch.Tensor]
    """The float inputs ``check_inputs`` returned (shape-checked; finite at valid tokens when the
    config's ``validate`` is on; NaN/inf may remain at invalid ones)."""

    counts: GlobalCounts
    """The step's global denominators."""

    group: Any = None
    """The TP process group the logits are sharded over (None: unsharded)."""


class Loss(abc.ABC):
    """A loss object: ``loss_fn(output, batch, counts, group) -> (loss, metrics)`` (module docstring).

    Subclasses implement ``compute`` and, for inputs beyond the labels, ``check_inputs`` (and
    ``value_flags``); ``__call__``, which checks every input first, is final.
    """

    kind: ClassVar[str]
    """The name ``build_loss`` selects this loss by."""

    required_keys: tuple[str, ...]
    """Batch keys this loss (with its config) needs; missing ones raise ``ValueError``."""

    normalizer: str
    """The global count the loss is divided by: "tokens", "seqs" or "pairs"."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides Loss.__call__, which validates every input before the loss; "
                            "implement compute() (and check_inputs() for the loss's own inputs) instead")

    def __init__(self, config: LossConfigBase, *, vocab_size: int | None = None) -> None:
        self.config = config
        self.vocab_size = vocab_size

    @property
    def batch_needs(self) -> BatchNeeds:
        """What this loss's batches need beyond the data; losses that read a reference, old-policy
        log-probs or a critic override it."""
        return BatchNeeds(keys=tuple(self.required_keys), temperature=getattr(self.config, "temperature", 1.0))

    def prepare_step(self, micro_batches: Sequence[dict], dp_group=None, tp_group=None) -> None:
        """Called once per step on the step's micro-batches after the trainer added what
        ``batch_needs`` asks for, before the first forward: a loss that reads statistics of the
        whole step writes them into the batches here. Nothing by default."""

    def state_dict(self) -> dict:
        """State the loss carries from step to step (e.g. a running mean), saved in checkpoints as
        the last pipeline stage holds it (where the loss runs); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict`` from a checkpoint. Nothing by default."""

    def __call__(
        self, output, batch: Mapping[str, torch.Tensor], counts: GlobalCounts, group=None
    ) -> tuple[torch.Tensor, Metrics]:
        """The micro-batch's fragment of the global loss, and its metrics (after every check)."""
        cfg = self.config
        logits, values = split_model_output(output)  # [B, S, V/tp], [B, S] or None
        require_keys(batch, self.required_keys, self.kind)
        labels = batch["labels"]  # [B, S]
        check_logits(logits, labels)
        mask = token_mask(batch, cfg.ignore_index)  # [B, S]
        checked = self.check_inputs(batch, logits, values, counts)
        if cfg.validate:
            num_labels = vocab_limit(logits, group, self.vocab_size)
            check_values(labels, mask, num_labels, checked, self.value_flags(batch, mask, num_labels))
        safe_labels = torch.where(mask, labels, torch.full_like(labels, cfg.ignore_index))
        loss, metrics = self.compute(LossInputs(logits=logits, values=values, batch=batch, mask=mask,
                                                safe_labels=safe_labels, checked=checked, counts=counts, group=group))
        metrics.update(count_metrics(mask))
        return loss, metrics

    def check_inputs(self, batch: Mapping[str, torch.Tensor], logits, values: torch.Tensor | None,
                     counts: GlobalCounts) -> dict[str, torch.Tensor]:
        """Host-side checks of the loss's own inputs (shapes, keys chosen at run time, the value
        head, the counts it divides by), raising ``ValueError`` naming what is wrong. Returns the
        float tensors ([B, S] or [B]) whose values must be finite at valid tokens; the labels and
        logits are checked already. Nothing by default."""
        return {}

    def value_flags(self, batch: Mapping[str, torch.Tensor], mask: torch.Tensor,
                    num_labels: int) -> dict[str, torch.Tensor]:
        """Further value checks joined into the one device reduction of ``check_values``: a 0-d
        bool tensor per problem description, true when the problem is present. None by default."""
        return {}

    @abc.abstractmethod
    def compute(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        """The micro-batch's fragment of the global loss, and its metrics (``count_metrics`` are added)."""


def split_model_output(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, values)`` from a model output that is logits or a ``(logits, values)`` tuple."""
    if isinstance(output, (torch.Tensor, FusedHead)):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    raise ValueError("model output must be the logits tensor or a (logits, values) tuple")


def require_keys(batch: Mapping[str, torch.Tensor], keys: Sequence[str], loss_name: str) -> None:
    """Raise ``ValueError`` naming every key of ``keys`` missing from ``batch``."""
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"{loss_name} loss: batch is missing required key(s) {missing}")


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Logits must be [B, S, V/tp] over the same [B, S] as the labels."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, S, V/tp] with [B, S] = labels' {tuple(labels.shape)}, got {tuple(logits.shape)}"
        )


def check_shape(batch: Mapping[str, torch.Tensor], key: str, *shapes: torch.Size | tuple) -> torch.Tensor:
    """``batch[key]`` after checking its shape is one of ``shapes``."""
    tensor = batch[key]
    if not isinstance(tensor, (torch.Tensor, FusedHead)) or tuple(tensor.shape) not in [tuple(s) for s in shapes]:
        got = tuple(tensor.shape) if isinstance(tensor, (torch.Tensor, FusedHead)) else type(tensor).__name__
        raise ValueError(f"batch[{key!r}] must have shape {' or '.join(str(tuple(s)) for s in shapes)}, got {got}")
    return tensor


def vocab_limit(logits: torch.Tensor, group, vocab_size: int | None) -> int:
    """The number of valid label ids: ``vocab_size`` or the padded vocabulary V/tp · tp."""
    tp = 1 if group is None else dist.get_world_size(group)
    return logits.shape[-1] * tp if vocab_size is None else vocab_size


def check_values(
    labels: torch.Tensor,
    mask: torch.Tensor,
    num_labels: int,
    tensors: Mapping[str, torch.Tensor],
    flags: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """One combined device check, one host sync: labels in [0, num_labels) at valid tokens, every
    tensor of ``tensors`` finite at valid tokens (``[B]`` tensors: in rows with a valid token), and
    no flag of ``flags`` (problem description -> 0-d bool) set. Raises ``ValueError`` naming each
    offending tensor and problem."""
    details = [f"labels outside the vocabulary [0, {num_labels})"]
    checks = [(mask & ((labels < 0) | (labels >= num_labels))).any()]
    row_valid = mask.any(-1)  # [B]
    for name, tensor in tensors.items():
        where = mask if tensor.shape == mask.shape else row_valid
        details.append(f"{name} has NaN/inf at valid positions")
        checks.append((where & ~torch.isfinite(tensor)).any())
    for problem, flag in (flags or {}).items():
        details.append(problem)
        checks.append(flag.reshape(()).to(device=checks[0].device, dtype=torch.bool))
    bad = torch.stack(checks)
    if not bool(bad.any()):
        return
    raise ValueError("invalid loss inputs: " + "; ".join(d for d, flag in zip(details, bad.tolist()) if flag))


def masked_fill_invalid(tensor: torch.Tensor, mask: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """``tensor`` with ``value`` at invalid positions, so NaN/inf padding never reaches the backward."""
    where = mask if tensor.shape == mask.shape else mask.any(-1)
    return torch.where(where, tensor, torch.full_like(tensor, value))


def count_metrics(mask: torch.Tensor) -> Metrics:
    """``num_tokens`` and ``num_seqs`` of a micro-batch (raw counts, summed across micro-batches and ranks)."""
    return {"num_tokens": Metric.count(mask.sum()), "num_seqs": Metric.count(mask.any(-1).sum())}
