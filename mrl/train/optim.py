"""Megatron-Core DDP and distributed optimizer, configured from ``OptimConfig``.

Gradient normalisation contract: every mrl loss is already divided by the *global* number of
valid tokens (or sequences) of the step, so the gradient of the step is the plain sum of the
micro-batch gradients over micro-batches and data-parallel ranks. Megatron is told exactly that:
``calculate_per_token_loss=True`` makes its DDP reduce gradients with a SUM (scaling factor 1) and
its schedules leave the loss unscaled, and the ``finalize_model_grads`` wrapper below drops the
token count the schedules would otherwise divide by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mrl.model.config import PrecisionConfig
from mrl.parallel.layout import ParallelLayout


@dataclass
class OptimConfig:
    """Optimizer (Megatron-Core's, sharded over data-parallel ranks by default)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """adamw: Adam with decoupled weight decay; adam: Adam with L2 regularisation; sgd: SGD + momentum."""

    lr: float = 1e-5
    """Peak learning rate (the scheduler warms up to it and decays from it)."""

    weight_decay: float = 0.01
    """Weight decay, applied to weight matrices only (never to biases or norms)."""

    decay_embeddings: bool = True
    """Apply weight decay to the embedding and output-layer matrices too."""

    adam_beta1: float = 0.9
    """Adam β1."""

    adam_beta2: float = 0.95
    """Adam β2."""

    adam_eps: float = 1e-8
    """Adam ε."""

    sgd_momentum: float = 0.9
    """SGD momentum."""

    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm (0 disables clipping)."""

    distributed: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.name == "sgd" and self.distributed:
            raise ValueError(
                "name=sgd needs distributed=false: Megatron-Core's distributed optimizer "
                "supports Adam only (its checkpoint format depends on it)"
            )
        if self.overlap_param_gather and not self.distributed:
            raise ValueError("overlap_param_gather needs distributed=true")


def _finalize_grads_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """``finalize_model_grads`` minus the division by the schedules' token count (see module doc)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def wrap_ddp(chunks: list[torch.nn.Module], optim: OptimConfig, layout: ParallelLayout) -> list:
    """Wrap model chunks in Megatron-Core DDP with contiguous fp32 gradient buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = chunks[0].config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.distributed,
        check_for_nan_in_grad=False,  # mrl checks the grad norm itself and skips the step
        average_in_collective=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, pg_collection=layout.groups,
            # Only the first chunk's buffers may skip bucketing (Megatron's convention).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = _finalize_grads_without_token_scaling
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if optim.overlap_grad_reduce or optim.overlap_param_gather:
        config.grad_sync_func = [c.start_grad_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
    if optim.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].start_param_sync
    return wrapped


def _no_decay(optim: OptimConfig):
    """Parameters without weight decay: vectors (biases, norms) and, optionally, embeddings."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    def excluded(param, name: str) -> bool:
        if param.dim() < 2 or name.endswith(".bias"):
            return True
        return not optim.decay_embeddings and getattr(param, "is_embedding_or_output_parameter", False)

    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name=f"mrl_no_wd_{optim.decay_embeddings}", fn=excluded))
    return {key: {"wd_mult": 0.0}}


def build_optimizer(ddp_chunks: list, optim: OptimConfig, precision: PrecisionConfig, layout: ParallelLayout):
    """Megatron-Core's optimizer over the DDP-wrapped chunks (fp32 master weights always)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="sgd" if optim.name == "sgd" else "adam",
        lr=optim.lr,
        min_lr=0.0,
        weight_decay=optim.weight_decay,
        decoupled_weight_decay=optim.name != "adam",
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        use_distributed_optimizer=optim.distributed,
        overlap_param_gather=optim.overlap_param_gather,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision.dtype],
        loss_scale=precision.loss_scale,
        initial_loss_scale=precision.initial_loss_scale,
    )
    return get_megatron_optimizer(
        config, ddp_chunks, config_overrides=_no_decay(optim),
        use_gloo_process_groups=not layout.uses_gloo_groups_only, pg_collection=_optimizer_groups(layout),
    )


def _optimizer_groups(layout: ParallelLayout):
    """The layout's groups plus the optimizer-only ones Megatron expects in the collection."""
    return layout.groups
