"""Benchmark of one bf16 training step of a GPT model built by mrl, in one process (world size 1).

The model, optimizer and step are mrl's own: ``build_model`` (Megatron-Core local layers, no
Transformer Engine), ``wrap_ddp`` + ``build_optimizer`` (Megatron-Core DDP and distributed Adam),
the SFT loss and ``TrainStep`` (Megatron's schedule, the finiteness guard, clipping, the optimizer
step). Batches are random token ids of the full sequence length.

Printed per run: parameters, tokens per step, the median step time of the timed steps, tokens/s,
the model FLOP rate (``mrl.train.flops.training_flops``) against two references, and peak memory:

* MFU: against the nominal dense bf16 peak of the GPU (``mrl.train.flops.peak_flops_per_gpu``;
  none on CPU);
* against a bf16 matrix product measured in the same run on the same device (the rate the
  step's GEMMs could reach at best), so the ratio means the same on any machine;
* peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set on CPU.

The last line is ``SUMMARY {json}`` with the same numbers, for ``tools/gpu_check.py``.

    python tools/bench_train_step.py --device cuda --size 1b   # ~1.1B parameters, 8192 tokens/step
    python tools/bench_train_step.py --device cpu --size tiny  # a few seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

# Model shapes. "1b" is TinyLlama-1.1B's (22 layers, hidden 2048, GQA 32/4, SwiGLU 5632, 32000
# tokens); "tiny" checks the plumbing on a CPU in seconds.
SIZES = {
    "1b": dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
               ffn_hidden_size=5632, vocab_size=32000),
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=176, vocab_size=512),
}
DEFAULTS = {  # seq_length, micro_batch_size, micro_batches, warmup, steps
    "1b": (2048, 2, 2, 2, 5),
    "tiny": (64, 2, 2, 1, 3),
}


@dataclass
class BenchConfig:
    device: str
    """cpu or cuda."""
    size: str
    """A key of SIZES."""
    dtype: str
    """Parameter and activation dtype (bf16, fp32)."""
    seq_length: int
    """Tokens per row."""
    micro_batch_size: int
    """Rows per micro-batch."""
    micro_batches: int
    """Micro-batches per step (gradient accumulation)."""
    warmup: int
    """Untimed steps first (compilation, allocator warm-up)."""
    steps: int
    """Timed steps; the median is reported."""


def main() -> None:
    cfg = _parse_args()
    warnings.simplefilter("ignore")  # Megatron-Core's import-time notes about optional packages
    with _single_rank(cfg.device) as layout:
        result = run_benchmark(cfg, layout)
    _report(cfg, result)


def _parse_args() -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1b on CUDA, tiny on CPU")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    size = args.size or ("1b" if args.device == "cuda" else "tiny")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    seq, mbs, micro, warmup, steps = DEFAULTS[size]
    pick = lambda given, default: default if given is None else given  # noqa: E731
    cfg = BenchConfig(device=args.device, size=size, dtype=args.dtype, seq_length=pick(args.seq_length, seq),
                      micro_batch_size=pick(args.micro_batch_size, mbs), micro_batches=pick(args.micro_batches, micro),
                      warmup=pick(args.warmup, warmup), steps=pick(args.steps, steps))
    if min(cfg.seq_length, cfg.micro_batch_size, cfg.micro_batches, cfg.steps) < 1 or cfg.warmup < 0:
        parser.error("sizes and --steps must be >= 1, --warmup >= 0")
    return cfg


@contextmanager
def _single_rank(device: str):
    """torch.distributed with one rank (gloo on CPU, NCCL on CUDA) and mrl's layout on it."""
    from mrl.export import single_process_group
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    with single_process_group(device):
        layout = ParallelLayout.initialize(ParallelConfig(), timeout_minutes=5)
        try:
            layout.seed(1234)
            yield layout
        finally:
            layout.destroy()


def run_benchmark(cfg: BenchConfig, layout) -> dict:
    """Build the model and its optimizer, run warm-up and timed steps; return the numbers."""
    from mrl.losses.base import compute_global_counts
    from mrl.losses.factory import build_loss
    from mrl.losses.metrics import MetricsAccumulator
    from mrl.model.builder import build_model
    from mrl.model.config import ModelConfig, PrecisionConfig
    from mrl.train.flops import attention_width, count_parameters, peak_flops_per_gpu, training_flops
    from mrl.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from mrl.train.schedules import Scheduler, SchedulerConfig
    from mrl.train.step import TrainStep

    model = ModelConfig(**SIZES[cfg.size], max_sequence_length=cfg.seq_length, transformer_impl="local")
    precision = PrecisionConfig(dtype=cfg.dtype)
    optim = OptimConfig(lr=1e-4)
    started = time.perf_counter()
    chunks = build_model(model, precision, layout, cfg.device, seed=1234)
    notes = _unfused_softmax_without_kernels(chunks)
    ddp = wrap_ddp(chunks, optim, layout)
    optimizer = build_optimizer(ddp, optim, precision, layout)
    scheduler = Scheduler(SchedulerConfig(style="constant"), optimizer, optim.lr, optim.weight_decay,
                          cfg.warmup + cfg.steps)
    step = TrainStep(ddp, optimizer, scheduler, layout, build_loss({"kind": "sft"}, vocab_size=model.vocab_size),
                     MetricsAccumulator)
    build_s = time.perf_counter() - started
    num_params = count_parameters(ddp, layout)
    micro_batches = _random_batches(cfg, model.vocab_size)
    counts = compute_global_counts(micro_batches, layout.dp_group)
    _reset_peak_memory(cfg.device)
    times, losses = [], []
    for index in range(cfg.warmup + cfg.steps):
        _sync(cfg.device)
        start = time.perf_counter()
        result = step(micro_batches, counts)
        _sync(cfg.device)
        if index >= cfg.warmup:
            times.append(time.perf_counter() - start)
        losses.append(result.loss)
        if result.skipped:
            raise RuntimeError(f"step {index} was skipped: {result.skip_reason} (loss {result.loss})")
    seconds = statistics.median(times)
    tokens = cfg.seq_length * cfg.micro_batch_size * cfg.micro_batches
    flops = training_flops(num_params, model.num_layers, attention_width(model), cfg.seq_length, tokens)
    peak = peak_flops_per_gpu() if cfg.device == "cuda" else None
    gemm = measure_gemm_flops(cfg.device, cfg.dtype)
    return {
        "size": cfg.size, "device": _device_name(cfg.device), "dtype": cfg.dtype, "params": num_params,
        "seq_length": cfg.seq_length, "tokens_per_step": tokens, "build_s": build_s,
        "step_s": seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
        "gemm_tflops": gemm / 1e12, "vs_gemm": flops / seconds / gemm,
        "peak_memory_gib": _peak_memory_bytes(cfg.device) / 2**30,
        "peak_memory_kind": "cuda max allocated" if cfg.device == "cuda" else "process peak RSS",
        "loss_first": losses[0], "loss_last": losses[-1], "timed_steps": len(times), "notes": notes,
    }


def _unfused_softmax_without_kernels(chunks) -> list[str]:
    """Turn off Megatron's fused attention softmax where its CUDA extension is not installed.

    The builder enables ``masked_softmax_fusion`` on every CUDA run; without NVIDIA apex (or a
    Megatron source build) the kernel module is missing and the first forward raises
    ModuleNotFoundError. Falling back to the unfused softmax changes speed, not results.
    """
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    if importlib.util.find_spec("scaled_masked_softmax_cuda") is not None:
        return []
    switched = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FusedScaleMaskSoftmax) and module.scaled_masked_softmax_fusion:
                module.scaled_masked_softmax_fusion = False
                switched += 1
    if not switched:
        return []
    return [f"fused attention softmax off in {switched} layers: scaled_masked_softmax_cuda is not installed"]


def _random_batches(cfg: BenchConfig, vocab_size: int) -> list[dict]:
    """Micro-batches of random token ids on the device (labels: the next token)."""
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(cfg.micro_batches):
        tokens = torch.randint(0, vocab_size, (cfg.micro_batch_size, cfg.seq_length), generator=gen)
        positions = torch.arange(cfg.seq_length).expand(cfg.micro_batch_size, -1)
        batches.append({"tokens": tokens.to(device), "position_ids": positions.contiguous().to(device),
                        "labels": torch.roll(tokens, -1, 1).to(device)})
    return batches


def measure_gemm_flops(device: str, dtype: str, repeats: int = 10) -> float:
    """FLOP/s of a square matrix product on ``device`` in ``dtype`` (8192 on CUDA, 512 on CPU)."""
    n = 8192 if device == "cuda" else 512
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        samples.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(samples)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _report(cfg: BenchConfig, result: dict) -> None:
    print(f"model {cfg.size}: {result['params'] / 1e9:.3f}B parameters, {cfg.dtype}, local layers, "
          f"seq {cfg.seq_length} x {cfg.micro_batch_size} rows x {cfg.micro_batches} micro-batches "
          f"= {result['tokens_per_step']} tokens/step, on {result['device']}")
    print(f"build {result['build_s']:.1f} s; {result['timed_steps']} timed steps after {cfg.warmup} warm-up")
    print(f"step time (median)   {result['step_s'] * 1e3:10.1f} ms")
    print(f"tokens/s             {result['tokens_per_s']:10.0f}")
    print(f"model TFLOP/s        {result['model_tflops']:10.3f}")
    print(f"bf16 GEMM TFLOP/s    {result['gemm_tflops']:10.3f}   (measured in this run)" if cfg.dtype == "bf16"
          else f"fp32 GEMM TFLOP/s    {result['gemm_tflops']:10.3f}   (measured in this run)")
    print(f"model / GEMM         {result['vs_gemm']:10.1%}")
    print(f"MFU                  {_percent(result['mfu']):>10}   (nominal peak {result['peak_tflops'] or 'unknown'} TFLOP/s)")
    print(f"peak memory          {result['peak_memory_gib']:10.2f} GiB ({result['peak_memory_kind']})")
    print(f"loss                 {result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    for note in result["notes"]:
        print(f"note: {note}")
    finite = all(math.isfinite(v) for v in (result["loss_first"], result["loss_last"], result["tokens_per_s"]))
    print("SUMMARY " + json.dumps(dict(result, config=asdict(cfg), finite=finite)))
    sys.stdout.flush()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    main()
