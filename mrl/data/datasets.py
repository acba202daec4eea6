"""Tokenized datasets for SFT, preference (DPO), offline rollouts (GRPO/PPO) and prompts.

Every dataset is a list of rows (one row = one sequence, or one packed row), grouped into
sampling units that the sampler keeps together:

  SFTDataset         unit = 1 row (a packed row under data.packing)
  PreferenceDataset  unit = 2 rows: row 2i is pair i's chosen sequence, row 2i+1 its rejected;
                     a unit never straddles micro-batches
  RolloutDataset     unit = one prompt's group of G responses, rows g·G .. g·G+G-1; a unit
                     never straddles global batches
  PromptDataset      unit = 1 prompt (for online generation; not collated into a Batch)

Record formats (one JSON object per line; other keys are ignored):
  sft         {"prompt": str, "response": str}  or  {"text": str}
  preference  {"prompt": str, "chosen": str, "rejected": str}
  rollout     {"prompt": str, "responses": [str], "rewards": [number],
               "logprobs": [[number]] (optional), "truncated": [bool] (optional)}
  prompt      {"prompt": str, "answer": any (optional), ...}

A response ends with eos unless its rollout record marks it truncated (cut at the generation
limit). Rollout ``logprobs[i]`` are the behaviour policy's log-probabilities of response i's
tokens, eos included when it ends with eos, so their count must equal that token count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import numpy as np

from mrl.data.config import DataConfig
from mrl.data.packing import pack_best_fit
from mrl.data.records import (
    RecordError, Skipped, check_number, check_str, get_list, get_str, read_jsonl, resolve_path,
    type_name,
)
from mrl.data.sequences import TokenSequence, align_to_labels, build_sequences, fit_prompt, prefix_for
from mrl.data.tokenizer import Tokenizer, build_tokenizer

T = TypeVar("T")

# Behaviour log-probs may exceed 0 by this much (rounding in the inference engine).
LOGPROB_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Example:
    """One row before collation."""

    tokens: np.ndarray
    """[n] int64 token ids."""
    labels: np.ndarray
    """[n] int64 next-token labels, IGNORE_INDEX (-100) where no loss."""
    loss_mask: np.ndarray
    """[n] float32, 1 where labels has a target."""
    position_ids: np.ndarray
    """[n] int64 positions; restart at 0 for every packed document."""
    source: str
    """'path:line' of the record (of the first document in a packed row)."""
    segment_ids: Optional[np.ndarray] = None
    """[n] int64 document number 1, 2, ... inside a packed row; None when not packed."""
    reward: Optional[float] = None
    """Rollout: the response's reward."""
    group_id: Optional[int] = None
    """Rollout: the prompt's group number (the same for all of its responses)."""
    behaviour_logprobs: Optional[np.ndarray] = None
    """Rollout with logprobs: [n] float32 aligned with labels (0 where no target)."""


def _example(seq: TokenSequence, source: str, **extra: Any) -> Example:
    return Example(seq.tokens, seq.labels(), seq.loss_mask(),
                   np.arange(len(seq), dtype=np.int64), source, **extra)


class TokenizedDataset(ABC):
    """Rows of one JSONL file with their sampling units; see the module docstring."""

    kind: str
    unit_size: int = 1
    """Rows per sampling unit."""
    unit_in_micro_batch: bool = False
    """True when a unit must stay inside one micro-batch (not only one global batch)."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.path = str(resolve_path(config.source))
        self.skipped: list[Skipped] = []
        """Records left out under data.skip_malformed, with their reasons."""
        self._prefix = prefix_for(tokenizer.bos_id)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_units(self) -> int:
        return len(self) // self.unit_size

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, row: int) -> Example: ...

    def _read(self, convert: Callable[[dict[str, Any]], T]) -> list[tuple[int, T]]:
        items, self.skipped = read_jsonl(self.config.source, convert, skip_malformed=self.config.skip_malformed,
                                         max_records=self.config.max_records)
        return items

    def _encode_response(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def _fit(self, prompt: list[int], responses: list[list[int]]) -> list[TokenSequence]:
        return build_sequences(self._prefix, prompt, responses, seq_length=self.config.seq_length,
                               truncation=self.config.truncation)

    def _check_row(self, row: int) -> int:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for a dataset of {len(self)} rows")
        return row % len(self)


class SFTDataset(TokenizedDataset):
    """Supervised fine-tuning: loss on the response (and eos), or on all of a {"text"} record."""

    kind = "sft"

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        items = self._read(self._convert)
        self.sequences = [seq for _, seq in items]
        self.lines = [line for line, _ in items]
        self.packs: Optional[list[list[int]]] = None
        """Under packing: the sequence indices of each row."""
        if config.packing:
            self.packs = pack_best_fit([len(s) for s in self.sequences], config.seq_length)

    def _convert(self, record: dict[str, Any]) -> TokenSequence:
        if "text" in record:
            if "prompt" in record or "response" in record:
                raise RecordError("an SFT record has either 'text' or 'prompt'/'response', not both")
            return self._fit([], [self._encode_response(get_str(record, "text"))])[0]
        if "prompt" not in record and "response" not in record:
            raise RecordError("an SFT record needs 'prompt' and 'response', or 'text'")
        prompt = self.tokenizer.encode(get_str(record, "prompt", allow_empty=True))
        return self._fit(prompt, [self._encode_response(get_str(record, "response"))])[0]

    def __len__(self) -> int:
        return len(self.sequences) if self.packs is None else len(self.packs)

    def __getitem__(self, row: int) -> Example:
        row = self._check_row(row)
        if self.packs is None:
            return _example(self.sequences[row], f"{self.path}:{self.lines[row]}")
        docs = [self.sequences[i] for i in self.packs[row]]
        return Example(
            tokens=np.concatenate([d.tokens for d in docs]),
            labels=np.concatenate([d.labels() for d in docs]),
            loss_mask=np.concatenate([d.loss_mask() for d in docs]),
            position_ids=np.concatenate([np.arange(len(d), dtype=np.int64) for d in docs]),
            segment_ids=np.concatenate([np.full(len(d), k + 1, dtype=np.int64) for k, d in enumerate(docs)]),
            source=f"{self.path}:{self.lines[self.packs[row][0]]}",
        )


class PreferenceDataset(TokenizedDataset):
    """Preference pairs for DPO: rows 2i (chosen) and 2i+1 (rejected) share pair i's prompt."""

    kind = "preference"
    unit_size = 2
    unit_in_micro_batch = True

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        items = self._read(self._convert)
        self.pairs = [pair for _, pair in items]
        self.lines = [line for line, _ in items]

    def _convert(self, record: dict[str, Any]) -> list[TokenSequence]:
        prompt = self.tokenizer.encode(get_str(record, "prompt", allow_empty=True))
        chosen, rejected = get_str(record, "chosen"), get_str(record, "rejected")
        if chosen == rejected:
            raise RecordError("'chosen' and 'rejected' are identical")
        return self._fit(prompt, [self._encode_response(chosen), self._encode_response(rejected)])

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, row: int) -> Example:
        row = self._check_row(row)
        return _example(self.pairs[row // 2][row % 2], f"{self.path}:{self.lines[row // 2]}")


@dataclass(frozen=True)
class _Group:
    sequences: list[TokenSequence]
    rewards: list[float]
    logprobs: Optional[list[np.ndarray]]  # per response, aligned with labels


class RolloutDataset(TokenizedDataset):
    """Offline rollouts for GRPO/PPO: each prompt's group of responses with rewards.

    Every record must have the same number of responses (data.group_size, or the first valid
    record's count) and all records must agree on having behaviour log-probs or not.
    """

    kind = "rollout"

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        self.group_size: Optional[int] = config.group_size
        self.has_logprobs: Optional[bool] = None
        items = self._read(self._convert)
        self.groups = [group for _, group in items]
        self.lines = [line for line, _ in items]
        self.unit_size = self.group_size

    def _convert(self, record: dict[str, Any]) -> _Group:
        prompt = self.tokenizer.encode(get_str(record, "prompt", allow_empty=True))
        texts = [check_str(v, f"responses[{i}]") for i, v in enumerate(get_list(record, "responses"))]
        rewards = [check_number(v, f"rewards[{i}]") for i, v in enumerate(get_list(record, "rewards"))]
        if len(rewards) != len(texts):
            raise RecordError(f"field 'rewards' has {len(rewards)} entries but 'responses' has {len(texts)}")
        if self.group_size is not None and len(texts) != self.group_size:
            raise RecordError(
                f"record has {len(texts)} responses but the group size is {self.group_size} "
                "(data.group_size, or the first record's count)"
            )
        truncated = self._truncated(record, len(texts))
        responses = [self.tokenizer.encode(t) + ([] if cut else [self.tokenizer.eos_id])
                     for t, cut in zip(texts, truncated)]
        logprobs = self._logprobs(record, responses, truncated)
        sequences = self._fit(prompt, responses)
        aligned = None if logprobs is None else [align_to_labels(lp, s) for lp, s in zip(logprobs, sequences)]
        self.group_size = len(texts)
        self.has_logprobs = logprobs is not None
        return _Group(sequences, rewards, aligned)

    @staticmethod
    def _truncated(record: dict[str, Any], count: int) -> list[bool]:
        if "truncated" not in record:
            return [False] * count
        flags = get_list(record, "truncated")
        if len(flags) != count:
            raise RecordError(f"field 'truncated' has {len(flags)} entries but 'responses' has {count}")
        for i, flag in enumerate(flags):
            if not isinstance(flag, bool):
                raise RecordError(f"truncated[{i}] must be a boolean, got {flag!r}")
        return flags

    def _logprobs(self, record: dict[str, Any], responses: list[list[int]],
                  truncated: list[bool]) -> Optional[list[list[float]]]:
        present = "logprobs" in record
        if self.has_logprobs is not None and present != self.has_logprobs:
            raise RecordError(
                f"record {'has' if present else 'lacks'} 'logprobs' but earlier records "
                f"{'do not' if present else 'have them'} (all records of a rollout file must agree)"
            )
        if not present:
            return None
        rows = get_list(record, "logprobs")
        if len(rows) != len(responses):
            raise RecordError(f"field 'logprobs' has {len(rows)} entries but 'responses' has {len(responses)}")
        out = []
        for i, (row, tokens, cut) in enumerate(zip(rows, responses, truncated)):
            if not isinstance(row, list):
                raise RecordError(f"logprobs[{i}] must be an array, got {type_name(row)}")
            if len(row) != len(tokens):
                what = f"{len(tokens)} tokens" if cut else f"{len(tokens) - 1} tokens + eos"
                raise RecordError(f"logprobs[{i}] has {len(row)} entries but response {i} has {what}")
            values = [check_number(v, f"logprobs[{i}][{j}]") for j, v in enumerate(row)]
            worst = max(values)
            if worst > LOGPROB_TOLERANCE:
                raise RecordError(f"logprobs[{i}] holds {worst} > 0, which is no log-probability")
            out.append(values)
        return out

    def __len__(self) -> int:
        return len(self.groups) * self.group_size

    def __getitem__(self, row: int) -> Example:
        row = self._check_row(row)
        g, j = divmod(row, self.group_size)
        group = self.groups[g]
        return _example(
            group.sequences[j], f"{self.path}:{self.lines[g]}", reward=group.rewards[j], group_id=g,
            behaviour_logprobs=None if group.logprobs is None else group.logprobs[j],
        )


@dataclass(frozen=True)
class PromptExample:
    """A prompt for online generation."""

    tokens: np.ndarray
    """[n] int64: [bos] + prompt tokens, leaving room for at least one generated token."""
    prompt: str
    answer: Any
    """The record's 'answer' (reference for the reward function), or None."""
    record: dict[str, Any]
    source: str


class PromptDataset(TokenizedDataset):
    """Prompts (with optional reference answers) for online GRPO/PPO generation."""

    kind = "prompt"

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        items = self._read(self._convert)
        self.items = [item for _, item in items]
        self.lines = [line for line, _ in items]

    def _convert(self, record: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        prompt = self.tokenizer.encode(get_str(record, "prompt"))
        tokens = fit_prompt(self._prefix, prompt, seq_length=self.config.seq_length,
                            truncation=self.config.truncation)
        return tokens, record

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> PromptExample:  # type: ignore[override]
        row = self._check_row(row)
        tokens, record = self.items[row]
        return PromptExample(tokens, record["prompt"], record.get("answer"), record,
                             f"{self.path}:{self.lines[row]}")


_DATASETS: dict[str, type[TokenizedDataset]] = {
    "sft": SFTDataset, "preference": PreferenceDataset, "rollout": RolloutDataset, "prompt": PromptDataset,
}


def build_dataset(config: DataConfig, tokenizer: Optional[Tokenizer] = None) -> TokenizedDataset:
    """Read and tokenize ``config.source``; raises ``DataError`` for malformed data."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.tokenizer)
    return _DATASETS[config.kind](config, tokenizer)

