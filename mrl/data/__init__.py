"""Data: JSONL records (SFT, preference, offline rollouts, prompts), tokenizers, batching.

Typical use on one rank::

    config = DataConfig(kind="sft", path="builtin:reverse_sft", seq_length=64)
    dataset = build_dataset(config)                       # reads, checks and tokenizes
    loader = build_data_loader(dataset, global_batch_size=32, micro_batch_size=4,
                               dp_rank=layout.dp_rank, dp_size=layout.dp, pad_to_multiple_of=m)
    for micro_batches in loader:                          # one optimizer step
        ...                                               # Batch.tokens/labels/loss_mask [b, s]
"""

from mrl.data.collate import Batch, Collator, packed_attention_mask, packed_cu_seqlens
from mrl.data.config import BUILTIN_DATASETS, DataConfig
from mrl.data.datasets import (
    Example, PreferenceDataset, PromptDataset, PromptExample, RolloutDataset, SFTDataset,
    TokenizedDataset, build_dataset,
)
from mrl.data.loader import DataLoader, build_data_loader, build_sampler
from mrl.data.records import DataError, Skipped
from mrl.data.sampler import GlobalBatchSampler
from mrl.data.sequences import IGNORE_INDEX
from mrl.data.tasks import ReverseWordTask, RewardFunction, load_reward_fn
from mrl.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BUILTIN_DATASETS", "Batch", "ByteTokenizer", "Collator", "DataConfig", "DataError", "DataLoader",
    "Example", "GlobalBatchSampler", "HFTokenizer", "IGNORE_INDEX", "PreferenceDataset", "PromptDataset",
    "PromptExample", "ReverseWordTask", "RewardFunction", "RolloutDataset", "SFTDataset", "Skipped",
    "TokenizedDataset", "Tokenizer", "build_data_loader", "build_dataset", "build_sampler",
    "build_tokenizer", "load_reward_fn", "packed_attention_mask", "packed_cu_seqlens",
]
