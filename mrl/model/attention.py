"""Self-attention whose static KV cache holds keys already rotated by RoPE.

Megatron-Core 0.16's static-batching path (without flash decoding, which needs CUDA kernels) caches
the keys *before* RoPE and rotates the whole cache again at every decode step: ``k_pos_emb[:end]``
over ``[end, rows, groups, dim]`` per layer and step, which on CPU was about two thirds of a decode
step at S = 1024. ``CachedRotarySelfAttention`` rotates each new key once, at its own slot, before it
enters the cache, and tells the rest of ``Attention.forward`` that the keys need no rotation. RoPE is
elementwise per position, so the cached keys, the scores and the logits are the same bit for bit.

Training (no inference context), context parallelism (RoPE slices its angles by CP rank) and
Megatron's flash-decoding and dynamic-batching paths go through the parent unchanged.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention


class CachedRotarySelfAttention(SelfAttention):
    """``SelfAttention`` that rotates each key once, when it is cached (static batching)."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        *args, **kwargs):
        if not self._rotates_into_cache(inference_context, rotary_pos_emb):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        start = inference_context.sequence_len_offset
        _, k_pos_emb = rotary_pos_emb  # [S, 1, 1, dim] angles of every slot
        key = apply_rotary_pos_emb(  # [new, rows, groups, dim] rotated at slots start .. start + new
            key, k_pos_emb[start:start + key.size(0)], config=self.config,
            mscale=_yarn_get_concentration_factor_from_config(self.config), cp_group=self.pg_collection.cp)
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (rotary_pos_emb[0], None), mask_type, block_table

    def _rotates_into_cache(self, inference_context, rotary_pos_emb) -> bool:
        return (inference_context is not None and inference_context.is_static_batching()
                and isinstance(rotary_pos_emb, tuple) and rotary_pos_emb[1] is not None
                and not self.config.flash_decode and _size(getattr(self.pg_collection, "cp", None)) == 1)


def _size(group) -> int:
    return 1 if group is None else group.size()
