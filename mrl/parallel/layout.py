"""The parallel layout: degrees, their validation, and the process groups built from them.

``ParallelLayout`` is the one object that holds the TP/PP/virtual-PP/CP/DP degrees and the process
groups (a Megatron-Core ``ProcessGroupCollection``). It is created once from a ``ParallelConfig``
and the world size and passed explicitly to whatever needs a group. Megatron-Core still keeps its
own ``parallel_state`` globals (its layers read them); the layout is built on top of them and is
the only place in mrl that creates or destroys them.

Rank order is Megatron's default ``tp-cp-ep-dp-pp``: TP ranks are adjacent, PP stages are farthest
apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mrl.config.checks import require_optional_positive_ints, require_positive_ints


@dataclass
class ParallelConfig:
    """Parallel degrees. Their product tp·pp·cp·dp must equal the number of ranks."""

    tp: int = 1
    """Tensor-parallel degree: each linear layer (and the vocabulary) is split over this many ranks."""

    pp: int = 1
    """Pipeline-parallel degree: the layers are split into this many consecutive stages."""

    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None disables interleaving."""

    cp: int = 1
    """Context-parallel degree (sequence split across ranks inside attention); GPU only."""

    dp: int | None = None
    """Data-parallel degree; None derives it as world_size / (tp·pp·cp)."""

    sequence_parallel: bool = False
    """Shard activations along the sequence inside TP regions (needs tp > 1)."""

    ep: int = 1
    """Expert-parallel degree (MoE models): each MoE layer's experts are split over this many ranks,
    which exchange tokens with model.moe_token_dispatcher. It divides the tp·cp·dp ranks of a stage
    together with etp and does not change the data-parallel degree of the dense layers."""

    etp: int | None = None
    """Expert tensor-parallel degree: each expert's MLP is split over this many ranks; None means tp
    (Megatron's default)."""

    timeout_minutes: float = 30.0
    """Timeout of every collective (process-group creation included): a rank that waits longer raises
    instead of hanging. Raise it when checkpoint saves or evaluation stall some ranks for long."""

    def __post_init__(self) -> None:
        require_positive_ints(self, ("tp", "pp", "cp", "ep"))
        require_optional_positive_ints(self, ("dp", "vpp", "etp"))
        if self.ep > 1 and self.cp > 1:
            raise ValueError(f"ep={self.ep} with cp={self.cp} is not supported (expert "
                             "parallelism with context parallelism is untested in mrl)")
        if self.vpp is not None:
            if self.pp < 2:
                raise ValueError(f"vpp={self.vpp} needs pp >= 2, got pp={self.pp}")
        if not isinstance(self.timeout_minutes, (int, float)) or isinstance(self.timeout_minutes, bool) \
                or self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be > 0, got {self.timeout_minutes!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1, got tp=1")

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel degree (etp, or tp when etp is null)."""
        return self.tp if self.etp is None else self.etp

    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the model: tp·pp·cp."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        """The DP degree for ``world_size`` ranks; raises ``ValueError`` listing every degree."""
        mp = self.model_parallel_size()
        if self.dp is not None:
            if mp * self.dp != world_size:
                raise ValueError(
                    f"parallel degrees tp={self.tp} × pp={self.pp} × cp={self.cp} × dp={self.dp} "
                    f"= {mp * self.dp} do not match the world size {world_size}"
                )
            return self.dp
        if world_size % mp != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp={self.tp} × pp={self.pp} × "
                f"cp={self.cp} = {mp}, so no data-parallel degree dp fits"
            )
        return world_size // mp

    def world_size(self) -> int | None:
        """The number of ranks this layout needs, when dp is given."""
        return None if self.dp is None else self.model_parallel_size() * self.dp


def check_expert_divisibility(config: ParallelConfig, *, num_experts: int | None, world_size: int,
                              sequence_parallel_needed: bool = True) -> None:
    """Raise ``ValueError`` naming the numbers when the experts do not split over the layout."""
    etp = config.expert_tp
    if num_experts is None:
        if config.ep > 1 or config.etp is not None:
            raise ValueError(f"parallel.ep={config.ep} / parallel.etp={config.etp} need a MoE model "
                             "(model.num_experts); a dense model has no experts to split")
        return
    if num_experts % config.ep != 0:
        raise ValueError(f"model.num_experts={num_experts} is not divisible by expert-parallel degree "
                         f"parallel.ep={config.ep}")
    stage_ranks = world_size // config.pp
    if stage_ranks % (config.ep * etp) != 0:
        raise ValueError(
            f"parallel.ep={config.ep} × expert tensor parallel etp={etp} = {config.ep * etp} does not divide "
            f"the {stage_ranks} ranks of a pipeline stage (world size {world_size} / pp={config.pp})")
    if sequence_parallel_needed and config.tp > 1 and not config.sequence_parallel:
        raise ValueError(
            f"a MoE model with parallel.tp={config.tp} needs parallel.sequence_parallel=true (Megatron-Core's "
            "MoE layer refuses tensor parallelism without sequence parallelism in training)")


def check_model_divisibility(
    config: ParallelConfig,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    padded_vocab_size: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the numbers when the model does not split over the layout."""
    groups = num_query_groups or num_attention_heads
    if num_attention_heads % groups != 0:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not divisible by "
            f"num_query_groups={groups}"
        )
    if num_attention_heads % config.tp != 0:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not divisible by tensor-parallel "
            f"degree tp={config.tp}"
        )
    if groups % config.tp != 0:
        raise ValueError(
            f"num_query_groups={groups} is not divisible by tensor-parallel degree tp={config.tp}"
        )
    if padded_vocab_size is not None and padded_vocab_size % config.tp != 0:
        raise ValueError(
            f"vocabulary size {padded_vocab_size} is not divisible by tensor-parallel degree "
            f"tp={config.tp}"
        )
    stages = config.pp * (config.vpp or 1)
    if num_layers % stages != 0:
        raise ValueError(
            f"num_layers={num_layers} is not divisible by pp={config.pp} × vpp={config.vpp or 1} "
            f"= {stages} pipeline stages"
        )


class ParallelLayout:
    """Degrees, ranks and process groups of one run. Build with ``ParallelLayout.initialize``."""

    def __init__(self, config: ParallelConfig, world_size: int, rank: int, groups) -> None:
        self.config = config
        self.world_size = world_size
        self.rank = rank
        self.tp, self.pp, self.cp = config.tp, config.pp, config.cp
        self.vpp = config.vpp
        self.dp = config.data_parallel_size(world_size)
        self.ep, self.etp = config.ep, config.expert_tp
        self.groups = groups  # megatron.core.process_groups_config.ProcessGroupCollection

    @classmethod
    def initialize(cls, config: ParallelConfig, *, timeout_minutes: float | None = None) -> "ParallelLayout":
        """Create Megatron-Core's process groups for ``config`` on the running default group.

        ``timeout_minutes`` overrides ``config.timeout_minutes`` (tests use short ones)."""
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        config.data_parallel_size(world_size)  # validate before creating any group
        if parallel_state.model_parallel_is_initialized():
            raise RuntimeError("a parallel layout is already initialized in this process; destroy it first")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tp,
            pipeline_model_parallel_size=config.pp,
            virtual_pipeline_model_parallel_size=config.vpp,
            context_parallel_size=config.cp,
            expert_model_parallel_size=config.ep,
            expert_tensor_parallel_size=config.expert_tp,
            distributed_timeout_minutes=max(1, math.ceil(timeout_minutes or config.timeout_minutes)),
            # On gloo every group already is a gloo group; duplicates would only cost sockets.
            create_gloo_process_groups=dist.get_backend() != "gloo",
        )
        groups = ProcessGroupCollection.use_mpu_process_groups()
        return cls(config, world_size, rank, groups)

    # Ranks and groups -------------------------------------------------------------------------

    @property
    def tp_group(self):
        return self.groups.tp

    @property
    def pp_group(self):
        return self.groups.pp

    @property
    def cp_group(self):
        return self.groups.cp

    @property
    def dp_group(self):
        """Data-parallel group without context parallelism (ranks holding different data)."""
        return self.groups.dp

    @property
    def dp_cp_group(self):
        """Data- and context-parallel group: the group gradients are reduced over."""
        return self.groups.dp_cp

    @property
    def ep_group(self):
        """Expert-parallel group (the ranks whose experts together make one MoE layer)."""
        return self.groups.ep

    @property
    def expert_tp_group(self):
        """Expert tensor-parallel group (the ranks one expert's MLP is split over)."""
        return self.groups.expt_tp

    @property
    def expert_dp_group(self):
        """Expert data-parallel group: the group expert gradients are reduced over."""
        return self.groups.expt_dp

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.groups.ep)

    @property
    def etp_rank(self) -> int:
        return dist.get_rank(self.groups.expt_tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.groups.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.groups.pp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.groups.dp)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.groups.cp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def uses_gloo_groups_only(self) -> bool:
        """True when the default backend is gloo, so no separate gloo groups were created."""
        return dist.get_backend() == "gloo"

    def describe(self) -> str:
        return (
            f"world={self.world_size} tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} "
            f"dp={self.dp} sp={self.config.sequence_parallel} ep={self.ep} etp={self.etp}"
        )

    # RNG and teardown -------------------------------------------------------------------------

    def seed(self, seed: int) -> None:
        """Seed torch and Megatron's RNG tracker (per-TP-rank model-parallel stream)."""
        from mrl.parallel.cpu import cpu_execution_enabled, cpu_model_parallel_seed

        if cpu_execution_enabled():
            cpu_model_parallel_seed(seed, tp_rank=self.tp_rank, ep_rank=self.ep_rank, etp_rank=self.etp_rank)
        else:
            from megatron.core import tensor_parallel

            torch.manual_seed(seed)
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def destroy(self) -> None:
        """Destroy the process groups this layout created and reset Megatron's parallel state."""
        destroy_parallel_state()


def destroy_parallel_state() -> None:
    """Destroy every process group in Megatron's parallel state, then reset that state."""
    from megatron.core import parallel_state

    for group in _parallel_state_groups(parallel_state):
        dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()
    # destroy_model_parallel forgets a few groups (e.g. the gloo intra-partial data-parallel group):
    # a destroyed group whose object stays referenced keeps its gloo threads running.
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)


def _parallel_state_groups(parallel_state) -> list:
    """Every distinct process group Megatron's parallel state holds, except the default group."""
    seen: dict[int, object] = {}
    for value in vars(parallel_state).values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for group in candidates:
            if isinstance(group, dist.ProcessGroup) and group is not dist.GroupMember.WORLD:
                seen.setdefault(id(group), group)
    return list(seen.values())


def init_distributed(backend: str, timeout: timedelta = timedelta(minutes=30)) -> None:
    """Initialize torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_*)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
