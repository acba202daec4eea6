"""Typed configuration of online GRPO: sampling, rewards, advantages, warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from mrl.config.checks import require_optional_positive_ints, require_positive_ints
from mrl.data.config import DataConfig

GIB = 2**30

ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "gae", "reinforce++", "reinforce++-baseline", "remax",
                                         "opo", "passk", "optimal-token-baseline")
"""The names of ``mrl.rl.advantages.ESTIMATORS`` (this module stays free of torch)."""

KL_IN_REWARD_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce++", "reinforce++-baseline", "optimal-token-baseline")
"""Estimators with per-token rewards, to which rollout.kl_in_reward_coef applies."""


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout.engine: vllm``): one engine per data-parallel replica,
    started with dummy weights and refit in place from the policy before every rollout."""

    tensor_parallel_size: int = 1
    """Tensor-parallel size of each engine (its own worker processes); independent of parallel.tp."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Engine weights and activations; auto: precision.dtype. fp32 makes engine and trainer
    log-probs agree to ~1e-6; bf16 to ~1e-2 (see loss.is_correction)."""

    kv_cache_gib: int = 1
    """KV-cache space of each engine on CPU, in whole GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."""

    gpu_memory_utilization: float = 0.5
    """Fraction of each GPU's memory the engine may take (weights + KV cache) on GPU; the trainer
    shares the GPU, so leave it room."""

    max_model_len: Optional[int] = None
    """Longest prompt + completion the engine accepts, in tokens; null: data.seq_length."""

    block_size: Optional[int] = None
    """Tokens per KV-cache block; null: vLLM's default for the platform."""

    enforce_eager: bool = True
    """Run the model eagerly (no torch.compile / CUDA graphs): starts in seconds instead of
    compiling for tens of seconds; false is faster per token on GPU."""

    prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (the G responses of a prompt); it is reset after
    every refit, since KV computed with the old weights would be stale."""

    sleep_during_training: bool = True
    """On GPU, free the engine's KV cache while the trainer steps and reallocate it for the next
    rollout (vLLM sleep mode); ignored on CPU, where sleep mode does nothing."""

    refit_bucket_mb: int = 256
    """Weights move from the trainer to the engine in buckets of at most this many MiB (one tensor
    larger than a bucket travels alone): the peak extra memory of a refit on each sending rank."""

    cpu_threads: Optional[str] = None
    """CPU cores of each engine worker (vLLM's VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1", or "0|1" for
    tensor_parallel_size 2); null: this process's allowed cores, split evenly among the workers."""

    start_timeout_s: float = 600.0
    """Seconds the engine may take to start before the run stops with an error."""

    refit_timeout_s: float = 600.0
    """Seconds one bucket's load into the engine may take before the run stops with an error."""

    def __post_init__(self) -> None:
        require_positive_ints(self, ("tensor_parallel_size", "refit_bucket_mb", "kv_cache_gib"))
        require_optional_positive_ints(self, ("max_model_len", "block_size"))
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be one of auto, fp32, bf16, fp16, got {self.dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("start_timeout_s", "refit_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class RolloutConfig:
    """Online rollouts: G responses per prompt sampled from the policy itself, then rewarded."""

    group_size: int = 4
    """Responses sampled per prompt (G); train.global_batch_size counts responses, so prompts per
    step = global_batch_size / group_size."""

    max_new_tokens: int = 8
    """Longest response, in tokens (generation also stops at eos)."""

    temperature: float = 1.0
    """Sampling temperature; the training log-probs use the same temperature."""

    top_k: int = 0
    """Sample from the k most likely tokens only (0: all). The loss's log-probs stay those of the
    full tempered distribution; each sampled token also carries its log-prob under the truncated one."""

    top_p: float = 1.0
    """Sample from the smallest most-likely set of tokens whose probability reaches top_p (1: all);
    applied after top_k, within the renormalised top-k."""

    engine: Literal["megatron", "vllm"] = "megatron"
    """Rollout source: megatron (KV-cached decoding of the policy's own weights on its own layout) or
    vllm (a vLLM engine per data-parallel replica, refit from the policy; see rollout.vllm)."""

    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vLLM engine (rollout.engine: vllm)."""

    decode_rows: Optional[int] = None
    """Rows decoded together (one wave) on each data-parallel rank; None: as many as
    rollout.kv_cache_gib allows, at most all of the rank's rows of a rollout."""

    kv_cache_gib: float = 4.0
    """KV-cache budget of each rank, in GiB: one wave needs 2 · layers/pp · kv_heads/tp · head_dim ·
    rows · data.seq_length · bytes per activation element."""

    reward: str = "mrl.data.tasks:reverse_word_reward"
    """Reward function as 'module:function', called as f(prompt, completion[, answer]); it returns
    one number (outcome reward, GRPO advantages per response) or a list of per-character credits
    (one per character plus one for the end: token-level advantages, see mrl.rl.credit)."""

    normalize_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); false gives Dr. GRPO."""

    leave_one_out: bool = False
    """Baseline each response with the mean of the other responses of its group (RLOO)."""

    advantage_estimator: Literal["grpo", "rloo", "gae", "reinforce++", "reinforce++-baseline", "remax", "opo",
                                 "passk", "optimal-token-baseline"] = "grpo"
    """How rewards become advantages (mrl.rl.advantages; every estimator's docstring gives its
    formula and source). grpo: group-normalised rewards (normalize_std, leave_one_out; per-token
    credits: per position); with loss.kind ppo and a value head it is the critic's R − V_old, as
    always. rloo: leave-one-out group mean, no std division. gae: GAE(gamma, lam) from the value
    head (needs model.value_head), whitened. reinforce++: discounted return-to-go, whitened over the
    global batch. reinforce++-baseline: the same after subtracting the group mean reward. remax:
    minus the reward of the prompt's greedy completion (online GRPO, megatron engine). opo:
    minus the length-weighted group mean. passk: the pass@k / max@k advantage of PKPO (pass_k).
    optimal-token-baseline: per-token baseline weighted by the accumulated score-norm proxy."""

    gamma: float = 1.0
    """Discount γ in [0, 1] of the token-level estimators (gae, reinforce++, reinforce++-baseline,
    optimal-token-baseline)."""

    lam: float = 1.0
    """GAE λ in [0, 1] (advantage_estimator: gae); γ = λ = 1 gives return-to-go minus value."""

    whiten_advantages: bool = True
    """gae, reinforce++ and reinforce++-baseline: whiten the advantages, (A − mean) / std over the
    valid tokens of the global batch (every DP rank)."""

    kl_in_reward_coef: float = 0.0
    """β of KL as a reward penalty: every token's reward gets −β·(log π_old − log π_ref) before
    the estimator (gae, reinforce++, reinforce++-baseline, optimal-token-baseline; needs a reference
    model). Independent of loss.kl_coef, the KL term of the loss; 0 disables."""

    pass_k: int = 2
    """k of advantage_estimator: passk (>= 2, at most rollout.group_size online; offline groups
    smaller than k use their size)."""

    updates_per_rollout: int = 1
    """Mini-batches each rollout batch is split into, one optimizer step each; 1 with epochs 1 is
    strictly on-policy (ratio exactly 1)."""

    epochs: int = 1
    """Passes over each rollout batch (PPO epochs); every pass takes updates_per_rollout steps with
    the ratio taken against the log-probs from before the first pass."""

    sft_warmup_steps: int = 0
    """SFT steps on warmup_data before GRPO starts (gives a tiny random model a reward signal)."""

    warmup_lr: Optional[float] = None
    """Constant learning rate of the SFT warm-up; None uses optim.lr."""

    warmup_data: DataConfig = field(default_factory=lambda: DataConfig(kind="sft"))
    """SFT data for the warm-up steps."""

    def __post_init__(self) -> None:
        for name in ("group_size", "max_new_tokens", "updates_per_rollout", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.engine not in ("megatron", "vllm"):
            raise ValueError(f"engine must be one of megatron, vllm, got {self.engine!r}")
        require_optional_positive_ints(self, ("decode_rows",))
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.sft_warmup_steps < 0:
            raise ValueError(f"sft_warmup_steps must be >= 0, got {self.sft_warmup_steps}")
        if self.warmup_lr is not None and not self.warmup_lr > 0:
            raise ValueError(f"warmup_lr must be > 0 or null, got {self.warmup_lr}")
        if ":" not in self.reward:
            raise ValueError(f"reward must be 'module:function', got {self.reward!r}")
        self._check_advantages()
        if self.warmup_data.kind != "sft":
            raise ValueError(f"warmup_data.kind must be 'sft', got {self.warmup_data.kind!r}")

    def _check_advantages(self) -> None:
        estimators = ADVANTAGE_ESTIMATORS
        if self.advantage_estimator not in estimators:
            raise ValueError(f"advantage_estimator must be one of {', '.join(estimators)}, "
                             f"got {self.advantage_estimator!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.kl_in_reward_coef >= 0.0:
            raise ValueError(f"kl_in_reward_coef must be >= 0, got {self.kl_in_reward_coef}")
        if self.kl_in_reward_coef > 0 and self.advantage_estimator not in KL_IN_REWARD_ESTIMATORS:
            raise ValueError(f"kl_in_reward_coef applies to the estimators with per-token rewards "
                             f"({', '.join(KL_IN_REWARD_ESTIMATORS)}), not advantage_estimator="
                             f"{self.advantage_estimator!r}")
        if not isinstance(self.pass_k, int) or self.pass_k < 2:
            raise ValueError(f"pass_k must be an integer >= 2, got {self.pass_k!r}")

    def check_job(self, *, algorithm: str, value_head: bool, reference: str) -> None:
        """Cross-field checks of the advantage settings against the rest of the job (ValueError
        naming the fields)."""
        name = self.advantage_estimator
        if self.kl_in_reward_coef > 0 and reference == "none":
            raise ValueError("rollout.kl_in_reward_coef > 0 needs a reference model: set reference.source "
                             "to 'initial' or 'checkpoint'")
        if name == "gae" and not value_head:
            raise ValueError("rollout.advantage_estimator=gae needs model.value_head: true (the values V(t))")
        if name == "remax":
            if algorithm != "grpo":
                raise ValueError(f"rollout.advantage_estimator=remax needs online rollouts (algorithm: grpo), "
                                 f"got algorithm={algorithm}")
            if self.engine != "megatron":
                raise ValueError("rollout.advantage_estimator=remax needs greedy rollouts, which "
                                 "rollout.engine=megatron decodes; set rollout.engine: megatron")
        if name == "passk" and algorithm == "grpo" and self.pass_k > self.group_size:
            raise ValueError(f"rollout.pass_k={self.pass_k} must be <= rollout.group_size={self.group_size}")

    def wave_rows(self, bytes_per_row: int, rows_per_rank: int) -> int:
        """Rows of one decoding wave; ``ValueError`` naming the field when the budget is too small."""
        budget = self.kv_cache_gib * GIB
        if bytes_per_row > budget:
            raise ValueError(
                f"rollout.kv_cache_gib={self.kv_cache_gib:g} is too small for one row: its KV cache needs "
                f"{bytes_per_row / GIB:.3g} GiB; raise rollout.kv_cache_gib or shorten data.seq_length"
            )
        if self.decode_rows is not None:
            if self.decode_rows * bytes_per_row > budget:
                raise ValueError(
                    f"rollout.decode_rows={self.decode_rows} needs a {self.decode_rows * bytes_per_row / GIB:.3g} GiB "
                    f"KV cache, over rollout.kv_cache_gib={self.kv_cache_gib:g}; at most "
                    f"{int(budget // bytes_per_row)} rows fit"
                )
            return min(self.decode_rows, rows_per_rank)
        return max(1, min(rows_per_rank, int(budget // bytes_per_row)))


def kv_cache_bytes_per_row(model, parallel, seq_length: int, dtype: str) -> int:
    """Bytes of one row's KV cache on one rank: 2 · layers/pp · kv_heads/tp · head_dim · S · bytes."""
    kv_heads = model.num_query_groups or model.num_attention_heads
    head_dim = model.kv_channels
    element = 4 if dtype == "fp32" else 2
    return 2 * (model.num_layers // parallel.pp) * max(kv_heads // parallel.tp, 1) * head_dim * seq_length * element
