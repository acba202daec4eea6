"""One optimizer step: Megatron-Core's pipeline schedule, mrl's loss, a finiteness guard.

``TrainStep(micro_batches)`` runs, in order:
  1. zero the DDP gradient buffers;
  2. ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved 1F1B, chosen by
     Megatron from the layout) over the micro-batches; on the last stage the loss is an mrl loss
     over the vocab-sharded logits, already divided by the global token/sequence counts;
  3. gradient finalisation (DP reduce-scatter/all-reduce, TP reduction of sequence-parallel
     norms, tied-embedding sync) inside the schedule;
  4. the guard: one small all-reduce brings the loss's finiteness to every rank, the optimizer
     computes the global grad norm; if either is not finite the step is skipped (parameters
     and optimizer state untouched) and counted, and ``max_consecutive_bad_steps`` skips in a row
     stop the run with ``NonFiniteError`` naming the cause;
  5. clip by the global norm, optimizer step, scheduler step.

The guard needs the grad norm on the host, which is also what the step log needs: that is the
only host synchronisation of the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from mrl.data.collate import packed_attention_mask
from mrl.model.moe import RouterLosses, RoutingReplay
from mrl.parallel.layout import ParallelLayout


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    """What one optimizer step did; ``metrics`` are layout-independent global values."""

    loss: float
    grad_norm: float | None
    skipped: bool
    skip_reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def causal_mask(seq_length: int, device=None) -> torch.Tensor:
    """Megatron's attention mask convention: True marks positions a query must not see."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)


def model_forward(model, batch: dict, mask: torch.Tensor):
    """Call a (possibly Float16Module/DDP-wrapped) mrl model; outputs keep the model's own dtype."""
    kwargs = {"fp32_output": False} if _is_float16(model) else {}
    return model(batch["tokens"], batch["position_ids"], mask, **kwargs)


def _is_float16(model) -> bool:
    from megatron.core.transformer.module import Float16Module

    inner = getattr(model, "module", None)
    return isinstance(model, Float16Module) or isinstance(inner, Float16Module)


def run_schedule(chunks: list, micro_batches: list[dict], loss_func: Callable, *, forward_only: bool,
                 seq_length: int, routing: RoutingReplay | None = None) -> None:
    """Run Megatron's forward(-backward) schedule; ``loss_func(batch, output)`` on the last stage.

    ``routing`` records (or replays) MoE routing per micro-batch (``model.moe_routing_replay``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    causal = causal_mask(seq_length, device=micro_batches[0]["tokens"].device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # Packed rows (data.packing) attend within their own document only.
        mask = packed_attention_mask(batch["segment_ids"]) if "segment_ids" in batch else causal
        if routing is not None:
            routing.before(model, batch)
        output = model_forward(model, batch, mask)
        if routing is not None:
            routing.after(model, batch)
        return output, functools.partial(loss_func, batch)

    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


class TrainStep:
    """Forward/backward over a global batch's micro-batches, guard, clip, optimizer step."""

    def __init__(self, chunks: list, optimizer, scheduler, layout: ParallelLayout, loss_fn,
                 metrics_factory: Callable, *, max_consecutive_bad_steps: int = 3) -> None:
        self.chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.layout = layout
        self.loss_fn = loss_fn
        self.metrics_factory = metrics_factory
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.consecutive_bad = 0
        self.skipped_total = 0
        # MoE: the routers' aux/z losses join the backward with the step's global normalisation.
        self.router_losses = RouterLosses.for_chunks(chunks, layout)

    def __call__(self, micro_batches: list[dict], counts) -> StepResult:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self.metrics_factory()
        loss_total = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["tokens"].device)

        def loss_func(batch, output):
            nonlocal loss_total
            loss, step_metrics = self.loss_fn(output, batch, counts, self.layout.tp_group)
            loss_total = loss_total + loss.detach().double()
            metrics.add(step_metrics)
            return loss, torch.zeros((), dtype=torch.int), {}

        if self.router_losses is not None:
            self.router_losses.begin_step(micro_batches)
        try:
            run_schedule(self.chunks, micro_batches, loss_func, forward_only=False,
                         seq_length=micro_batches[0]["tokens"].shape[1], routing=RoutingReplay("replay"))
        except BaseException:
            if self.router_losses is not None:
                self.router_losses.restore()
            raise
        router_metrics = self.router_losses.end_step() if self.router_losses is not None else {}
        loss = self._global_loss(loss_total)
        reduced = metrics.reduce(self.layout.dp_group) if self.layout.is_last_stage else {}
        reduced.update(router_metrics)
        return self._guarded_update(loss, reduced)

    def _global_loss(self, local: torch.Tensor) -> float:
        """Sum of the loss fragments over DP ranks, known on every rank (NaN stays NaN)."""
        owner = self.layout.is_last_stage and self.layout.tp_rank == 0
        # On the batch's device: NCCL reduces CUDA tensors only.
        packed = torch.stack([local if owner else torch.zeros_like(local),
                              torch.tensor(float(owner and not torch.isfinite(local)), dtype=torch.float64,
                                           device=local.device)])
        packed = torch.nan_to_num(packed, nan=0.0, posinf=0.0, neginf=0.0)
        dist.all_reduce(packed)
        return math.nan if packed[1] > 0 else float(packed[0])

    def _guarded_update(self, loss: float, metrics: dict[str, float]) -> StepResult:
        if self.optimizer.prepare_grads():
            # fp16 dynamic loss scaling overflowed: the scaler already lowered the scale.
            return StepResult(loss, None, True, "fp16 loss-scale overflow", metrics)
        grad_norm = float(self.optimizer.get_grad_norm())
        cause = None
        if not math.isfinite(loss):
            cause = "non-finite loss"
        elif not math.isfinite(grad_norm):
            cause = "non-finite gradient norm"
        if cause is not None:
            self.consecutive_bad += 1
            self.skipped_total += 1
            if self.consecutive_bad >= self.max_consecutive_bad_steps:
                raise NonFiniteError(
                    f"{self.consecutive_bad} consecutive steps skipped; last cause: {cause} "
                    f"(loss={loss}, grad_norm={grad_norm}). Stopping before the optimizer step."
                )
            return StepResult(loss, grad_norm, True, cause, metrics)
        self.consecutive_bad = 0
        self._clip(grad_norm)
        self.optimizer.step_with_ready_grads()
        self.scheduler.step()
        return StepResult(loss, grad_norm, False, None, metrics)

    def _clip(self, grad_norm: float) -> None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = inner.get_parameters()
            if inner.config.clip_grad > 0.0 and params:
                clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=grad_norm)
