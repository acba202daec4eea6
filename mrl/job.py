"""``JobConfig``: the whole recipe, and the cross-field checks that run before any process group.

It gathers every subsystem's config section, so it sits above them all, next to the runner;
``mrl.config`` (loading, converting, documenting any config dataclass) imports nothing of mrl's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from mrl.algorithms import AlgorithmName, algorithms_with, get_algorithm
from mrl.config.checks import require_optional_positive_ints
from mrl.data.config import DataConfig
from mrl.losses.factory import LossConfig, build_loss
from mrl.losses.sft import SFTLossConfig
from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.parallel.layout import ParallelConfig, check_expert_divisibility, check_model_divisibility
from mrl.rl.config import RolloutConfig
from mrl.train.config import LogConfig, ReferenceConfig, TrainConfig
from mrl.train.optim import OptimConfig
from mrl.train.schedules import SchedulerConfig


@dataclass
class JobConfig:
    """A training job: what to train, on which layout, with which data and loss."""

    algorithm: AlgorithmName = "sft"
    """Training loop (mrl.algorithms): sft, dpo, grpo (online rollouts from the policy), offline-rl
    (GRPO/PPO on rollout files), distill (KL to a teacher's full distribution)."""

    device: Literal["cpu", "cuda"] = "cpu"
    """cpu: gloo ranks on the CPU (tests, CI, quick start); cuda: one GPU per rank with NCCL."""

    nproc: Optional[int] = None
    """Ranks that `mrl train` starts on this machine when run outside a launcher (None: the
    number the layout needs with dp=1)."""

    seed: int = 1234
    """Seed of weight initialisation, data order and sampling."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerical precision and FP8."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate and weight-decay schedules."""

    loss: LossConfig = field(default_factory=SFTLossConfig)
    """Loss; its 'kind' selects the loss and its fields (sft, dpo, grpo, ppo, distill)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, checkpoints."""

    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Frozen reference model."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Online rollouts (algorithm: grpo)."""

    log: LogConfig = field(default_factory=LogConfig)
    """Outputs and logging."""

    def __post_init__(self) -> None:
        require_optional_positive_ints(self, ("nproc",))

    def validate(self, world_size: int | None = None) -> None:
        """Cross-field checks; raises ``ValueError`` naming the fields. Runs before any group exists."""
        world = world_size or self.default_world_size()
        dp = self.parallel.data_parallel_size(world)
        check_model_divisibility(
            self.parallel,
            num_layers=self.model.num_layers,
            num_attention_heads=self.model.num_attention_heads,
            num_query_groups=self.model.num_query_groups,
            padded_vocab_size=self.model.padded_vocab_size(self.parallel.tp),
        )
        check_expert_divisibility(self.parallel, num_experts=self.model.num_experts, world_size=world)
        self._check_algorithm()
        self._check_device()
        self._check_lengths()
        microbatches = self.train.num_microbatches(dp)
        if self.parallel.vpp and microbatches % self.parallel.pp != 0:
            raise ValueError(
                f"interleaved pipelining needs micro-batches per rank ({microbatches}) to be a multiple "
                f"of parallel.pp={self.parallel.pp}"
            )
        self._check_algorithm_batches(dp)
        self._check_initial_weights()

    def default_world_size(self) -> int:
        return self.nproc or self.parallel.world_size() or self.parallel.model_parallel_size()

    def sequence_multiple(self) -> int:
        """Padded sequence lengths must be multiples of this for the layout and precision."""
        multiple = self.precision.seq_multiple() * (2 * self.parallel.cp if self.parallel.cp > 1 else 1)
        if self.parallel.sequence_parallel:
            multiple *= self.parallel.tp
        return multiple

    def rollout_wave_rows(self, dp: int) -> tuple[int, int]:
        """(rows per decoding wave, KV-cache bytes per row) of online rollouts on each rank."""
        from mrl.rl.config import kv_cache_bytes_per_row

        per_row = kv_cache_bytes_per_row(self.model, self.parallel, self.data.seq_length, self.precision.dtype)
        return self.rollout.wave_rows(per_row, self.train.global_batch_size // dp), per_row

    def _check_vllm(self) -> None:
        engine = self.rollout.vllm
        if (engine.max_model_len or self.data.seq_length) < self.data.seq_length:
            raise ValueError(f"rollout.vllm.max_model_len={engine.max_model_len} must be >= "
                             f"data.seq_length={self.data.seq_length}")
        heads = self.model.num_attention_heads
        if heads % engine.tensor_parallel_size != 0:
            raise ValueError(f"rollout.vllm.tensor_parallel_size={engine.tensor_parallel_size} must divide "
                             f"model.num_attention_heads={heads}")
        # The replica's other ranks wait in a collective while its first rank starts or refits the
        # engine: past the collective timeout they would fail with a bare gloo/NCCL timeout instead.
        collective_s = self.parallel.timeout_minutes * 60
        for name in ("start_timeout_s", "refit_timeout_s"):
            if getattr(engine, name) >= collective_s:
                raise ValueError(f"rollout.vllm.{name}={getattr(engine, name):g} must be below "
                                 f"parallel.timeout_minutes={self.parallel.timeout_minutes:g} (= {collective_s:g} s), "
                                 "the time the other ranks wait in a collective for the engine")

    def _check_initial_weights(self) -> None:
        """Hugging Face starting or reference weights must hold the architecture model.* describes."""
        from mrl.model.hf import check_model_matches_hf, is_hf_model_dir

        sources = [self.train.init_checkpoint]
        if self.reference.source == "checkpoint":
            sources.append(self.reference.checkpoint)
        for source in sources:
            if source and is_hf_model_dir(source):
                check_model_matches_hf(self.model, source)

    def _check_algorithm(self) -> None:
        algorithm = get_algorithm(self.algorithm)
        kinds, losses = algorithm.data_kinds, algorithm.loss_kinds
        if self.data.kind not in kinds:
            raise ValueError(f"algorithm={self.algorithm} reads data.kind {kinds}, got data.kind={self.data.kind!r}")
        if self.loss.kind not in losses:
            raise ValueError(f"algorithm={self.algorithm} trains with loss.kind {losses}, got loss.kind={self.loss.kind!r}")
        needs = build_loss(self.loss).batch_needs
        if needs.reference_logprobs and self.reference.source == "none":
            raise ValueError(
                f"algorithm={self.algorithm} with loss.kind={self.loss.kind} needs a reference model: "
                "set reference.source to 'initial' or 'checkpoint'"
            )
        if needs.reference_logits and not self.reference.keep_logits:
            raise ValueError("exact KL / distillation needs reference.keep_logits: true")
        if self.loss.kind == "ppo" and getattr(self.loss, "value_coef", 0.0) > 0 and not self.model.value_head:
            raise ValueError("loss.value_coef > 0 needs model.value_head: true")
        if algorithm.rewards:
            self.rollout.check_job(algorithm=self.algorithm, value_head=self.model.value_head,
                                   reference=self.reference.source)
        if self.data.tokenizer == "byte" and self.model.vocab_size < 259:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's 259 ids"
            )

    def _check_device(self) -> None:
        impl, precision = self.model.transformer_impl, self.precision
        if impl == "transformer_engine" and self.device != "cuda":
            raise ValueError("model.transformer_impl=transformer_engine needs device: cuda")
        if precision.fp8 is not None and impl == "local":
            raise ValueError("precision.fp8 needs Transformer Engine layers; model.transformer_impl=local has none")
        if precision.fp8 is not None and precision.first_last_layers_bf16:
            per_stage = self.model.num_layers // (self.parallel.pp * (self.parallel.vpp or 1))
            for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
                value = getattr(precision, name)
                if not 0 <= value <= per_stage:
                    raise ValueError(
                        f"precision.{name}={value} must be between 0 and the {per_stage} layers of a pipeline stage"
                    )
        if self.device == "cpu":
            if self.parallel.cp > 1:
                raise ValueError(
                    f"parallel.cp={self.parallel.cp}: context parallelism needs Transformer Engine "
                    "attention on CUDA; on device: cpu use parallel.cp=1"
                )
            if self.precision.fp8 is not None:
                raise ValueError("precision.fp8 needs device: cuda with Transformer Engine")
            if self.precision.dtype == "fp16":
                raise ValueError("precision.dtype=fp16 is not supported on device: cpu; use fp32 or bf16")

    def _check_lengths(self) -> None:
        multiple = self.sequence_multiple()
        if self.data.seq_length % multiple != 0:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} must be a multiple of {multiple} for this layout "
                f"and precision (sequence parallel tp={self.parallel.tp if self.parallel.sequence_parallel else 1}, "
                f"cp={self.parallel.cp}, fp8 recipe {self.precision.fp8_recipe if self.precision.fp8 else 'none'})"
            )
        if self.data.seq_length > self.model.max_sequence_length:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds model.max_sequence_length="
                f"{self.model.max_sequence_length}"
            )
        if self.data.pad_to != "seq_length" and self.parallel.pp > 1:
            raise ValueError("data.pad_to=longest needs parallel.pp=1 (pipeline stages exchange fixed shapes)")
        if self.data.packing and self.device != "cpu":
            raise ValueError(
                "data.packing needs device: cpu for now (the block-diagonal attention mask works with "
                "Megatron's unfused local softmax; on GPU, packed rows need Transformer Engine's THD "
                "layout, which mrl does not wire yet); use data.packing: false"
            )

    def _check_algorithm_batches(self, dp: int) -> None:
        train, algorithm = self.train, get_algorithm(self.algorithm)
        if self.data.kind == "preference" and train.micro_batch_size % 2 != 0:
            raise ValueError(f"preference pairs stay together: train.micro_batch_size={train.micro_batch_size} "
                             "must be even")
        if algorithm.rewards and not algorithm.online and self.data.group_size is not None:
            if train.global_batch_size % self.data.group_size != 0:
                raise ValueError(
                    f"train.global_batch_size={train.global_batch_size} must be a multiple of "
                    f"data.group_size={self.data.group_size} (whole groups in every step)"
                )
        if self.loss.kind == "ppo" and getattr(self.loss, "value_coef", 0.0) > 0 and not algorithm.rewards:
            rewarded = " or ".join(algorithms_with(rewards=True))
            raise ValueError(f"loss.value_coef > 0 needs rewards: algorithm {rewarded}")
        if algorithm.online:
            group = self.rollout.group_size
            if train.global_batch_size % (group * dp) != 0:
                raise ValueError(
                    f"train.global_batch_size={train.global_batch_size} must be a multiple of "
                    f"rollout.group_size={group} × dp={dp} (whole groups on every data-parallel rank)"
                )
            microbatches = train.num_microbatches(dp)
            updates = self.rollout.updates_per_rollout
            if microbatches % updates != 0:
                raise ValueError(
                    f"the {microbatches} micro-batches per rank of a rollout must split evenly into "
                    f"rollout.updates_per_rollout={updates} optimizer steps"
                )
            if self.parallel.vpp and (microbatches // updates) % self.parallel.pp != 0:
                raise ValueError(
                    f"interleaved pipelining needs the micro-batches of each update ({microbatches // updates}) "
                    f"to be a multiple of parallel.pp={self.parallel.pp}"
                )
            if getattr(self.loss, "temperature", 1.0) != self.rollout.temperature:
                raise ValueError(
                    f"loss.temperature={getattr(self.loss, 'temperature', 1.0)} must equal "
                    f"rollout.temperature={self.rollout.temperature} (log-probs of the sampling distribution)"
                )
            if self.data.seq_length < 4 + self.rollout.max_new_tokens:
                raise ValueError("data.seq_length leaves no room for prompts after rollout.max_new_tokens")
            if self.rollout.engine == "megatron":
                self.rollout_wave_rows(dp)
            else:
                self._check_vllm()
