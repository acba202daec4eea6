"""KV-cached incremental forward passes of the policy on any TP/PP/VPP layout.

``KVCacheDecoder`` drives Megatron-Core's ``StaticInferenceContext`` from mrl's own loop (Megatron's
static engine hard-codes CUDA events, generators and pinned memory): ``prefill`` runs a wave of
prompts once and caches every layer's keys and values; each ``step`` feeds one new token per row and
attends to the cache. Only the last position's logits are computed (``PolicyGPT`` honours the
context's ``materialize_only_last_token_logits``). The cache holds keys already rotated by RoPE
(``mrl.model.attention.CachedRotarySelfAttention``), so a step rotates only its new keys.

Prompts of different lengths are **left-padded**: row ``r`` with ``pad_r`` leading pads keeps its
real tokens in the cache slots ``[pad_r, ...)``, and every query of that row masks the pad slots.
RoPE angles follow the slot, and attention scores under RoPE depend only on the distance between
query and key, so a row's scores equal those of the same row without padding; learned absolute
position embeddings get explicit position ids ``slot - pad_r``. Arbitrary masks need Megatron's
local attention; with Transformer Engine attention (which takes only its mask type) every wave
must have one prompt length (the sampler forms its waves that way).

Pipeline parallelism: for virtual stage ``v = 0 .. pp·vpp - 1``, pipeline rank ``v mod pp`` runs its
chunk ``v div pp`` and sends the new positions' hidden states ``[q, rows, h]`` to the next stage.
Only the last stage returns logits.

``keep(rows)`` drops finished rows from the batch: the cache rows are compacted in place, so later
steps cost only the active rows.

Sequence parallelism is switched off while decoding (``sequence_parallel_disabled``): a decode step
holds one position per row, which cannot be split over TP ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mrl.ops.fused_head import FusedHead
from mrl.parallel.layout import ParallelLayout


def supports_padding_masks(chunks: list) -> bool:
    """True when every attention of ``chunks`` is Megatron's local attention (it applies any mask)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for chunk in chunks for m in chunk.modules() if hasattr(m, "core_attention")]
    return all(isinstance(core, DotProductAttention) for core in cores)


@contextlib.contextmanager
def sequence_parallel_disabled(chunks: list):
    """Run ``chunks`` without sequence parallelism inside the block (restored afterwards)."""
    changed = []
    configs = {id(m.config): m.config for chunk in chunks for m in chunk.modules() if hasattr(m, "config")}
    for config in configs.values():
        if getattr(config, "sequence_parallel", False):
            changed.append((config, "sequence_parallel"))
    for chunk in chunks:
        for module in chunk.modules():
            for name in ("sequence_parallel", "reduce_scatter_embeddings"):
                if getattr(module, name, None) is True:
                    changed.append((module, name))
    for owner, name in changed:
        setattr(owner, name, False)
    try:
        yield bool(changed)
    finally:
        for owner, name in changed:
            setattr(owner, name, True)


class KVCacheDecoder:
    """Prefill and one-token steps of one wave of rows through a Megatron KV cache."""

    def __init__(self, chunks: list, layout: ParallelLayout, *, max_rows: int, max_length: int,
                 padding_masks: bool) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.chunks = chunks
        self.layout = layout
        self.padding_masks = padding_masks
        self.context = StaticInferenceContext(max_rows, max_length)
        self.device = next(chunks[0].parameters()).device
        inner = _unwrap(chunks[0])
        self.hidden_size = inner.config.hidden_size
        self.pipe_dtype = inner.config.pipeline_dtype or inner.config.params_dtype
        self.absolute_positions = getattr(inner, "position_embedding_type", "rope") == "learned_absolute"
        self.pad = torch.zeros(0, dtype=torch.long)  # [rows] leading pads of each active row
        self.length = 0  # cache slots filled

    # The wave ---------------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor | None:
        """Cache ``tokens`` ``[rows, L]`` (row r left-padded by ``pad[r]``); logits of the last
        position ``[rows, V/tp]`` on the last pipeline stage, else None."""
        rows, length = tokens.shape
        if length > self.context.max_sequence_length or rows > self.context.max_batch_size:
            raise ValueError(f"prefill of {rows}x{length} exceeds the cache's "
                             f"{self.context.max_batch_size}x{self.context.max_sequence_length}")
        if not self.padding_masks and bool(pad.any()):
            raise ValueError("this model's attention takes no padding masks: one prompt length per wave")
        self.context.reset()
        self.pad = pad.cpu().long()
        slots = torch.arange(length)
        positions = (slots.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)  # [rows, L]
        mask = None
        if self.padding_masks:
            causal = slots.unsqueeze(1) < slots.unsqueeze(0)  # [L, L] True: key after query
            padded = slots.unsqueeze(0) < self.pad.unsqueeze(1)  # [rows, L] True: pad key
            mask = (causal.unsqueeze(0) | padded.unsqueeze(1)).unsqueeze(1)  # [rows, 1, L, L]
        logits = self._forward(tokens, positions, mask)
        self.length = length
        self.context.sequence_len_offset = length
        self.context.enable_decode_mode()
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed one token per active row ``[rows]``; logits of that position ``[rows, V/tp]``."""
        if self.length >= self.context.max_sequence_length:
            raise ValueError(f"the KV cache holds {self.context.max_sequence_length} positions; all are used")
        rows = tokens.shape[0]
        positions = (self.length - self.pad).clamp(min=0).unsqueeze(1)  # [rows, 1]
        mask = None
        if self.padding_masks:
            slots = torch.arange(self.length + 1)
            mask = (slots.unsqueeze(0) < self.pad.unsqueeze(1)).view(rows, 1, 1, -1)  # [rows, 1, 1, L+1]
        logits = self._forward(tokens.view(rows, 1), positions, mask)
        self.length += 1
        self.context.sequence_len_offset = self.length
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the active batch, ascending) for the next steps."""
        rows = rows.cpu().long()
        index = rows.to(self.device)
        for key, value in self.context.key_value_memory_dict.values():  # [S, B, heads, dim] each
            count = len(rows)
            key[:, :count] = key[:, index]
            value[:, :count] = value[:, index]
        self.pad = self.pad[rows]

    # One forward over the pipeline ------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        from megatron.core.utils import get_attr_wrapped_model

        layout = self.layout
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        mask = mask.to(self.device) if mask is not None else None
        stages = layout.pp * (layout.vpp or 1)
        output = None
        for virtual in range(stages):
            if virtual % layout.pp != layout.pp_rank:
                continue
            chunk = self.chunks[virtual // layout.pp]
            if virtual > 0:
                hidden = torch.empty((tokens.shape[1], tokens.shape[0], self.hidden_size),
                                     dtype=self.pipe_dtype, device=self.device)  # [q, rows, h]
                dist.recv(hidden, src=self._stage_rank(virtual - 1), group=layout.pp_group)
                get_attr_wrapped_model(chunk, "set_input_tensor")(hidden)
            output = _call(chunk, tokens, positions, mask, self.context)
            if virtual < stages - 1:
                dist.send(output.contiguous(), dst=self._stage_rank(virtual + 1), group=layout.pp_group)
        if not layout.is_last_stage:
            return None
        logits = output[0] if isinstance(output, tuple) else output  # [rows, 1, V/tp] (values dropped)
        if isinstance(logits, FusedHead):
            logits = logits.logits()  # one position per row: small enough to materialise
        return logits[:, -1]

    def _stage_rank(self, virtual: int) -> int:
        return dist.get_global_rank(self.layout.pp_group, virtual % self.layout.pp)


def _call(chunk, tokens, positions, mask, context):
    from megatron.core.transformer.module import Float16Module

    inner = getattr(chunk, "module", None)
    kwargs = {"fp32_output": False} if isinstance(chunk, Float16Module) or isinstance(inner, Float16Module) else {}
    return chunk(tokens, positions, mask, inference_context=context, **kwargs)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
