"""Benchmark of the vocab-parallel ops against Megatron-Core and a naive full-gather baseline.

Every variant runs forward + backward on the same per-rank logits shard in the same run:

* ``mrl logprobs``      ``mrl.ops.vocab_parallel_logprobs``
* ``megatron-core``     ``-megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` on a copy of
                        the shard (it overwrites fp32 input in place; the copy is part of its cost)
* ``gather+log_softmax`` all-gather of the full vocabulary, ``torch.log_softmax``, gather the label
* ``mrl fused``         ``vocab_parallel_logprobs_and_entropy`` (one op, both outputs)
* ``mrl two calls``     ``vocab_parallel_logprobs`` then ``vocab_parallel_entropy``

Time: the variants run in rotation (so load from other processes hits all alike); each sample is
the wall time of one forward + backward between two barriers on rank 0, and rank 0's CPU time
(user + system, page faults included) over the same span, which other processes' load on a
shared machine disturbs less; medians are printed.

Peak extra memory, in logits shards: the largest amount of memory allocated during forward +
backward beyond what existed before (the input shard, labels, upstream weights), divided by the
bytes of one shard; the gradient the backward leaves in ``logits.grad`` counts. On CPU it comes
from ``torch.profiler`` allocation events (``profile_memory=True``: every allocation and free of
the CPU allocator, summed in time order); on CUDA from ``torch.cuda.max_memory_allocated``.

CPU (default): spawns ``--tp`` gloo processes with one thread each. CUDA (``--device cuda``): bf16,
one process per GPU over NCCL (``--tp`` GPUs), and the achieved bandwidth against the floor of
reading the shard once in forward, once in backward and writing the gradient once. The floor's
time is those bytes at the device-to-device copy bandwidth measured in the same run (a copy of
one shard, bytes read plus written), so ``x floor`` is each op's time over the least possible.

    python tools/bench_vocab_ops.py                       # CPU: TP=2, T=2048, V=32768, fp32
    python tools/bench_vocab_ops.py --device cuda         # GPU: TP=1, T=16384, V=152064, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class BenchConfig:
    device: str
    """cpu or cuda."""
    tp: int
    """Tensor-parallel degree: processes (CPU) or GPUs (CUDA)."""
    tokens: int
    """Tokens per rank (T)."""
    vocab: int
    """Global vocabulary size (V); each rank holds V / tp columns."""
    dtype: str
    """Logits dtype."""
    repeats: int
    """Timed forward + backward samples per variant."""
    warmup: int
    """Untimed rounds before timing."""
    chunk_size: int | None
    """Tokens per chunk for the mrl ops (None: their default)."""
    peak_gbps: float | None
    """Nominal memory bandwidth of the GPU in GB/s, for the bandwidth ratio (CUDA)."""
    port: int
    """Rendezvous port."""


class _GatherVocab(torch.autograd.Function):
    """All-gather of vocabulary shards; the backward keeps this rank's columns of the gradient."""

    @staticmethod
    def forward(ctx, shard, group):
        from mrl.ops.comm import all_gather_last_dim, group_rank

        ctx.rank, ctx.width = group_rank(group), shard.shape[-1]
        return all_gather_last_dim(shard, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


def _variants(group, labels, w_logp, w_entropy, chunk_size):
    """name -> function(logits) returning the scalar whose backward is timed."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mrl import ops

    ck = dict(chunk_size=chunk_size)

    def mrl_logprobs(x):
        return (ops.vocab_parallel_logprobs(x, labels, group, **ck) * w_logp).sum()

    def megatron(x):
        return (-vocab_parallel_cross_entropy(x.clone(), labels) * w_logp).sum()

    def gathered(x):
        full = _GatherVocab.apply(x, group).float()
        logp = torch.log_softmax(full, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (logp * w_logp).sum()

    def fused(x):
        logp, ent = ops.vocab_parallel_logprobs_and_entropy(x, labels, group, **ck)
        return (logp * w_logp + ent * w_entropy).sum()

    def two_calls(x):
        logp = ops.vocab_parallel_logprobs(x, labels, group, **ck)
        ent = ops.vocab_parallel_entropy(x, group, **ck)
        return (logp * w_logp + ent * w_entropy).sum()

    return {
        "mrl logprobs": mrl_logprobs,
        "megatron-core": megatron,
        "gather+log_softmax": gathered,
        "mrl fused": fused,
        "mrl two calls": two_calls,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn, x) -> None:
    x.grad = None
    fn(x).backward()


def _peak_extra_bytes(fn, x, device: str) -> int:
    """Peak bytes allocated during one forward + backward beyond those allocated before it."""
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which it writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _run(rank: int, cfg: BenchConfig) -> None:
    warnings.simplefilter("ignore")  # Megatron-Core's import-time notes about optional packages
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.port))
    if cfg.device == "cpu":
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=cfg.tp)
        from mrl.parallel.cpu import enable_cpu_execution

        enable_cpu_execution()
    else:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=cfg.tp)
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(tp=cfg.tp), timeout_minutes=5)
    group = layout.tp_group
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)
    local_v = cfg.vocab // cfg.tp
    shard_gen = torch.Generator(device).manual_seed(1 + rank)
    x = torch.randn(cfg.tokens, local_v, generator=shard_gen, device=device).mul_(4)  # [T, V/tp]
    x = x.to(dtype).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)  # labels and upstream weights: the same on every rank
    labels = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=gen).to(device)
    w_logp = torch.randn(cfg.tokens, generator=gen).to(device)
    w_entropy = torch.randn(cfg.tokens, generator=gen).to(device)
    variants = _variants(group, labels, w_logp, w_entropy, cfg.chunk_size)

    for _ in range(cfg.warmup):
        for fn in variants.values():
            _fwd_bwd(fn, x)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(cfg.repeats):
        for name, fn in variants.items():
            _sync(cfg.device)
            dist.barrier(group)
            start, start_cpu = time.perf_counter(), time.process_time()
            _fwd_bwd(fn, x)
            _sync(cfg.device)
            cpu[name].append(time.process_time() - start_cpu)
            dist.barrier(group)
            wall[name].append(time.perf_counter() - start)
    shard_bytes = x.numel() * x.element_size()
    peaks = {name: _peak_extra_bytes(fn, x, cfg.device) / shard_bytes for name, fn in variants.items()}
    copy_gbps = _copy_bandwidth_gbps(x, cfg.repeats) if cfg.device == "cuda" else None
    if rank == 0:
        median = statistics.median
        _report(cfg, {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}, peaks,
                shard_bytes, copy_gbps)
    layout.destroy()
    dist.destroy_process_group()


def _copy_bandwidth_gbps(x: torch.Tensor, repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), one shard per copy, median."""
    src = x.detach()
    dst = torch.empty_like(src)
    samples = []
    for index in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        if index >= 2:  # two warm-ups
            samples.append(time.perf_counter() - start)
    del dst
    return 2 * src.numel() * src.element_size() / statistics.median(samples) / 1e9


def _report(cfg: BenchConfig, times: dict, cpu_times: dict, peaks: dict, shard_bytes: int,
            copy_gbps: float | None) -> None:
    print(
        f"device={cfg.device} tp={cfg.tp} tokens={cfg.tokens} vocab={cfg.vocab} "
        f"(shard {cfg.tokens}x{cfg.vocab // cfg.tp} {cfg.dtype} = {shard_bytes / 2**20:.0f} MiB) "
        f"chunk_size={cfg.chunk_size} repeats={cfg.repeats} threads/rank={torch.get_num_threads()}"
    )
    print(f"{'variant':<20} {'wall ms':>9} {'cpu ms':>9} {'peak extra (shards)':>20}")
    for name, t in times.items():
        print(f"{name:<20} {t * 1e3:>9.1f} {cpu_times[name] * 1e3:>9.1f} {peaks[name]:>20.2f}")
    pairs = [
        ("mrl logprobs", "megatron-core"),
        ("mrl logprobs", "gather+log_softmax"),
        ("mrl fused", "mrl two calls"),
        ("mrl fused", "mrl logprobs"),
    ]
    print(f"{'ratio':<36} {'wall':>6} {'cpu':>6}")
    for a, b in pairs:
        print(f"{a + ' / ' + b:<36} {times[a] / times[b]:>5.2f}x {cpu_times[a] / cpu_times[b]:>5.2f}x")
    if cfg.device == "cuda":
        floor = 3 * shard_bytes  # read the shard in forward and in backward, write the gradient
        floor_s = floor / (copy_gbps * 1e9)
        print(f"copy bandwidth {copy_gbps:.0f} GB/s (measured); floor traffic {floor / 2**30:.2f} GiB "
              f"= {floor_s * 1e3:.2f} ms at that bandwidth")
        for name in ("mrl logprobs", "mrl fused", "megatron-core"):
            gbps = floor / times[name] / 1e9
            line = f"{name:<20} {gbps:8.0f} GB/s effective, {times[name] / floor_s:5.2f}x floor"
            if cfg.peak_gbps:
                line += f", {gbps / cfg.peak_gbps:.0%} of {cfg.peak_gbps:.0f} GB/s nominal"
            print(line)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tp", type=int, default=None, help="default: 2 on CPU, 1 on CUDA")
    parser.add_argument("--tokens", type=int, default=None, help="default: 2048 on CPU, 16384 on CUDA")
    parser.add_argument("--vocab", type=int, default=None, help="default: 32768 on CPU, 152064 on CUDA")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--peak-gbps", type=float, default=None, help="GPU memory bandwidth, GB/s")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    cfg = BenchConfig(
        device=args.device,
        tp=args.tp or (2 if cpu else 1),
        tokens=args.tokens or (2048 if cpu else 16384),
        vocab=args.vocab or (32768 if cpu else 152064),
        dtype=args.dtype or ("float32" if cpu else "bfloat16"),
        repeats=args.repeats,
        warmup=args.warmup,
        chunk_size=args.chunk_size,
        peak_gbps=args.peak_gbps,
        port=_free_port(),
    )
    if cfg.vocab % cfg.tp:
        parser.error(f"--vocab {cfg.vocab} is not divisible by --tp {cfg.tp}")
    mp.spawn(_run, args=(cfg,), nprocs=cfg.tp, join=True)


if __name__ == "__main__":
    main()
