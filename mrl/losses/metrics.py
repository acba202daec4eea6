"""Loss metrics that carry their own cross-rank reduction.

A loss returns ``dict[str, Metric]`` per micro-batch. Each ``Metric`` says how it combines:

- ``"sum"``: a fragment ``local_sum / global_count``. Fragments add up over micro-batches and DP
  ranks to the global mean, whatever the layout (this is how every mean is logged).
- ``"count"``: a raw count (tokens, sequences, pairs); summed.
- ``"min"`` / ``"max"``: extremes over valid tokens; an empty micro-batch contributes the identity
  (+inf / -inf), and an extreme over no token at all is reported as NaN.

``MetricsAccumulator`` combines micro-batches on the device (no host sync), and ``reduce(group)``
all-reduces across the DP group with ONE packed all-reduce per op kind: a SUM for fragments and
counts, a MAX for extremes (minima travel negated). Every rank must add the same metric names,
which losses built from the same config guarantee; a signature of the names rides in the MAX
buffer, so a mismatch raises instead of mixing values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Reduction = Literal["sum", "count", "min", "max"]
REDUCTIONS: tuple[str, ...] = ("sum", "count", "min", "max")


@dataclass(frozen=True)
class Metric:
    """One scalar metric of one micro-batch and the way it combines with others."""

    value: torch.Tensor
    """0-d tensor, detached, on the loss's device."""

    reduction: Reduction
    """How values of several micro-batches / ranks combine: "sum", "count", "min" or "max"."""

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"metric reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not isinstance(self.value, torch.Tensor) or self.value.dim() != 0:
            raise ValueError(f"metric value must be a 0-d tensor, got {self.value!r}")

    @classmethod
    def mean_fragment(cls, value: torch.Tensor) -> "Metric":
        """A ``local_sum / global_count`` fragment (summed across micro-batches and ranks)."""
        return cls(value.detach(), "sum")

    @classmethod
    def count(cls, value: torch.Tensor) -> "Metric":
        return cls(value.detach(), "count")

    @classmethod
    def min(cls, value: torch.Tensor) -> "Metric":
        return cls(value.detach(), "min")

    @classmethod
    def max(cls, value: torch.Tensor) -> "Metric":
        return cls(value.detach(), "max")

    def combine(self, other: "Metric") -> "Metric":
        """This metric merged with another micro-batch's value of the same metric."""
        if other.reduction != self.reduction:
            raise ValueError(f"cannot combine a {self.reduction!r} metric with a {other.reduction!r} one")
        if self.reduction == "min":
            value = torch.minimum(self.value, other.value)
        elif self.reduction == "max":
            value = torch.maximum(self.value, other.value)
        else:
            value = self.value + other.value
        return Metric(value, self.reduction)


Metrics = dict[str, Metric]


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> Metric:
    """Minimum of ``values`` where ``mask`` is set (+inf when nothing is)."""
    return Metric.min(_masked_extreme(values, mask, math.inf).amin())


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> Metric:
    """Maximum of ``values`` where ``mask`` is set (-inf when nothing is)."""
    return Metric.max(_masked_extreme(values, mask, -math.inf).amax())


def _masked_extreme(values: torch.Tensor, mask: torch.Tensor, identity: float) -> torch.Tensor:
    """``values`` where valid, ``identity`` elsewhere, flattened, with one extra ``identity``."""
    values = values.detach()
    kept = torch.where(mask.bool(), values, torch.full_like(values, identity)).reshape(-1)
    return torch.cat([kept, values.new_full((1,), identity)])


class MetricsAccumulator:
    """Combines the metrics of a step's micro-batches, then reduces them across DP ranks."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metrics: Mapping[str, Metric]) -> None:
        """Merge one micro-batch's metrics (device tensors; no host sync)."""
        for name, metric in metrics.items():
            held = self._metrics.get(name)
            self._metrics[name] = metric if held is None else held.combine(metric)

    def reduce(self, group=None) -> dict[str, float]:
        """All-reduce over ``group`` (the DP group; None = this rank only) and return floats.

        One SUM all-reduce (fragments, counts) and one MAX all-reduce (maxima, negated minima and
        the name signature); one host sync for the result.
        """
        names = sorted(self._metrics)
        summed = [n for n in names if self._metrics[n].reduction in ("sum", "count")]
        extreme = [n for n in names if self._metrics[n].reduction in ("min", "max")]
        device = self._device()
        sum_buf = torch.stack(
            [self._metrics[n].value.to(device, torch.float64) for n in summed]
        ) if summed else torch.zeros(0, dtype=torch.float64, device=device)
        signature = float(zlib.crc32(",".join(f"{n}:{self._metrics[n].reduction}" for n in names).encode()))
        max_parts = [
            self._metrics[n].value.to(device, torch.float64) * (-1.0 if self._metrics[n].reduction == "min" else 1.0)
            for n in extreme
        ]
        max_buf = torch.stack(
            max_parts + [torch.tensor(v, dtype=torch.float64, device=device) for v in (signature, -signature)]
        )
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sum_buf, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(max_buf, op=dist.ReduceOp.MAX, group=group)
        values = torch.cat([sum_buf, max_buf]).tolist()
        sig_max, neg_sig_min = values[-2], values[-1]
        if sig_max != -neg_sig_min:
            raise ValueError("metric names differ across ranks; every rank must log the same metrics")
        out = dict(zip(summed, values[: len(summed)]))
        for name, value in zip(extreme, values[len(summed) : len(summed) + len(extreme)]):
            value = -value if self._metrics[name].reduction == "min" else value
            out[name] = value if math.isfinite(value) else math.nan
        return {name: out[name] for name in names}

    def _device(self) -> torch.device:
        for metric in self._metrics.values():
            return metric.value.device
        return torch.device("cpu")
