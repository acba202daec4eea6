"""Typed configuration of the model architecture and its numerical precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mrl.config.checks import require_positive_ints


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

    def __post_init__(self) -> None:
        require_positive_ints(self, "model", ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                              "max_sequence_length", "make_vocab_size_divisible_by",
                                              "recompute_num_layers"))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.rope_scaling_factor is not None and (self.position_embedding != "rope" or self.rope_scaling_factor < 1):
            raise ValueError(
                f"model.rope_scaling_factor needs position_embedding rope and a factor >= 1, got "
                f"{self.rope_scaling_factor} with position_embedding {self.position_embedding!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's padded vocabulary: the next multiple of make_vocab_size_divisible_by·tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


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
            raise ValueError("precision.fp8_param=true needs precision.fp8 to be set (e4m3 or hybrid)")
        if self.fp8 is not None and self.dtype == "fp32":
            raise ValueError("precision.fp8 needs precision.dtype bf16 or fp16, got fp32")
        if self.fp8 is not None and self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ValueError(
                "precision.first_last_layers_bf16 does not work with precision.fp8_recipe=delayed "
                "(Megatron-Core refuses it); use tensorwise, blockwise or mxfp8"
            )
        if self.fp8_amax_history_len < 1:
            raise ValueError(f"precision.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        if self.loss_scale is not None and self.dtype != "fp16":
            raise ValueError("precision.loss_scale only applies to precision.dtype=fp16")

    def seq_multiple(self) -> int:
        """Tokens per rank must be a multiple of this for the FP8 GEMMs (1 without FP8)."""
        if self.fp8 is None:
            return 1
        return {"mxfp8": 32, "blockwise": 128}.get(self.fp8_recipe, 16)
