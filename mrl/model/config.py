"""Typed configuration of the model architecture and its numerical precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from mrl.config.checks import require_optional_positive_ints, require_positive_ints


@dataclass
class ModelConfig:
    """A GPT-style decoder built as a Megatron-Core ``GPTModel``."""

    num_layers: int = 2
    """Number of transformer layers."""

    hidden_size: int = 64
    """Width of the residual stream."""

    num_attention_heads: int = 4
    """Query heads per layer."""

    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); None means one per query head (MHA)."""

    head_dim: Optional[int] = None
    """Per-head width of queries, keys and values (Megatron's kv_channels); None means
    hidden_size / num_attention_heads. Qwen3 sets it apart from that (e.g. 128 with hidden_size
    2048 and 32 heads): attention then projects hidden_size to heads·head_dim and back."""

    ffn_hidden_size: Optional[int] = None
    """Inner MLP width; None means 4·hidden_size."""

    vocab_size: int = 259
    """True vocabulary size (tokenizer size). Megatron pads it; the padded tail never gets probability."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP degree (Megatron's convention)."""

    max_sequence_length: int = 128
    """Longest sequence the position embedding supports."""

    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding: rotary (RoPE) or learned absolute embeddings."""

    rotary_base: int = 10000
    """RoPE base frequency."""

    rope_scaling_factor: Optional[float] = None
    """Llama-3.1-style RoPE frequency scaling by this factor (low/high frequency factors 1 and 4,
    original context 8192: Megatron-Core's implementation); None disables it."""

    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer type."""

    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""

    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation: SwiGLU (gated SiLU) or GELU."""

    add_bias_linear: bool = False
    """Biases in the linear layers."""

    add_qkv_bias: bool = False
    """Biases in the query/key/value projection only (Qwen-style), independent of add_bias_linear."""

    qk_layernorm: bool = False
    """Normalise queries and keys per head before attention."""

    tie_embeddings: bool = False
    """Share the input embedding and the output layer weights."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (RL post-training normally uses 0)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    value_head: bool = False
    """Add a scalar value head on the final hidden states (PPO critic)."""

    fused_head: bool = False
    """Fuse the output layer into the loss: the last stage hands (hidden states, output weight) to
    the log-prob / entropy / KL ops, which compute the logits chunk by chunk and never hold
    [tokens, V/tp] of them (for large vocabularies and long sequences)."""

    recompute: Optional[Literal["full", "selective"]] = None
    """Activation recompute: None, 'full' (whole layers) or 'selective' (core attention)."""

    recompute_num_layers: int = 1
    """With full recompute: layers per recompute block (uniform method)."""

    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: 'auto' uses Transformer Engine when present on a GPU, else local layers."""

    # ---- Mixture of Experts (Megatron-Core MoE layers; null num_experts: a dense model) ----

    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None builds a dense model and every other moe_* field is ignored."""

    moe_topk: int = 2
    """Experts each token is routed to."""

    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of each routed expert's MLP; None means ffn_hidden_size (4·hidden_size)."""

    moe_shared_expert_size: Optional[int] = None
    """Inner width of the shared expert MLP every token passes through (the sum over several shared
    experts); None: no shared expert."""

    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w·h) (Qwen2/Qwen3-MoE style); needs moe_shared_expert_size."""

    moe_layer_freq: Union[int, list[int]] = 1
    """Which layers are MoE layers: N makes every N-th layer (0, N, 2N, ...) one, a list of num_layers
    0/1 entries gives the pattern (1: MoE, 0: dense MLP of ffn_hidden_size)."""

    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function over the experts' logits."""

    moe_router_pre_softmax: bool = False
    """Apply the score function before top-k selection (top-k weights then do not sum to 1, Mixtral
    and Qwen3-MoE without normalisation); False applies softmax over the selected k logits only.
    Needed with moe_topk=1 and softmax."""

    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the top-k routing weights by this factor; None: no scaling."""

    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"
    """Precision of the router logits and of the weighted sum of expert outputs; None: the model dtype."""

    moe_load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing auxiliary loss: 'aux_loss' (Switch/GShard, per micro-batch), 'seq_aux_loss'
    (DeepSeek-V2/V3, per sequence) or 'none'."""

    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss (1e-2 is a common start; 0 disables it)."""

    moe_z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(router logits)²) (1e-3 is a common start; 0 disables it)."""

    moe_capacity_factor: Optional[float] = None
    """None: drop-less routing (every routed token reaches its experts). A factor c > 0 caps each expert
    at c·tokens·topk/num_experts tokens per micro-batch and drops the rest (needs moe_load_balancing aux_loss)."""

    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    """With moe_capacity_factor: drop the tokens with the lowest routing weight, or the latest positions."""

    moe_pad_expert_input_to_capacity: bool = False
    """With moe_capacity_factor: pad every expert's input to its capacity (fixed shapes)."""

    moe_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for top-k selection
    only, nudged after each step towards equal load; needs moe_router_score_function sigmoid."""

    moe_expert_bias_update_rate: float = 1e-3
    """With moe_expert_bias: the step size of the bias update."""

    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach the experts of other expert-parallel ranks: all-to-all of the routed tokens, or an
    all-gather of every token followed by local selection."""

    moe_routing_replay: bool = False
    """Record each token's top-k experts, per layer, in the old-policy log-prob pass and replay them in the
    training passes of the same rollout, so a strictly on-policy step has ratio exactly 1."""

    def __post_init__(self) -> None:
        require_positive_ints(self, ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                              "max_sequence_length", "make_vocab_size_divisible_by",
                                              "recompute_num_layers"))
        require_optional_positive_ints(self, ("head_dim",))
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set head_dim for heads of another width"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.rope_scaling_factor is not None and (self.position_embedding != "rope" or self.rope_scaling_factor < 1):
            raise ValueError(
                f"rope_scaling_factor needs position_embedding rope and a factor >= 1, got "
                f"{self.rope_scaling_factor} with position_embedding {self.position_embedding!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _check_moe(self)

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's padded vocabulary: the next multiple of make_vocab_size_divisible_by·tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def kv_channels(self) -> int:
        """Width of each attention head: head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    def moe_layer_pattern(self) -> list[int]:
        """1 for each MoE layer, 0 for each dense layer (all 0 for a dense model)."""
        if not self.is_moe:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [int(i % self.moe_layer_freq == 0) for i in range(self.num_layers)]
        return list(self.moe_layer_freq)


def _check_moe(model: ModelConfig) -> None:
    """Validate the MoE fields; ``ValueError`` names each offending field."""
    if model.num_experts is None:
        return
    require_positive_ints(model, ("num_experts", "moe_topk"))
    require_optional_positive_ints(model, ("moe_ffn_hidden_size", "moe_shared_expert_size"))
    if model.moe_topk > model.num_experts:
        raise ValueError(f"moe_topk={model.moe_topk} exceeds num_experts={model.num_experts}")
    freq = model.moe_layer_freq
    if isinstance(freq, bool) or not isinstance(freq, (int, list)):
        raise ValueError(f"moe_layer_freq must be a positive integer or a list of 0/1, got {freq!r}")
    if isinstance(freq, int) and freq < 1:
        raise ValueError(f"moe_layer_freq must be a positive integer or a list of 0/1, got {freq!r}")
    if isinstance(freq, list):
        if len(freq) != model.num_layers or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
            raise ValueError(
                f"moe_layer_freq as a list needs num_layers={model.num_layers} entries of 0 or 1, "
                f"got {freq!r}")
        if not any(freq):
            raise ValueError("moe_layer_freq has no MoE layer (no 1); set num_experts: null for a dense model")
    if model.moe_shared_expert_gate and model.moe_shared_expert_size is None:
        raise ValueError("moe_shared_expert_gate needs moe_shared_expert_size")
    if model.moe_topk == 1 and model.moe_router_score_function == "softmax" and not model.moe_router_pre_softmax:
        raise ValueError(
            "moe_topk=1 with moe_router_score_function softmax needs moe_router_pre_softmax=true "
            "(a softmax over one selected logit is constant and gives the router no gradient)")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_bias_update_rate"):
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if model.moe_aux_loss_coeff > 0 and model.moe_load_balancing == "none":
        raise ValueError("moe_aux_loss_coeff > 0 needs moe_load_balancing aux_loss or seq_aux_loss, got none")
    if model.moe_router_topk_scaling_factor is not None and model.moe_router_topk_scaling_factor <= 0:
        raise ValueError(
            f"moe_router_topk_scaling_factor must be > 0 or null, got {model.moe_router_topk_scaling_factor!r}")
    if model.moe_capacity_factor is not None:
        if model.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be > 0 or null (drop-less), got {model.moe_capacity_factor!r}")
        if model.moe_load_balancing != "aux_loss":
            raise ValueError(
                f"moe_capacity_factor needs moe_load_balancing=aux_loss (Megatron-Core drops tokens only "
                f"then), got {model.moe_load_balancing!r}")
    elif model.moe_pad_expert_input_to_capacity:
        raise ValueError("moe_pad_expert_input_to_capacity needs moe_capacity_factor")
    if model.moe_expert_bias and model.moe_router_score_function != "sigmoid":
        raise ValueError("moe_expert_bias needs moe_router_score_function=sigmoid (Megatron-Core's aux-loss-free balancing)")
    if model.moe_routing_replay and model.moe_capacity_factor is not None:
        raise ValueError("moe_routing_replay needs drop-less routing (moe_capacity_factor: null)")
    if model.moe_routing_replay and model.recompute == "full":
        raise ValueError("moe_routing_replay does not work with recompute=full (recomputed routers would not replay)")


@dataclass
class PrecisionConfig:
    """Parameter/compute precision, loss scaling and FP8 through Transformer Engine.

    FP8 defaults are chosen deliberately: Megatron-Core defaults to a 1-step amax history with
    'most_recent', TE to 1024 steps with 'max'. mrl uses TE's (1024, 'max') for delayed scaling:
    RL updates shift activation ranges from step to step, and the longer max-history is the
    conservative choice against overflow. Current-scaling recipes ignore the history.
    """

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and activation dtype (the optimizer always keeps fp32 master weights)."""

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for linear layers (needs a GPU and Transformer Engine); None disables FP8."""

    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """FP8 scaling recipe: delayed, current per-tensor (tensorwise), blockwise or MXFP8."""

    fp8_param: bool = False
    """Keep parameters in FP8 (saves memory; needs fp8)."""

    fp8_margin: int = 0
    """Delayed scaling: margin (power of two) for the scaling factor."""

    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length (see the class docstring for the choice)."""

    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is computed from the amax history."""

    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in BF16 under FP8."""

    num_layers_at_start_in_bf16: int = 1
    """With first_last_layers_bf16: leading layers kept in BF16."""

    num_layers_at_end_in_bf16: int = 1
    """With first_last_layers_bf16: trailing layers kept in BF16."""

    logits_fp32: bool = True
    """Compute the output layer (logits) in fp32 so log-probs match an fp32 inference engine."""

    initial_loss_scale: float = 2.0**16
    """fp16 only: initial dynamic loss scale."""

    loss_scale: Optional[float] = None
    """fp16 only: a fixed loss scale; None uses dynamic loss scaling."""

    def __post_init__(self) -> None:
        if self.fp8_param and self.fp8 is None:
            raise ValueError("fp8_param=true needs fp8 to be set (e4m3 or hybrid)")
        if self.fp8 is not None and self.dtype == "fp32":
            raise ValueError("fp8 needs dtype bf16 or fp16, got fp32")
        if self.fp8 is not None and self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ValueError(
                "first_last_layers_bf16 does not work with fp8_recipe=delayed "
                "(Megatron-Core refuses it); use tensorwise, blockwise or mxfp8"
            )
        if self.fp8_amax_history_len < 1:
            raise ValueError(f"fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        if self.loss_scale is not None and self.dtype != "fp16":
            raise ValueError("loss_scale only applies to dtype=fp16")

    def seq_multiple(self) -> int:
        """Tokens per rank must be a multiple of this for the FP8 GEMMs (1 without FP8)."""
        if self.fp8 is None:
            return 1
        return {"mxfp8": 32, "blockwise": 128}.get(self.fp8_recipe, 16)
