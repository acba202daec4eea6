"""Deterministic, resumable global-batch sampling for data-parallel training.

The dataset's sampling units (an example, a preference pair, a rollout group) are shuffled per
epoch with a seed and read as one endless stream, epoch after epoch: a global batch may span an
epoch boundary, so no unit is ever dropped. Each optimizer step takes the next
``global_batch_size`` rows of the stream:

    global batch = micro_batch_size × num_microbatches × dp_size rows
    DP rank r gets rows [r·m·k, (r+1)·m·k) of it (m = micro_batch_size, k = num_microbatches),
    split into k micro-batches of m rows

A unit's rows are consecutive in the stream, so a unit is never split across global batches;
``unit_in_micro_batch`` also requires the micro-batch size to be a multiple of the unit size,
which keeps each unit inside one micro-batch. The state is the stream position, independent of
the DP degree, so a run may resume on another number of ranks.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np


class GlobalBatchSampler:
    """Yields, per optimizer step, this DP rank's micro-batches as lists of dataset rows."""

    def __init__(
        self,
        *,
        num_units: int,
        unit_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        shuffle: bool = True,
        seed: int = 0,
        unit_in_micro_batch: bool = False,
    ) -> None:
        for name, value in (("num_units", num_units), ("unit_size", unit_size),
                            ("global_batch_size", global_batch_size),
                            ("micro_batch_size", micro_batch_size), ("dp_size", dp_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by micro_batch_size="
                f"{micro_batch_size} × dp={dp_size}"
            )
        if global_batch_size % unit_size != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of the dataset's unit of "
                f"{unit_size} rows (a preference pair or a rollout group stays in one global batch)"
            )
        if unit_in_micro_batch and micro_batch_size % unit_size != 0:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} is not a multiple of the dataset's unit of "
                f"{unit_size} rows (a preference pair stays in one micro-batch)"
            )
        self.num_units, self.unit_size = num_units, unit_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.offset = 0, 0  # next unit: position `offset` of epoch `epoch`'s order
        self._order: Optional[tuple[int, np.ndarray]] = None  # (epoch, permutation) cache

    @property
    def units_per_step(self) -> int:
        return self.global_batch_size // self.unit_size

    @property
    def consumed_rows(self) -> int:
        """Rows handed out so far (all ranks together)."""
        return (self.epoch * self.num_units + self.offset) * self.unit_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The unit order of ``epoch``: a permutation seeded by (seed, epoch), or identity."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_units)
            else:
                order = np.arange(self.num_units)
            self._order = (epoch, order)
        return self._order[1]

    def next_units(self) -> list[int]:
        """The next global batch's units, advancing the stream."""
        units: list[int] = []
        while len(units) < self.units_per_step:
            take = min(self.units_per_step - len(units), self.num_units - self.offset)
            units.extend(self.epoch_order(self.epoch)[self.offset:self.offset + take].tolist())
            self.offset += take
            if self.offset == self.num_units:
                self.epoch, self.offset = self.epoch + 1, 0
        return units

    def next_step(self) -> list[list[int]]:
        """This DP rank's micro-batches (lists of dataset rows) for the next optimizer step."""
        rows = [u * self.unit_size + j for u in self.next_units() for j in range(self.unit_size)]
        per_rank = self.micro_batch_size * self.num_microbatches
        mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i:i + m] for i in range(0, per_rank, m)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "num_units": self.num_units,
                "unit_size": self.unit_size, "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; the dataset and shuffle settings must be the same."""
        for key in ("num_units", "unit_size", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data sampler: checkpoint has {key}={state[key]!r}, "
                    f"this run has {key}={getattr(self, key)!r}"
                )
        if not 0 <= state["offset"] < self.num_units or state["epoch"] < 0:
            raise ValueError(f"invalid data sampler position epoch={state['epoch']} offset={state['offset']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
