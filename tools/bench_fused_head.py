"""The fused LM head against the unfused path: peak extra memory and time of head + loss, forward + backward.

Each TP rank holds hidden states ``h [T, H]`` (replicated) and its rows of the output weight
``W [V/tp, H]``; the loss is ``Σ u·log p(label) + Σ u'·H(p)`` (log-probs and entropy, as a GRPO step
with an entropy bonus needs), then backward to ``h`` and ``W``:

* ``unfused``  what the model does without ``model.fused_head``: the output layer's logits
               ``[s, b, V/tp]`` (fp32 GEMM), transposed to ``[b, s, V/tp]``, then
               ``vocab_parallel_logprobs_and_entropy``;
* ``fused``    ``FusedHead(h, W)`` into the same op: logits one tile (tokens × vocabulary columns) at
               a time.

Peak extra memory is measured in fresh processes per variant: on CPU the growth of the peak resident
set over the timed runs (``VmHWM`` reset at their start, ``bench_ranks.PeakRss``), on CUDA
``torch.cuda.max_memory_allocated`` beyond the inputs. Times are the fastest of ``--repeats`` (and
of ``--rounds`` alternating rounds). On CUDA (bf16 inputs, fp32 logits) the throughput of forward +
backward, ``6 · T · H · V/tp`` FLOPs over the time, is set against a bf16 GEMM measured in the same
run.

    python tools/bench_fused_head.py                          # CPU: T=4096, H=1024, V=152064, TP 1 and 2
    python tools/bench_fused_head.py --device cuda --tp 1     # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ranks import PeakRss, init_rank, report_failure, run_ranks, tp_degrees  # noqa: E402  (tools/, beside this file)


def _loss(args, variant: str, h, w, labels, upstream, group):
    from mrl.ops import vocab_parallel_logprobs_and_entropy
    from mrl.ops.fused_head import FusedHead

    if variant == "fused":
        logits = FusedHead(h.view(1, *h.shape), w, fp32=True)
    else:
        sbv = torch.matmul(h.float().unsqueeze(1), w.float().t())  # [s, b=1, V/tp] fp32, as the output layer
        logits = sbv.transpose(0, 1).contiguous()  # [b, s, V/tp]
    logp, entropy = vocab_parallel_logprobs_and_entropy(logits, labels.view(1, -1), group, vocab_size=args.vocab,
                                                        chunk_size=args.chunk_size)
    return (logp * upstream[0]).sum() + (entropy * upstream[1]).sum()


def _measure(rank: int, args, variant: str, port: int, results) -> None:
    init_rank(rank, port, args.tp, args.device, max(1, (os.cpu_count() or 1) // args.tp), cpu_execution=False)
    cuda = args.device == "cuda"
    group = dist.new_group(list(range(args.tp))) if args.tp > 1 else None
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    shard = -(-args.vocab // args.tp)
    h = (torch.randn(args.tokens, args.hidden, generator=gen) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(shard, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    upstream = torch.randn(2, 1, args.tokens, generator=gen).to(device)

    def once() -> float:
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        _loss(args, variant, h, w, labels, upstream, group).backward()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - started

    if cuda:
        once()  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss = PeakRss()
    seconds = min(once() for _ in range(args.repeats))
    peak = (torch.cuda.max_memory_allocated() - base if cuda
            else rss.extra())
    gemm_tflops = _gemm_rate(args, device, dtype) if cuda else None
    if rank == 0:
        results.put(("ok", seconds, peak, gemm_tflops))
    dist.destroy_process_group()


def _gemm_rate(args, device, dtype) -> float:
    """TFLOP/s of the forward GEMM ``h · Wᵀ`` at this size, measured here."""
    a = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    b = torch.randn(-(-args.vocab // args.tp), args.hidden, device=device, dtype=dtype)
    a @ b.t()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        a @ b.t()
    torch.cuda.synchronize()
    return 5 * 2 * a.shape[0] * a.shape[1] * b.shape[0] / (time.perf_counter() - started) / 1e12


def _worker(rank: int, port: int, results, args, variant: str) -> None:
    try:
        _measure(rank, args, variant, port, results)
    except BaseException:
        report_failure(results, rank)
        raise


def run_variant(args, variant: str) -> tuple:
    return run_ranks(_worker, args.tp, args, variant, timeout=args.timeout, what=variant)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tp", type=int, nargs="*", help="TP degrees (default: 1 2 on CPU, 1 on CUDA)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the ops' own)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of fresh processes per variant")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per variant")
    args = parser.parse_args(argv)
    degrees = tp_degrees("bench_fused_head", args.device, args.tp)
    if degrees is None:
        return 2
    logits_bytes = args.tokens * args.vocab * 4
    print(f"T={args.tokens} H={args.hidden} V={args.vocab}, device {args.device}; one fp32 [T, V] buffer = "
          f"{logits_bytes / 2**30:.2f} GiB")
    header = f"{'tp':>3} | {'unfused s':>9} {'peak GiB':>8} | {'fused s':>8} {'peak GiB':>8} | {'time':>6} {'peak':>6}"
    print(header + (" | fused TFLOP/s  GEMM TFLOP/s" if args.device == "cuda" else ""))
    summary = []
    for tp in degrees:
        run_args = argparse.Namespace(**{**vars(args), "tp": tp})
        runs = {"unfused": [], "fused": []}
        for _ in range(args.rounds):  # alternate the variants so that other load hits both alike
            for variant in runs:
                runs[variant].append(run_variant(run_args, variant))
        un_s, un_peak = min(r[0] for r in runs["unfused"]), max(r[1] for r in runs["unfused"])
        fu_s, fu_peak, gemm = min(r[0] for r in runs["fused"]), max(r[1] for r in runs["fused"]), runs["fused"][0][2]
        row = {"tp": tp, "unfused_s": un_s, "fused_s": fu_s, "unfused_peak_gib": un_peak / 2**30,
               "fused_peak_gib": fu_peak / 2**30, "time_ratio": fu_s / un_s, "peak_ratio": fu_peak / max(un_peak, 1)}
        line = (f"{tp:>3} | {un_s:>9.2f} {un_peak / 2**30:>8.2f} | {fu_s:>8.2f} {fu_peak / 2**30:>8.2f} | "
                f"{row['time_ratio']:>5.2f}x {row['peak_ratio']:>5.2f}x")
        if gemm is not None:
            row["fused_tflops"] = 6 * args.tokens * args.hidden * -(-args.vocab // tp) / fu_s / 1e12
            row["gemm_tflops"] = gemm
            line += f" | {row['fused_tflops']:>13.1f}  {gemm:>12.1f}"
        print(line, flush=True)
        summary.append(row)
    print("SUMMARY " + json.dumps({"device": args.device, "tokens": args.tokens, "hidden": args.hidden,
                                   "vocab": args.vocab, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
