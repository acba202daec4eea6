"""Forward-only passes: per-token log-probs (or logits) of a policy or reference model.

Used for the reference model's log-probs (KL penalty, DPO), the old policy's log-probs (PPO
ratio) and the logits a sampler needs. The result lands in each micro-batch dict on the last
pipeline stage (earlier stages never read loss inputs). The same schedule and micro-batching as
training is used, so on-policy "old" log-probs equal the training pass's exactly.
"""

from __future__ import annotations

import torch

from mrl.losses.base import split_model_output
from mrl.ops import vocab_parallel_logprobs, vocab_parallel_topk
from mrl.ops.fused_head import FusedHead
from mrl.parallel.layout import ParallelLayout
from mrl.model.moe import RoutingReplay
from mrl.train.step import run_schedule


@torch.no_grad()
def annotate_logprobs(chunks: list, micro_batches: list[dict], layout: ParallelLayout, *, key: str,
                      vocab_size: int, temperature: float = 1.0, keep_logits_key: str | None = None,
                      keep_topk: tuple[str, str, int] | None = None, values_key: str | None = None,
                      chunk_size: int | None = None) -> None:
    """Store ``log p(labels)`` of ``chunks``' model as ``batch[key]`` ([B, S] fp32) on the last stage.

    ``keep_logits_key`` also stores the vocab-sharded logits; ``keep_topk = (ids_key, logprobs_key,
    k)`` the ids and log-probs of the model's k most likely tokens per position ([B, S, k], the same
    on every TP rank; one micro-batch's logits at a time, never the step's); ``values_key`` the value head's
    output. Positions with ``labels == ignore_index`` get 0. A policy with ``model.moe_routing_replay``
    also records each token's experts (``mrl.model.moe.ROUTING_KEY``), which its training passes replay.
    """
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()

    def collect(batch, output):
        logits, values = split_model_output(output)  # [B, S, V/tp], [B, S] or None
        batch[key] = vocab_parallel_logprobs(
            logits, batch["labels"], layout.tp_group, temperature=temperature,
            vocab_size=vocab_size, chunk_size=chunk_size,
        )
        if keep_logits_key is not None:
            batch[keep_logits_key] = logits.detached() if isinstance(logits, FusedHead) else logits.detach().clone()
        if keep_topk is not None:
            ids_key, logprobs_key, k = keep_topk
            shard = logits.logits() if isinstance(logits, FusedHead) else logits
            top = vocab_parallel_topk(shard, k, layout.tp_group, temperature=temperature, vocab_size=vocab_size,
                                      chunk_size=chunk_size)
            batch[ids_key], batch[logprobs_key] = top.indices, top.logprobs
        if values_key is not None and values is not None:
            batch[values_key] = values.detach().float()
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        return zero, torch.zeros((), dtype=torch.int), {}

    try:
        run_schedule(chunks, micro_batches, collect, forward_only=True,
                     seq_length=micro_batches[0]["tokens"].shape[1], routing=RoutingReplay("record"))
    finally:
        for chunk, mode in zip(chunks, was_training):
            chunk.train(mode)
