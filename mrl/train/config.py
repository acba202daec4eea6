"""Typed configuration of the training loop, the reference model and logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mrl.config.checks import require_positive_ints


@dataclass
class TrainConfig:
    """Steps, batch sizes, checkpointing and failure handling."""

    steps: int = 10
    """Optimizer steps to train for (a re-run resumes and stops at the same step)."""

    global_batch_size: int = 8
    """Rows per optimizer step over all data-parallel ranks (= micro · micro-batches · dp); in
    online GRPO, rows (responses) per rollout, split over rollout.updates_per_rollout steps."""

    micro_batch_size: int = 2
    """Rows per forward/backward pass on one rank."""

    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""

    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted after a successful save)."""

    log_interval: int = 1
    """Write a progress line every this many steps (metrics.jsonl always gets every step)."""

    max_consecutive_bad_steps: int = 3
    """Stop the run after this many consecutive steps with a non-finite loss or gradient norm."""

    stop_timeout_s: int = 240
    """On SIGTERM, SIGINT or SIGUSR1 (a SLURM time limit, preemption or early warning; Ctrl-C) the
    ranks finish the current step and save a checkpoint; a rank still running this many seconds
    after the signal exits without one. 0: stop at once, no checkpoint. Keep it below the time the
    scheduler allows before SIGKILL (launch/mrl.sbatch asks SLURM for its warning 300 s ahead)."""

    resume_fallback: bool = False
    """When the latest checkpoint is damaged (a missing or truncated file), resume from the newest
    complete checkpoint before it (the steps after it are trained again) instead of stopping with
    an error that names the file and that checkpoint."""

    allow_config_changes: bool = False
    """Resume a run whose config.yaml differs from this recipe in more than bookkeeping (steps,
    intervals, layout, logging), e.g. in the learning rate; the changes are printed and recorded
    in <output_dir>/config_changes.jsonl. Changes the checkpoints cannot take (model.*, the
    tokenizer, the optimizer's state format) are refused regardless."""

    init_checkpoint: Optional[str] = None
    """Start from these model weights: an mrl checkpoint directory (e.g. an SFT run's) or a Hugging
    Face model directory (config.json + safetensors; Llama, Mistral, Qwen2, Qwen3), whose config
    must match model.* (checked by `mrl validate`). It also seeds reference.source=initial. Optimizer
    and step start fresh; ignored when the run's own output directory has a checkpoint."""

    def __post_init__(self) -> None:
        require_positive_ints(self, ("steps", "global_batch_size", "micro_batch_size", "log_interval",
                                              "max_consecutive_bad_steps", "keep_checkpoints"))
        for name in ("save_interval", "stop_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.global_batch_size % self.micro_batch_size != 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per rank per step; raises ``ValueError`` naming the batch sizes."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step != 0:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must equal train.micro_batch_size="
                f"{self.micro_batch_size} × micro-batches × dp={dp}; it is not a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class ReferenceConfig:
    """The frozen reference policy (KL penalty, DPO)."""

    source: Literal["none", "initial", "checkpoint"] = "none"
    """'initial': a frozen copy of the policy's starting weights; 'checkpoint': weights loaded from
    reference.checkpoint; 'none': no reference model (reference log-probs must come from data)."""

    checkpoint: Optional[str] = None
    """Weights for source='checkpoint': an mrl checkpoint / run directory or a Hugging Face directory."""

    keep_logits: bool = False
    """Keep the reference logits (sharded) for exact full-vocabulary KL or distillation instead of
    only the reference log-probs of the labels. Costs one logits shard per row of the step."""

    def __post_init__(self) -> None:
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("source=checkpoint needs checkpoint: the directory of the reference weights")


@dataclass
class LogConfig:
    """Where and how metrics are written."""

    output_dir: str = "outputs/run"
    """Run directory: config.yaml, metrics.jsonl and checkpoints/ go here."""

    tensorboard: bool = False
    """Also write TensorBoard event files to <output_dir>/tensorboard (needs the tensorboard extra)."""

    progress: bool = True
    """Print a progress line with ETA on the logging rank."""

    wandb: bool = False
    """Also log every step to Weights & Biases (needs the wandb extra), under <output_dir>/wandb."""

    wandb_project: Optional[str] = None
    """Weights & Biases project (None: the output directory's name)."""

    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: write the run locally only (upload later with `wandb sync <output_dir>/wandb`);
    online: stream it to the server (needs WANDB_API_KEY and network access on the logging rank)."""

    mlflow: bool = False
    """Also log every step and the resolved recipe to MLflow (needs the mlflow extra)."""

    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking URI (None: a file store in <output_dir>/mlruns, no server needed)."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online"):
            raise ValueError(f"wandb_mode must be offline or online, got {self.wandb_mode!r}")
