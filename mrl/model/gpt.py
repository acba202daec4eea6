"""``PolicyGPT``: Megatron-Core's GPTModel with fp32 logits and an optional value head.

Only the post-processing of the last pipeline stage differs from ``GPTModel``:

* logits can be computed in fp32 (fp32 GEMM on upcast hidden states and weights) so RL log-probs
  match an fp32 inference engine even when the model runs in BF16;
* a value head ``v = w·h + b`` on the final (normed) hidden states gives a replicated scalar per
  token for PPO critics.

The last stage returns vocab-sharded logits ``[b, s, V/tp]`` and, with a value head, the values
``[b, s]`` as a tuple. With ``fused_head`` the logits' place is taken by a ``FusedHead`` (hidden
states ``[b, s, h]`` and the output weight shard), which mrl's ops consume without materialising the
logits. Under a KV-cached inference context that asks for the last token's logits only, ``s`` is 1
and the output layer runs on that position alone. Earlier stages return hidden states
``[s, b, h]`` as GPTModel does.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

from mrl.ops.fused_head import FusedHead


class PolicyGPT(GPTModel):
    """GPTModel whose last stage returns ``logits`` or ``(logits, values)``."""

    def __init__(self, *args, logits_fp32: bool = True, value_head: bool = False, fused_head: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.logits_fp32 = logits_fp32
        self.fused_head = fused_head
        self.value_head = None
        if value_head and self.post_process:
            # Replicated over TP: every TP rank sees the full hidden state and computes the same
            # value, so its gradients agree and need no reduction.
            self.value_head = torch.nn.Linear(self.config.hidden_size, 1, dtype=self.config.params_dtype)
            torch.nn.init.normal_(self.value_head.weight, std=self.config.init_method_std)
            torch.nn.init.zeros_(self.value_head.bias)

    def _postprocess(self, hidden_states, *args, runtime_gather_output=None, inference_context=None, **kwargs):
        if not self.post_process:
            return hidden_states
        if (inference_context is not None and not self.training
                and inference_context.materialize_only_last_token_logits):
            if not inference_context.is_static_batching():
                raise ValueError("PolicyGPT decodes with a static inference context only")
            hidden_states = hidden_states[-1:]  # [1, b, h]: a KV-cached pass needs the last position only
        if self.config.mtp_num_layers is not None:
            raise ValueError("multi-token prediction is not supported by mrl's policy model")
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        if self.fused_head:
            logits = self._fused_head(hidden_states, weight)
        else:
            if self.logits_fp32:
                logits, _ = self.output_layer(hidden_states.float(), weight=weight.float(),
                                              runtime_gather_output=runtime_gather_output)
            else:
                logits, _ = self.output_layer(hidden_states, weight=weight,
                                              runtime_gather_output=runtime_gather_output)
            logits = logits.transpose(0, 1).contiguous()  # [s, b, V/tp] -> [b, s, V/tp]
        if self.value_head is None:
            return logits
        full = hidden_states
        if self.config.sequence_parallel:
            # Replicated consumer: the backward only splits the gradient (no reduce-scatter).
            full = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )
        values = torch.nn.functional.linear(
            full.float(), self.value_head.weight.float(), self.value_head.bias.float()
        ).squeeze(-1)  # [s, b]
        return logits, values.transpose(0, 1).contiguous()  # [b, s]

    def _fused_head(self, hidden_states, weight) -> FusedHead:
        """(hidden, weight) for the fused vocab-parallel ops, with the TP region of ColumnParallelLinear:
        the backward all-reduces ∂h over TP (reduce-scatters it under sequence parallelism)."""
        group = self.pg_collection.tp
        if self.config.sequence_parallel:
            full = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=group)
            full = full.transpose(0, 1).contiguous()  # [b, s, h]; the reduce-scatter reads a contiguous copy
        else:
            # Transpose first: Megatron's TP all-reduce reduces a contiguous *copy* of a strided
            # gradient and returns the unreduced original, so its input gradient must be contiguous.
            full = copy_to_tensor_model_parallel_region(hidden_states.transpose(0, 1).contiguous(), group=group)
        return FusedHead(full, weight, fp32=self.logits_fp32,
                         accumulate_main_grad=bool(self.config.gradient_accumulation_fusion))
