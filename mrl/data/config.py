"""Typed configuration of a training data source: file, tokenizer, lengths and policies."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from mrl.config.checks import require_optional_positive_ints, require_positive_ints

BUILTIN_PREFIX = "builtin:"

# Embedded datasets shipped under mrl/data/builtin/ (regenerate with make_builtin.py).
# name -> the record kind the file holds; each kind's dataset is its default (data.path: null).
BUILTIN_DATASETS: dict[str, str] = {
    "reverse_sft": "sft",
    "reverse_preference": "preference",
    "reverse_rollout": "rollout",
    "reverse_prompts": "prompt",
}
DEFAULT_BUILTIN: dict[str, str] = {kind: BUILTIN_PREFIX + name for name, kind in BUILTIN_DATASETS.items()}

KINDS = ("sft", "preference", "rollout", "prompt")
TRUNCATIONS = ("error", "truncate_left_prompt", "truncate_right")
PAD_TO = ("seq_length", "longest")


@dataclass
class DataConfig:
    """One training data source and how it is tokenized, cut, padded and batched.

    Batch sizes elsewhere count sequences (rows): a preference pair is two rows, a rollout group of
    ``n`` responses is ``n`` rows.
    """

    kind: Literal["sft", "preference", "rollout", "prompt"] = "sft"
    """Record format: 'sft' ({"prompt","response"} or {"text"}), 'preference'
    ({"prompt","chosen","rejected"}), 'rollout' ({"prompt","responses","rewards"[,"logprobs",
    "truncated"]}) or 'prompt' ({"prompt"[,"answer",...]}, prompts for online generation)."""

    path: Optional[str] = None
    """JSONL file, or 'builtin:<name>' for a dataset embedded in the package; null selects the
    embedded reverse-word dataset of data.kind."""

    tokenizer: str = "byte"
    """'byte' for the built-in byte-level tokenizer, else a local directory (or file) holding a
    Hugging Face tokenizer.json (needs the 'hf' extra)."""

    seq_length: int = 64
    """Longest sequence (tokens, including bos/eos) a row may hold; with pad_to='seq_length' every
    row has exactly this length."""

    pad_to: Literal["seq_length", "longest"] = "seq_length"
    """'seq_length' pads every row to seq_length; 'longest' pads a micro-batch to its longest row
    rounded up to pad_to_multiple_of (variable shapes: pipeline parallelism then needs variable
    sequence lengths in its schedule)."""

    pad_to_multiple_of: int = 1
    """Padded lengths are multiples of this (the trainer raises it to what the parallel layout
    needs: tp under sequence parallelism, 2·cp, 16/32/128 for FP8); seq_length must be one too."""

    packing: bool = False
    """SFT only: pack several examples into each row (best-fit decreasing). Rows then carry
    segment_ids and per-document position_ids, and attend within their own document. Device cpu
    only for now (see mrl.data.collate: on GPU this needs Transformer Engine's THD layout)."""

    truncation: Literal["error", "truncate_left_prompt", "truncate_right"] = "error"
    """A sequence longer than seq_length is an error, or loses prompt tokens from the left (the
    response stays whole), or loses tokens from the right end (the response tail and eos)."""

    skip_malformed: bool = False
    """Skip malformed records instead of raising; skipped records are counted and their reasons
    kept on the dataset (dataset.num_skipped, dataset.skipped) and logged."""

    shuffle: bool = True
    """Shuffle the sampling units (examples, pairs, groups) afresh every epoch."""

    seed: int = 1234
    """Seed of the per-epoch shuffle."""

    max_records: Optional[int] = None
    """Read at most this many records (valid or skipped) from the file; None reads all."""

    group_size: Optional[int] = None
    """Rollout only: responses per prompt every record must have; None takes it from the first
    valid record."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"path must be a non-empty string or null, got {self.path!r}")
        if self.path is not None and self.path.startswith(BUILTIN_PREFIX):
            name = self.path[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_DATASETS:
                raise ValueError(
                    f"path={self.path!r} names no embedded dataset; known: "
                    f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)}"
                )
            if BUILTIN_DATASETS[name] != self.kind:
                raise ValueError(
                    f"path={self.path!r} holds {BUILTIN_DATASETS[name]!r} records but "
                    f"kind={self.kind!r}"
                )
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer must be 'byte' or a directory path, got {self.tokenizer!r}")
        require_positive_ints(self, ("seq_length", "pad_to_multiple_of"))
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2 (a token and its successor), got {self.seq_length}")
        if self.seq_length % self.pad_to_multiple_of != 0:
            raise ValueError(
                f"seq_length={self.seq_length} is not a multiple of "
                f"pad_to_multiple_of={self.pad_to_multiple_of}"
            )
        if self.pad_to not in PAD_TO:
            raise ValueError(f"pad_to must be one of {', '.join(PAD_TO)}, got {self.pad_to!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")
        if self.packing and self.kind != "sft":
            raise ValueError(f"packing applies to kind='sft' only, got kind={self.kind!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        require_optional_positive_ints(self, ("max_records",))
        if self.group_size is not None:
            if self.kind != "rollout":
                raise ValueError(f"group_size applies to kind='rollout' only, got kind={self.kind!r}")
            require_optional_positive_ints(self, ("group_size",))

    @property
    def source(self) -> str:
        """The path to read: data.path, or the kind's embedded dataset when it is null."""
        return DEFAULT_BUILTIN[self.kind] if self.path is None else self.path

    def aligned_to(self, multiple: int) -> "DataConfig":
        """This config with pad_to_multiple_of raised to lcm(pad_to_multiple_of, multiple).

        The trainer calls it with the layout's requirement; a seq_length that is no multiple of the
        result raises ``ValueError`` naming both.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"the layout's sequence-length multiple must be a positive integer, got {multiple!r}")
        combined = math.lcm(self.pad_to_multiple_of, multiple)
        if self.seq_length % combined != 0:
            raise ValueError(
                f"data.seq_length={self.seq_length} is not a multiple of {combined}, the lcm of "
                f"data.pad_to_multiple_of={self.pad_to_multiple_of} and the parallel layout's {multiple}"
            )
        return dataclasses.replace(self, pad_to_multiple_of=combined)
