"""CPU execution of Megatron-Core over gloo (opt-in with ``device: cpu``).

Megatron-Core's parallel state and its vocab-parallel cross-entropy run on gloo as they are, but
the GPT model, the pipeline schedules, the RNG tracker and the optimizers hard-code CUDA
(``torch.cuda.current_device()``, ``device="cuda"`` literals, ``torch.cuda.get_rng_state()`` and
``param.type() == "torch.cuda.FloatTensor"`` white-lists). ``enable_cpu_execution()`` makes that
code run on the CPU so that tests, CI and the CPU quick start drive the *real* Megatron-Core stack.

Scope, and nothing more:

* ``torch.cuda.current_device()`` returns the CPU device and ``torch.cuda.synchronize()`` is a no-op.
* ``torch.cuda.Stream``/``current_stream``/``stream`` are CPU streams whose waits and events are
  no-ops (the MoE all-to-all token dispatcher copies its split sizes on a side stream), and that
  dispatcher's device-to-host copy of the split sizes returns the numpy arrays it asks for (on CPU
  the tensors are already on the host, so Megatron skipped the conversion and ``all_to_all_single``
  refused the tensors).
* ``all_gather`` / ``reduce_scatter`` of different-sized tensors (expert tensor parallelism gathers
  each rank's routed tokens) go through padded collectives: gloo requires equal sizes.
* A process-wide ``TorchFunctionMode`` maps ``device="cuda"``/``"cuda:N"``/int devices in torch
  calls to the CPU, makes ``Tensor.cuda()`` the identity, and makes ``Tensor.type()`` report the
  ``torch.cuda.*`` name that Megatron's optimizer white-lists expect.
* Megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by activation recompute) read and
  write the CPU generator.
* ``CpuRNGStatesTracker`` replaces Megatron's CUDA RNG tracker with the same semantics: a
  data-parallel stream, a model-parallel stream that differs per TP rank, an expert stream.
* ``SequenceParallelTorchNorm``: torch's RMSNorm/LayerNorm for the local layer spec, usable with
  sequence parallelism (Megatron's ``WrappedTorchNorm`` refuses it). Its parameters are tagged so
  that ``finalize_model_grads`` all-reduces their gradients over the TP group, as TE norms are.

It is never enabled implicitly and refuses to run where CUDA is available (a CUDA run must not
have its device calls rewritten). It is guarded by the Megatron-Core versions it was tested with
(``mrl.compat.MCORE_TESTED_VERSIONS``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from mrl.compat import require_tested_megatron

_CPU = torch.device("cpu")

# The active mode, kept so that enabling twice is a no-op. Process-wide by nature: the patches it
# stands for are process-wide too.
_ACTIVE_MODE: "_CudaToCpuMode | None" = None


def _to_cpu_device(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _uneven(tensors) -> bool:
    return isinstance(tensors, (list, tuple)) and len({tuple(t.shape) for t in tensors}) > 1


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def _gloo_all_gather(all_gather):
    def gather(tensor_list, tensor, group=None, async_op=False):
        """``all_gather`` that also takes different-sized outputs (gloo wants equal ones): pad, gather, trim."""
        if not _uneven(tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("an asynchronous all_gather of uneven tensors is not supported on CPU")
        rows = max(t.shape[0] for t in tensor_list)
        buffers = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in tensor_list]
        all_gather(buffers, _padded(tensor.contiguous(), rows), group=group)
        for out, buffer in zip(tensor_list, buffers):
            out.copy_(buffer[: out.shape[0]])

    return gather


def _gloo_reduce_scatter(reduce_scatter):
    def scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        """``reduce_scatter`` that also takes different-sized inputs: all-reduce them padded, keep ours."""
        if not _uneven(input_list):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("an asynchronous reduce_scatter of uneven tensors is not supported on CPU")
        rows = max(t.shape[0] for t in input_list)
        stacked = torch.stack([_padded(t, rows) for t in input_list])
        dist.all_reduce(stacked, op=op, group=group)
        output.copy_(stacked[dist.get_rank(group)][: output.shape[0]])

    return scatter


def cpu_execution_enabled() -> bool:
    """True once ``enable_cpu_execution()`` has run in this process."""
    return _ACTIVE_MODE is not None


def enable_cpu_execution() -> None:
    """Make Megatron-Core's CUDA-only code paths run on the CPU for the rest of this process."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return
    require_tested_megatron()
    if torch.cuda.is_available():
        raise RuntimeError(
            "device: cpu was requested on a machine where CUDA is available; CPU execution "
            "rewrites CUDA device calls and must not run beside CUDA. Use device: cuda, or hide "
            "the GPUs (CUDA_VISIBLE_DEVICES=) for a CPU run."
        )
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda *args, **kwargs: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    dist.all_gather = _gloo_all_gather(dist.all_gather)
    dist.reduce_scatter = _gloo_reduce_scatter(dist.reduce_scatter)
    mode = _CudaToCpuMode()
    mode.__enter__()
    _ACTIVE_MODE = mode


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for tensors already on the host: numpy when asked for."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


class _CpuEvent:
    """A CUDA event stand-in: work on the CPU is already complete when it is recorded."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream stand-in: CPU work runs in program order, so waits are no-ops."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _tracker_base():
    from megatron.core.tensor_parallel import random as mcore_random

    return mcore_random.CudaRNGStatesTracker


class CpuRNGStatesTracker(_tracker_base()):
    """Megatron's RNG-states tracker, keeping CPU generator states instead of CUDA ones."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def cpu_model_parallel_seed(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU counterpart of ``tensor_parallel.model_parallel_cuda_manual_seed``.

    Same seeds as Megatron: the data-parallel stream gets ``seed``; the model-parallel stream
    ``seed + 2718 + tp_rank`` (different per TP rank, equal across PP stages and DP replicas); the
    expert stream ``seed + 1024 + 100·ep_rank + etp_rank``.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = CpuRNGStatesTracker()
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class SequenceParallelTorchNorm:
    """torch RMSNorm/LayerNorm for Megatron's local spec that also works with sequence parallel.

    Drop-in for ``WrappedTorchNorm`` (same constructor). With sequence parallelism each TP rank
    normalises its own slice of the sequence, so the norm weights' gradients are partial sums:
    tagging them ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce them over TP.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not RMSNorm or LayerNorm")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
