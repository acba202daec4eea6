"""Vocab-parallel ops: per-token quantities of the full softmax from TP vocabulary shards.

Every op takes this rank's shard ``[..., V/tp]`` of the logits and the TP ``group`` (None: the
tensor holds the whole vocabulary), never gathers the vocabulary, never modifies its input, and
returns fp32 values and gradients equal to those of the same function on the unsharded logits.
"""

from mrl.ops.jsd import vocab_parallel_jsd
from mrl.ops.kl import vocab_parallel_kl
from mrl.ops.log_softmax import vocab_parallel_log_softmax
from mrl.ops.logprobs_at import vocab_parallel_logprobs_at
from mrl.ops.topk import TopK, vocab_parallel_topk
from mrl.ops.vocab_parallel import (
    SoftmaxStats,
    vocab_parallel_cross_entropy,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_logsumexp,
    vocab_parallel_softmax_stats,
)

__all__ = [
    "SoftmaxStats",
    "TopK",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_entropy",
    "vocab_parallel_jsd",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_logprobs_at",
    "vocab_parallel_logsumexp",
    "vocab_parallel_softmax_stats",
    "vocab_parallel_topk",
]
