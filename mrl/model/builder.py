"""Build Megatron-Core GPT models (policy, reference) from mrl's typed configs.

Order, for every virtual-pipeline chunk this rank holds:
  1. ``transformer_config``: ModelConfig + PrecisionConfig + the layout -> Megatron ``TransformerConfig``
  2. ``layer_spec``: Transformer Engine layers when used, else Megatron's local layers with
     sequence-parallel-capable torch norms; self-attention rotates each key once, into the KV
     cache (``mrl.model.attention``)
  3. ``PolicyGPT`` on the padded vocabulary, with this chunk's pre/post-process flags
  4. ``Float16Module`` for bf16/fp16
DDP wrapping and the optimizer come later (``mrl.train.optim``); a reference model stops at 4.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mrl.compat import (
    fused_softmax_available,
    gpt_layer_spec,
    import_transformer_engine,
    prepare_moe_without_te,
    te_available,
)
from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.model.init import layout_invariant_init_
from mrl.parallel.layout import ParallelLayout, check_expert_divisibility, check_model_divisibility

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def uses_transformer_engine(model: ModelConfig, device: str) -> bool:
    """Whether to build Transformer Engine layers for this model and device."""
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl == "transformer_engine":
        if device != "cuda":
            raise ValueError("model.transformer_impl=transformer_engine needs device: cuda")
        import_transformer_engine("model.transformer_impl=transformer_engine")
        return True
    return device == "cuda" and te_available()


def check_precision_support(precision: PrecisionConfig, device: str, use_te: bool) -> None:
    """FP8 needs a CUDA device and Transformer Engine; say which one is missing."""
    if precision.fp8 is None:
        return
    if device != "cuda":
        raise ValueError(
            f"precision.fp8={precision.fp8} needs a CUDA GPU with Transformer Engine, but device is "
            f"{device!r}; set precision.fp8: null for a CPU run"
        )
    import_transformer_engine(f"precision.fp8={precision.fp8}")
    if not use_te:
        raise ValueError("precision.fp8 needs Transformer Engine layers (model.transformer_impl: auto or transformer_engine)")


def transformer_config(model: ModelConfig, precision: PrecisionConfig, layout: ParallelLayout,
                       device: str):
    """Map mrl's configs onto Megatron-Core's ``TransformerConfig``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel = layout.config
    check_model_divisibility(
        parallel,
        num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        padded_vocab_size=model.padded_vocab_size(parallel.tp),
    )
    dtype = _DTYPES[precision.dtype]
    on_cpu = device == "cpu"
    swiglu = model.activation == "swiglu"
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        # Megatron's own initialisation is overwritten by layout_invariant_init_.
        use_cpu_initialization=on_cpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        # Fusions need CUDA kernels (and some need TE/apex); never let them leak into a CPU run.
        masked_softmax_fusion=not on_cpu and fused_softmax_available(),
        bias_activation_fusion=not on_cpu and model.add_bias_linear,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=not on_cpu and te_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Batched p2p posts sends and receives in a fixed order. With interleaving over two stages
        # the previous and next stage are the same rank, so an activation and a gradient of the
        # same shape can be paired the wrong way round (seen on gloo); per-op p2p orders by parity.
        batch_p2p_comm=not on_cpu and not (parallel.vpp and parallel.pp == 2),
    )
    if model.is_moe:
        prepare_moe_without_te()
        kwargs.update(moe_kwargs(model, parallel.ep, parallel.expert_tp, use_grouped_gemm=not on_cpu and te_available()))
    if model.recompute is not None:
        kwargs.update(recompute_granularity=model.recompute)
        if model.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=model.recompute_num_layers)
    if precision.fp8 is not None:
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_param=precision.fp8_param,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            first_last_layers_bf16=precision.first_last_layers_bf16,
            num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
        )
    return TransformerConfig(**kwargs)


def moe_kwargs(model: ModelConfig, ep: int, expert_tp: int, *, use_grouped_gemm: bool) -> dict:
    """Megatron-Core ``TransformerConfig`` fields of a MoE model (drop-less unless a capacity factor is set)."""
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_topk,
        moe_ffn_hidden_size=model.moe_ffn_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_layer_freq=model.moe_layer_pattern(),
        moe_router_score_function=model.moe_router_score_function,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_dtype=model.moe_router_dtype,
        moe_router_load_balancing_type=model.moe_load_balancing,
        moe_aux_loss_coeff=float(model.moe_aux_loss_coeff),
        moe_z_loss_coeff=float(model.moe_z_loss_coeff) or None,
        moe_expert_capacity_factor=model.moe_capacity_factor,
        moe_token_drop_policy=model.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=model.moe_pad_expert_input_to_capacity,
        moe_router_enable_expert_bias=model.moe_expert_bias,
        moe_router_bias_update_rate=model.moe_expert_bias_update_rate,
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        moe_enable_routing_replay=model.moe_routing_replay,
        moe_grouped_gemm=use_grouped_gemm,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=expert_tp,
    )


def layer_spec(config, model: ModelConfig, use_te: bool, vp_stage: int | None, pp_rank: int):
    """The block spec for this chunk: TE layers, or local layers with SP-capable torch norms; MoE
    layers where ``model.moe_layer_pattern()`` says so."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    def spec_for(num_experts):
        spec = gpt_layer_spec(use_te=use_te, normalization=model.normalization, qk_layernorm=model.qk_layernorm,
                              num_experts=num_experts, moe_grouped_gemm=bool(config.moe_grouped_gemm))
        from mrl.model.attention import CachedRotarySelfAttention

        spec.submodules.self_attention.module = CachedRotarySelfAttention
        if use_te:
            return spec
        from mrl.parallel.cpu import SequenceParallelTorchNorm

        return _replace_torch_norms(spec, SequenceParallelTorchNorm)

    if not model.is_moe and use_te:
        return spec_for(None)
    specs = {0: spec_for(None), 1: spec_for(model.num_experts) if model.is_moe else None}
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    pattern = model.moe_layer_pattern()[offset:offset + num_layers]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        from mrl.parallel.cpu import SequenceParallelTorchNorm

        norm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=[specs[kind] for kind in pattern], layer_norm=norm)


def _replace_torch_norms(spec, norm):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    layer = spec.submodules
    attention = layer.self_attention.submodules
    replace = lambda cls: norm if cls is WrappedTorchNorm else cls  # noqa: E731
    attention = dataclasses.replace(
        attention, q_layernorm=replace(attention.q_layernorm), k_layernorm=replace(attention.k_layernorm)
    )
    layer = dataclasses.replace(
        layer,
        input_layernorm=replace(layer.input_layernorm),
        pre_mlp_layernorm=replace(layer.pre_mlp_layernorm),
        self_attention=dataclasses.replace(layer.self_attention, submodules=attention),
    )
    return dataclasses.replace(spec, submodules=layer)


def build_model(model: ModelConfig, precision: PrecisionConfig, layout: ParallelLayout, device: str,
                *, seed: int = 1234, value_head: bool | None = None) -> list[torch.nn.Module]:
    """The model chunks this rank holds (one per virtual pipeline stage), not yet DDP-wrapped.

    Weights are drawn by ``layout_invariant_init_`` from ``seed``: the same seed gives the same
    model at every TP/PP/VPP layout.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from mrl.model.gpt import PolicyGPT

    use_te = uses_transformer_engine(model, device)
    check_precision_support(precision, device, use_te)
    check_expert_divisibility(layout.config, num_experts=model.num_experts, world_size=layout.world_size)
    config = transformer_config(model, precision, layout, device)
    chunks = []
    for index in range(layout.vpp or 1):
        vp_stage = index if layout.vpp else None
        chunk = PolicyGPT(
            config,
            layer_spec(config, model, use_te, vp_stage, layout.pp_rank),
            vocab_size=model.padded_vocab_size(layout.tp),
            max_sequence_length=model.max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling_factor is not None,
            rope_scaling_factor=model.rope_scaling_factor or 8.0,
            pg_collection=layout.groups,
            vp_stage=vp_stage,
            logits_fp32=precision.logits_fp32,
            value_head=model.value_head if value_head is None else value_head,
            fused_head=model.fused_head,
        )
        if device == "cuda":
            chunk = chunk.cuda(torch.cuda.current_device())
        layout_invariant_init_([chunk], seed, model.init_method_std, model.num_layers)
        if model.is_moe:
            _mark_expert_parameters(chunk)
        if precision.dtype != "fp32":
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def _mark_expert_parameters(chunk) -> None:
    """Tag routed-expert parameters as expert-parallel at every EP degree, EP=1 included.

    Megatron tags them only when ep > 1; the tag puts them in DDP's expert buffers (reduced over the
    expert-data-parallel group, which is the data-parallel group at EP=1) and in an optimizer of their
    own. Tagging them always keeps the optimizer a (dense, expert) pair, so its checkpoint has the same
    structure at every EP degree and a checkpoint saved at EP=2 loads at EP=1.
    """
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

    for module in chunk.modules():
        if isinstance(module, (GroupedMLP, SequentialMLP, TEGroupedMLP)):
            for param in module.parameters():
                param.allreduce = False


def freeze(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Make model chunks a frozen reference: eval mode, no gradients, no optimizer state."""
    from mrl.model.moe import disable_routing_replay

    disable_routing_replay(chunks)
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)
    return chunks
