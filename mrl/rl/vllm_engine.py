"""``rollout.engine: vllm``: rollouts from a vLLM engine refit in place from the policy's shards.

Topology: **one engine per data-parallel replica, hosted by the replica's first rank** (tp = pp =
cp = 0). The engine runs its own worker processes, ``rollout.vllm.tensor_parallel_size`` of them,
independent of the trainer's TP/PP layout.

- Prompts do not move: every rank of a replica already holds the replica's prompts (the data is
  sharded over DP only). The first rank generates them all; completions and log-probs are then
  broadcast to the other ranks of the replica (model-parallel group, then context-parallel group).
- Weights move once per rollout, before it (so after every optimizer step that precedes one):
  ``mrl.rl.refit`` gathers each TP-split parameter at its stage's TP rank 0, maps it to Hugging
  Face names with the export mapping and packs buckets of ``rollout.vllm.refit_bucket_mb``; stage
  0 packs into, and the other stages send point-to-point into, one shared-memory file that the
  engine's workers read (``collective_rpc``), copying each bucket into vLLM's layer-wise in-place
  reload. The prefix cache is then reset: prompt KV computed with the old weights would be reused.
- Replicas never talk to each other: each refits its own engine from its own (identical) shards.

Why this and not vLLM's external-launcher mode (an engine shard inside every trainer rank): the
engine's parallelism stays its own (an engine TP of 1 or 8 under any trainer layout), the trainer's
process groups and memory are untouched by vLLM, and a failing engine is a set of child processes
that can be killed and reported. The cost is the gather of each stage at one rank and the transfer
to the engine (a memory copy on one host; on GPU the engine shares the replica's GPUs, sleeping
during training). A replica spanning several nodes would need a transport other than shared memory
between its stages and the engine's host: not covered yet.

Failure: an engine that does not start (error or ``rollout.vllm.start_timeout_s``), or a refit
that fails (or exceeds ``rollout.vllm.refit_timeout_s``), raises ``RolloutEngineError`` on every
rank of the replica with the engine's message; the engine's processes are killed first. A rank that
dies without closing its engine (SIGKILL under torchrun or srun, which watch only their direct
workers) takes the engine's processes and files with it (``mrl.processes.ProcessGuard``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from mrl.processes import ProcessGuard
from mrl.rl.rollout import Rollout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class RolloutEngineError(RuntimeError):
    """The vLLM engine failed to start, to load weights or to generate."""


class VLLMRolloutSource:
    """A ``RolloutSource`` over one vLLM engine per data-parallel replica (module docstring)."""

    def __init__(self, cfg, chunks: list, layout, tokenizer, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.settings = cfg.rollout.vllm
        self.chunks = chunks
        self.layout = layout
        self.eos_id = tokenizer.eos_id
        self.log = log
        dtype = self.settings.dtype if self.settings.dtype != "auto" else cfg.precision.dtype
        if cfg.device == "cpu" and dtype == "fp16":
            dtype = "fp32"
        self.dtype = dtype
        self.is_host = layout.tp_rank == 0 and layout.pp_rank == 0 and layout.cp_rank == 0
        self.engine: _Engine | None = None
        error = None
        if self.is_host:
            try:
                self.engine = _Engine.start(cfg, dtype, log)
            except Exception as exc:  # noqa: BLE001 - every rank of the replica raises it below
                error = f"the vLLM engine of data-parallel replica {layout.dp_rank} did not start: {exc}"
        self._share_error(error)

    # RolloutSource --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], seed: int, *, greedy: bool = False) -> Rollout:
        if greedy:  # JobConfig.validate refuses rollout.advantage_estimator=remax with this engine
            raise RolloutEngineError("greedy rollouts are not wired for the vLLM engine; use rollout.engine: megatron")
        started = time.monotonic()
        moved = self.refit()
        refit_s = time.monotonic() - started
        result: list = [None, None]
        if self.is_host:
            try:
                result[0] = (*self.engine.generate(prompts, seed * 1_000_003 + self.layout.dp_rank,
                                                   self.cfg.rollout, self.eos_id), moved)
            except Exception as exc:  # noqa: BLE001
                result[1] = f"vLLM generation failed on data-parallel replica {self.layout.dp_rank}: {exc}"
                self.engine.kill()
        result = self._broadcast(result)
        if result[1] is not None:
            raise RolloutEngineError(result[1])
        completions, logprobs, seconds, moved = result[0]
        generated = float(sum(len(c) for c in completions))
        return Rollout(completions, logprobs, {"seconds": time.monotonic() - started, "tokens": generated,
                                               "generate_s": seconds, "refit_s": refit_s,
                                               "refit_mib": moved / 2**20})

    def refit(self) -> int:
        """Push the policy's current weights into the engine; the bytes moved (module docstring)."""
        from mrl.rl.refit import stream_hf_weights

        layout = self.layout
        sink = None
        if layout.tp_rank == 0 and layout.pp_rank == 0:  # receives the replica's buckets
            sink = _GuardedSink(self.engine if self.is_host else None)
        stats = stream_hf_weights(self.chunks, self.cfg.model, layout,
                                  bucket_bytes=self.settings.refit_bucket_mb * 2**20,
                                  dtype=DTYPES[self.dtype], sink=sink)
        error = sink.error if sink is not None else None
        if self.is_host and error is None:
            try:
                self.engine.finish_refit()
            except RolloutEngineError as exc:
                error = str(exc)
        if error is not None and self.engine is not None:
            self.engine.kill()
        self._share_error(error)
        return stats.bytes

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # Replica broadcasts -----------------------------------------------------------------------------

    def _broadcast(self, payload: list) -> list:
        """``payload`` of the replica's first rank, on every rank of the replica."""
        layout = self.layout
        if layout.cp > 1:
            dist.broadcast_object_list(payload, src=dist.get_global_rank(layout.cp_group, 0), group=layout.cp_group)
        mp = layout.groups.mp
        if dist.get_world_size(mp) > 1:
            dist.broadcast_object_list(payload, src=dist.get_global_rank(mp, 0), group=mp)
        return payload

    def _share_error(self, error: str | None) -> None:
        [error] = self._broadcast([error])
        if error is not None:
            self.close()
            raise RolloutEngineError(error)


class _GuardedSink:
    """The engine's sink that keeps draining after an error (the other stages are still sending);
    without an engine (another context-parallel slice) it only drains."""

    def __init__(self, engine: "_Engine | None") -> None:
        self.engine = engine
        self.error: str | None = None
        self._spare = torch.empty(0, dtype=torch.uint8)
        if engine is not None:
            try:
                engine.begin_refit()
            except RolloutEngineError as exc:
                self.error = str(exc)

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self.engine is not None and self.error is None:
            return self.engine.buffer(nbytes)
        if self._spare.numel() < nbytes:
            self._spare = torch.empty(nbytes, dtype=torch.uint8)
        return self._spare

    def push(self, entries, nbytes: int) -> None:
        if self.engine is None or self.error is not None:
            return
        try:
            self.engine.push(entries, nbytes)
        except RolloutEngineError as exc:
            self.error = str(exc)


class _Engine:
    """One ``vllm.LLM`` in this process, its worker processes, and the shared refit buffer."""

    def __init__(self, llm, settings, workdir: Path, pids: tuple[int, ...], gpu: bool) -> None:
        self.llm = llm
        self.settings = settings
        self.workdir = workdir
        self.pids = pids  # the engine's processes (each killed with its descendants at close)
        self.gpu = gpu
        self.asleep = False
        self.error: str | None = None
        self._shm_path = _shm_dir() / f"mrl-refit-{os.getpid()}-{id(self)}"
        self._shm_file = None
        self._shm_map = None
        self._shm_size = 0
        # A rank killed outside mrl's own spawner (SIGKILL under torchrun or srun) takes them with it.
        self._guard = ProcessGuard(pids, [workdir, self._shm_path])
        atexit.register(self.close)

    @classmethod
    def start(cls, cfg, dtype: str, log) -> "_Engine":
        from mrl.model.hf import hf_config
        from mrl.processes import descendants, kill_descendants
        from mrl.rl import vllm_compat

        settings = cfg.rollout.vllm
        gpu = cfg.device == "cuda"
        _set_engine_environment(settings, gpu)
        vllm = vllm_compat.import_vllm()
        workdir = Path(tempfile.mkdtemp(prefix="mrl-vllm-"))
        config = hf_config(cfg.model, dtype=VLLM_DTYPES[dtype])
        (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        spare = tuple(p.pid for p in descendants(os.getpid()))
        kwargs = vllm_compat.llm_kwargs(
            model_dir=str(workdir), dtype=VLLM_DTYPES[dtype], tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=settings.max_model_len or cfg.data.seq_length, seed=cfg.seed,
            enforce_eager=settings.enforce_eager, prefix_caching=settings.prefix_caching,
            block_size=settings.block_size, gpu=gpu, gpu_memory_utilization=settings.gpu_memory_utilization,
            sleep_mode=gpu and settings.sleep_during_training)
        timed_out = threading.Event()

        def watchdog():
            timed_out.set()
            kill_descendants(spare=spare)  # the engine's constructor then fails

        timer = threading.Timer(settings.start_timeout_s, watchdog)
        timer.daemon = True
        started = time.monotonic()
        timer.start()
        try:
            with _engine_devices(settings.tensor_parallel_size if gpu else 0):
                llm = vllm.LLM(**kwargs)
        except BaseException as exc:
            timer.cancel()
            kill_descendants(spare=spare)
            shutil.rmtree(workdir, ignore_errors=True)
            if timed_out.is_set():
                raise RolloutEngineError(
                    f"no engine within rollout.vllm.start_timeout_s={settings.start_timeout_s:g}") from exc
            raise RolloutEngineError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            timer.cancel()
        engine = cls(llm, settings, workdir, tuple(p.pid for p in descendants(os.getpid()) if p.pid not in spare), gpu)
        engine.startup_s = time.monotonic() - started
        log(f"vLLM {vllm_compat.version()} engine ready in {engine.startup_s:.1f} s "
            f"(tensor_parallel_size {settings.tensor_parallel_size}, {dtype})")
        return engine

    # Refit ------------------------------------------------------------------------------------------

    def begin_refit(self) -> "_Engine":
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        self._rpc("mrl_begin_refit")
        return self

    def buffer(self, nbytes: int) -> torch.Tensor:
        import mmap

        if nbytes > self._shm_size:
            self._close_shm()
            size = max(nbytes, self.settings.refit_bucket_mb * 2**20)
            self._shm_file = open(self._shm_path, "w+b")
            self._shm_file.truncate(size)
            self._shm_map = mmap.mmap(self._shm_file.fileno(), size)
            self._shm_size = size
        return torch.frombuffer(self._shm_map, dtype=torch.uint8, count=self._shm_size)

    def push(self, entries, nbytes: int) -> None:
        plain = [(e.name, e.dtype, list(e.shape), e.offset) for e in entries]
        self._rpc("mrl_load_bucket", str(self._shm_path), plain, nbytes)

    def finish_refit(self) -> None:
        missing = self._rpc("mrl_finish_refit", self.settings.refit_timeout_s)[0]
        if missing:
            raise RolloutEngineError(f"refit left engine parameters without weights: {missing}")
        self.llm.reset_prefix_cache()  # prompt KV of the old weights must not be reused

    def _rpc(self, method: str, *args):
        try:
            return self.llm.collective_rpc(method, timeout=self.settings.refit_timeout_s, args=args)
        except Exception as exc:  # noqa: BLE001
            raise RolloutEngineError(f"refit failed in the vLLM engine ({method}): {type(exc).__name__}: {exc}") from exc

    # Generation -------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], seed: int, rollout, eos_id: int):
        from mrl.rl import vllm_compat

        started = time.monotonic()
        params = [vllm_compat.sampling_params(temperature=rollout.temperature, top_k=rollout.top_k,
                                              top_p=rollout.top_p, max_tokens=rollout.max_new_tokens,
                                              seed=(seed * 65_537 + row) % 2**31, eos_id=eos_id)
                  for row in range(len(prompts))]
        outputs = self.llm.generate([vllm_compat.token_prompt(p) for p in prompts], params, use_tqdm=False)
        completions, logprobs = zip(*(vllm_compat.completion(o) for o in outputs)) if outputs else ((), ())
        if self.gpu and self.settings.sleep_during_training:
            self.llm.sleep(level=1)  # frees the KV cache while the trainer steps
            self.asleep = True
        return list(completions), list(logprobs), time.monotonic() - started

    # Teardown ---------------------------------------------------------------------------------------

    def kill(self) -> None:
        """Stop the engine's processes now (after an error)."""
        self._kill_processes()
        self.close()

    def _kill_processes(self) -> None:
        import psutil

        family = []
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                family += root.children(recursive=True) + [root]
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 30.0
        while family and time.monotonic() < deadline:
            for process in family:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            _, family = psutil.wait_procs(family, timeout=1)
            family = [p for p in family if _running(p)]  # a killed grandchild stays a zombie until reaped

    def close(self) -> None:
        from mrl.rl import vllm_compat

        if self.llm is not None:
            try:
                vllm_compat.shutdown(self.llm)
            except Exception:  # noqa: BLE001 - killed below
                pass
            self.llm = None
        self._kill_processes()
        self._close_shm()
        try:
            self._shm_path.unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._guard.release()

    def _close_shm(self) -> None:
        if self._shm_map is not None:
            try:
                self._shm_map.close()
            except BufferError:
                pass
            self._shm_file.close()
            self._shm_map = self._shm_file = None
            self._shm_size = 0


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def _engine_devices(count: int):
    """On GPU the engine's workers take ``count`` GPUs starting at this rank's own (the GPUs of the
    rank's tensor-parallel group when the engine's TP equals the trainer's): CUDA_VISIBLE_DEVICES
    while the engine starts its processes."""
    if count == 0:
        yield
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = torch.cuda.current_device()
    if first + count > len(devices):
        raise RolloutEngineError(f"rollout.vllm.tensor_parallel_size={count} needs GPUs {first}..{first + count - 1} "
                                 f"of this node, which has {len(devices)}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[first: first + count])
    try:
        yield
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _set_engine_environment(settings, gpu: bool) -> None:
    """vLLM reads these at start-up; values already set in the environment win."""
    env = os.environ
    # This process already runs gloo threads: fork would copy them into the engine's processes.
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine core in its own process
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings on CPU are many and harmless
    if gpu:
        return
    env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads or _split_cores(settings.tensor_parallel_size)


def _split_cores(workers: int) -> str:
    """This process's allowed cores split evenly among ``workers`` ("0-3" or "0-1|2-3")."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(len(cores) // workers, 1)
    parts = []
    for w in range(workers):
        mine = cores[w * per: (w + 1) * per] or cores[-1:]
        parts.append(",".join(map(str, mine)))
    return "|".join(parts)
