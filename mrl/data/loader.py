"""The per-rank data loader: sampler + dataset + collator, one optimizer step at a time."""

from __future__ import annotations

from typing import Any, Iterator

from mrl.data.collate import Batch, Collator
from mrl.data.datasets import PromptDataset, TokenizedDataset
from mrl.data.sampler import GlobalBatchSampler


class DataLoader:
    """Yields this DP rank's list of collated micro-batches for each optimizer step.

    Checkpoint ``state_dict()``; after ``load_state_dict()`` the following steps are exactly those
    the saved run would have produced.
    """

    def __init__(self, dataset: TokenizedDataset, sampler: GlobalBatchSampler, collator: Collator) -> None:
        if isinstance(dataset, PromptDataset):
            raise TypeError(
                "prompt datasets feed generation, not collated batches; sample them with GlobalBatchSampler"
            )
        self.dataset, self.sampler, self.collator = dataset, sampler, collator

    def next_step(self) -> list[Batch]:
        return [self.collator([self.dataset[r] for r in rows], rows) for rows in self.sampler.next_step()]

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def build_sampler(dataset: TokenizedDataset, *, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> GlobalBatchSampler:
    """The sampler for ``dataset`` with its config's shuffle and seed (batch sizes in rows)."""
    return GlobalBatchSampler(
        num_units=dataset.num_units, unit_size=dataset.unit_size, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        shuffle=dataset.config.shuffle, seed=dataset.config.seed,
        unit_in_micro_batch=dataset.unit_in_micro_batch,
    )


def build_data_loader(dataset: TokenizedDataset, *, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int, pad_to_multiple_of: int = 1) -> DataLoader:
    """A loader for this DP rank. ``pad_to_multiple_of`` is the parallel layout's requirement,
    combined with data.pad_to_multiple_of (``ValueError`` when data.seq_length is no multiple)."""
    config = dataset.config.aligned_to(pad_to_multiple_of)
    sampler = build_sampler(dataset, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                            dp_rank=dp_rank, dp_size=dp_size)
    collator = Collator(seq_length=config.seq_length, pad_id=dataset.tokenizer.pad_id, pad_to=config.pad_to,
                        pad_to_multiple_of=config.pad_to_multiple_of)
    return DataLoader(dataset, sampler, collator)
