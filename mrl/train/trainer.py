"""The training loop: build everything from a ``JobConfig``, then step, log and checkpoint.

``Trainer`` trains on a data loader (sft, dpo, distill); ``mrl.rl.offline.OfflineRLTrainer`` adds
advantages from the rollout rewards of its data, ``mrl.rl.grpo.GRPOTrainer`` replaces the batch
source with online rollouts. One step:

    micro_batches = next_batches()            # this DP rank's rows of the global batch
    prepare(micro_batches)                    # what the loss's batch_needs ask for
    counts = global counts                    # one all-reduce over DP
    result = step(micro_batches, counts)      # forward/backward, guard, optimizer step
    log; maybe checkpoint
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mrl.job import JobConfig
from mrl.data import build_data_loader, build_dataset, build_tokenizer
from mrl.losses.base import BatchNeeds, compute_global_counts
from mrl.losses.factory import build_loss
from mrl.losses.metrics import MetricsAccumulator
from mrl.losses.sft import SFTLossConfig
from mrl.model.builder import build_model, freeze
from mrl.model.hf import is_hf_model_dir, load_hf_weights_
from mrl.parallel.layout import ParallelLayout
from mrl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    resume_point,
    save_checkpoint,
)
from mrl.train.flops import attention_width, count_parameters, peak_flops_per_gpu, training_flops
from mrl.train.forward import annotate_logprobs
from mrl.train.loggers import flat_config
from mrl.train.metrics_log import MetricsLog
from mrl.train.optim import build_optimizer, wrap_ddp
from mrl.train.schedules import Scheduler, SchedulerConfig
from mrl.train.step import StepResult, TrainStep
from mrl.train.stop import StopSignals, signal_name


class Trainer:
    """Builds model, optimizer, loss and data from ``cfg`` on ``layout`` and runs the loop."""

    def __init__(self, cfg: JobConfig, layout: ParallelLayout) -> None:
        self.cfg = cfg
        self.layout = layout
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
        self.output_dir = Path(cfg.log.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} ids"
            )
        self.loss_fn = build_loss(cfg.loss, vocab_size=cfg.model.vocab_size)
        chunks = build_model(cfg.model, cfg.precision, layout, cfg.device, seed=cfg.seed)
        self.reference = self._build_reference()
        self.model = wrap_ddp(chunks, cfg.optim, layout)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.precision, layout)
        self.scheduler = Scheduler(cfg.scheduler, self.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps)
        self.train_step = TrainStep(self.model, self.optimizer, self.scheduler, layout, self.loss_fn,
                                    MetricsAccumulator, max_consecutive_bad_steps=cfg.train.max_consecutive_bad_steps)
        self.log = MetricsLog(self.output_dir, enabled=dist.get_rank() == dist.get_world_size() - 1,
                              total_steps=cfg.train.steps, progress=cfg.log.progress,
                              tensorboard=cfg.log.tensorboard, log_interval=cfg.train.log_interval,
                              trackers=cfg.log, run_config=flat_config(cfg) if cfg.log.wandb or cfg.log.mlflow else None)
        self.step = 0
        self.stop_signals = StopSignals.disabled()  # run_job installs the job's signal handling here
        self.stopped_by: str | None = None  # the signal that stopped the run early, if any
        self.data = self._build_data()
        self.peak_flops = peak_flops_per_gpu() if cfg.device == "cuda" else None
        self.num_params = count_parameters(self.model, layout) if self.peak_flops else None

    # Construction -------------------------------------------------------------------------------

    def _build_data(self):
        return self.data_loader(self.cfg.data)

    def data_loader(self, data_cfg):
        """A loader of this rank's rows of ``data_cfg``, with the job's batch sizes and padding."""
        cfg = self.cfg
        return build_data_loader(
            build_dataset(data_cfg, self.tokenizer), global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp,
            pad_to_multiple_of=cfg.sequence_multiple(),
        )

    def _build_reference(self) -> list | None:
        ref = self.cfg.reference
        if ref.source == "none":
            return None
        # The same seed gives the same initial weights (layout-invariant initialisation).
        chunks = freeze(build_model(self.cfg.model, self.cfg.precision, self.layout, self.cfg.device,
                                    seed=self.cfg.seed))
        source = ref.checkpoint if ref.source == "checkpoint" else self.cfg.train.init_checkpoint
        if source:
            self._load_weights(chunks, source)
        return chunks

    def _load_weights(self, chunks: list, source: str) -> str:
        """Fill ``chunks`` from a Hugging Face model directory or an mrl checkpoint; return which."""
        if is_hf_model_dir(source):
            load_hf_weights_(chunks, source, self.cfg.model)
            return source
        path = resolve_checkpoint(source)
        load_checkpoint(path, chunks, None, self.layout, reseed=self.cfg.seed, restore_rng=False)
        return str(path)

    # The loop -----------------------------------------------------------------------------------

    def train(self) -> list[StepResult]:
        try:
            self._resume()
            self.before_training()
            results = []
            with self.stop_signals.at_step_boundaries():
                while self.step < self.cfg.train.steps:
                    results.append(self.train_one_step())
                    saved = self._should_save()
                    if saved:
                        self.save()
                    signum = self.stop_signals.agreed(self.device)
                    if signum:
                        self._stop_early(signal_name(signum), saved)
                        break
            self.log.close()
            self._summarize()
            return results
        finally:
            self.close()

    def before_training(self) -> None:
        """Runs in ``train`` once the weights are resumed or initialised, before the first step (e.g.
        an SFT warm-up, which must start from ``train.init_checkpoint``'s weights, not replace them)."""

    def close(self) -> None:
        """Runs last in ``train``, also after an error: release what the trainer started."""

    def _summarize(self) -> None:
        """The end-of-run summary: what was trained, and where its outputs are."""
        lines = self.log.summary()
        if not lines:
            return
        latest = self.checkpoint_dir / "latest"
        saved = latest.read_text().strip() if latest.is_file() else "none yet"
        lines += [f"metrics: {self.log.path}; checkpoints: {self.checkpoint_dir} (latest: {saved})",
                  f"export: mrl export-hf {self.output_dir} {self.output_dir}-hf"]
        for line in lines:
            self.announce(line)

    def _stop_early(self, name: str, saved: bool) -> None:
        """A stop signal reached some rank: save this step (unless just saved) and say so."""
        path = self.checkpoint_dir / f"step_{self.step:08d}"
        if not saved:
            path = self.save()
        self.stopped_by = name
        self.announce(f"stopped by {name} at step {self.step}/{self.cfg.train.steps}: saved {path}; "
                      "run the same command again to resume from it")

    def train_one_step(self) -> StepResult:
        started = time.monotonic()
        micro_batches, extra = self.next_batches()
        self.prepare(micro_batches)
        counts = compute_global_counts(micro_batches, self.layout.dp_group,
                                       paired=self.loss_fn.normalizer == "pairs")
        lr = self.scheduler.lr
        training = time.monotonic()
        result = self.train_step(micro_batches, counts)
        self.step += 1
        extra = dict(extra, lr=lr, time_train_s=time.monotonic() - training)
        self._log_step(result, counts, extra, time.monotonic() - started, micro_batches)
        return result

    def next_batches(self) -> tuple[list[dict], dict[str, float]]:
        """This rank's micro-batches for the next step, and metrics about them."""
        return [batch.to(self.device).as_dict() for batch in self.data.next_step()], {}

    def batch_needs(self) -> BatchNeeds:
        """What the step's batches need beyond the data: the loss's ``batch_needs``."""
        return self.loss_fn.batch_needs

    def prepare(self, micro_batches: list[dict]) -> None:
        """Add what ``batch_needs`` asks for (``annotate``), then let the loss read the whole step."""
        self.annotate(micro_batches)
        self.loss_fn.prepare_step(micro_batches, self.layout.dp_group, self.layout.tp_group)

    def annotate(self, micro_batches: list[dict]) -> None:
        """Forward-only passes for the log-probs ``batch_needs`` asks for: the reference model's
        (``ref_logprobs``, with ``ref_logits`` when kept, or its top-k ``teacher_topk_ids`` /
        ``teacher_topk_logprobs``) and the policy's before the update
        (``old_logprobs``, with the value head's ``old_values``), unless the batches carry them."""
        cfg, needs = self.cfg, self.batch_needs()
        common = dict(vocab_size=cfg.model.vocab_size, temperature=needs.temperature, chunk_size=cfg.loss.chunk_size)
        if self.reference is not None and needs.reference_logprobs:
            keep_logits = needs.reference_logits or cfg.reference.keep_logits
            keep_topk = None if needs.reference_topk is None else (
                "teacher_topk_ids", "teacher_topk_logprobs", needs.reference_topk)
            annotate_logprobs(self.reference, micro_batches, self.layout, key="ref_logprobs",
                              keep_logits_key="ref_logits" if keep_logits else None, keep_topk=keep_topk, **common)
        if needs.old_logprobs and "old_logprobs" not in micro_batches[0]:
            annotate_logprobs(self.model, micro_batches, self.layout, key="old_logprobs",
                              values_key="old_values" if cfg.model.value_head else None, **common)

    def sft_steps(self, data_cfg, steps: int, lr: float, log_path: Path) -> None:
        """``steps`` SFT optimizer steps on ``data_cfg`` at a constant ``lr``, outside the run's
        schedule, step count and checkpoints (a warm-up before it). Each step's loss and gradient
        norm go to ``log_path`` (jsonl), with a progress line every ``train.log_interval`` steps."""
        cfg = self.cfg
        loader = self.data_loader(data_cfg)
        constant = Scheduler(SchedulerConfig(style="constant"), self.optimizer, lr, cfg.optim.weight_decay, steps)
        step_fn = TrainStep(self.model, self.optimizer, constant, self.layout,
                            build_loss(SFTLossConfig(), vocab_size=cfg.model.vocab_size), MetricsAccumulator,
                            max_consecutive_bad_steps=cfg.train.max_consecutive_bad_steps)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for step in range(1, steps + 1):
            batches = [b.to(self.device).as_dict() for b in loader.next_step()]
            result = step_fn(batches, compute_global_counts(batches, self.layout.dp_group))
            if self.log.enabled:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps({"warmup_step": step, "loss": result.loss,
                                             "grad_norm": result.grad_norm}) + "\n")
                if step % cfg.train.log_interval == 0 or step == steps:
                    eta = (time.monotonic() - started) / step * (steps - step)
                    print(f"sft warm-up {step}/{steps} | loss {result.loss:.4f} | "
                          f"eta {int(eta) // 60}:{int(eta) % 60:02d}", flush=True)
        self.scheduler.apply()  # back to the run's schedule

    # Logging and checkpoints ----------------------------------------------------------------------

    def _log_step(self, result: StepResult, counts, extra: dict, seconds: float, micro_batches: list[dict]) -> None:
        record = {
            "step": self.step,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "skipped_total": self.train_step.skipped_total,
            "num_tokens": counts.num_tokens,
            "tokens_per_s": counts.num_tokens / max(seconds, 1e-9),
            "step_time_s": seconds,
        }
        if result.skip_reason:
            record["skip_reason"] = result.skip_reason
        if self.peak_flops:
            rows = sum(batch["tokens"].shape[0] for batch in micro_batches) * self.layout.dp
            seq = micro_batches[0]["tokens"].shape[1]
            flops = training_flops(self.num_params, self.cfg.model.num_layers, attention_width(self.cfg.model), seq,
                                   rows * seq)
            record["mfu"] = flops / (seconds * self.layout.world_size * self.peak_flops)
        record.update({k: v for k, v in result.metrics.items() if k != "loss"})
        record.update(extra)
        self.log.write(record)

    def _should_save(self) -> bool:
        interval = self.cfg.train.save_interval
        return self.step == self.cfg.train.steps or (interval > 0 and self.step % interval == 0)

    def extra_models(self) -> dict[str, list]:
        """Models saved in checkpoints beside the policy (none for data-driven training)."""
        return {}

    def trainer_state(self) -> dict:
        state = {"data": self.data.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "skipped_total": self.train_step.skipped_total, "seed": self.cfg.seed,
                 "optimizer": self._optimizer_signature()}
        loss_state = self._loss_state()
        if loss_state:
            state["loss"] = loss_state
        return state

    def _loss_state(self) -> dict:
        """The loss's ``state_dict`` as the last rank holds it (the last pipeline stage, where the
        loss runs; rank 0 writes the checkpoint's trainer state). Every rank must call it."""
        if not self.loss_fn.state_dict():
            return {}
        box = [self.loss_fn.state_dict()]
        dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        return box[0]

    def _optimizer_signature(self) -> dict:
        """What the optimizer state's format depends on; a resume must match it."""
        return {"name": self.cfg.optim.name, "distributed": self.cfg.optim.distributed,
                "dtype": self.cfg.precision.dtype}

    def load_trainer_state(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_step.skipped_total = state["skipped_total"]
        if "loss" in state:
            self.loss_fn.load_state_dict(state["loss"])

    def save(self) -> Path:
        path = save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, self.layout,
                               self.trainer_state(), self.extra_models())
        if dist.get_rank() == 0:
            kept = sorted(p for p in self.checkpoint_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
            for old in kept[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def _resume(self) -> None:
        path, warning = resume_point(self.checkpoint_dir, fallback=self.cfg.train.resume_fallback)
        if warning:
            self.announce(f"warning: {warning}")
        if path is not None:
            saved = read_trainer_state(path).get("optimizer")
            if saved is not None and saved != self._optimizer_signature():
                raise CheckpointError(
                    f"{path / 'trainer.json'}: the checkpoint's optimizer state is {saved}, but this run uses "
                    f"{self._optimizer_signature()}; resume with the same optim.name, optim.distributed and "
                    "precision.dtype, or start from its weights with train.init_checkpoint in a new output directory"
                )
            state = load_checkpoint(path, self.model, self.optimizer, self.layout, reseed=self.cfg.seed,
                                    extra_models=self.extra_models())
            self.step = int(state["step"])
            self.load_trainer_state(state)
            self.log.resume_from(self.step)
            self.announce(f"resumed from {path} at step {self.step}"
                          + (" (resharded to a new layout)" if state["resharded"] else ""))
        elif self.cfg.train.init_checkpoint:
            source = self._load_weights(self.model, self.cfg.train.init_checkpoint)
            # bf16/fp16 models: the optimizer's fp32 main weights were copied at construction.
            self.optimizer.reload_model_params()
            self.announce(f"initialised model weights from {source}")

    def announce(self, message: str) -> None:
        if self.log.enabled:
            print(f"[mrl] {message}", flush=True)
