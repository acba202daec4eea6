"""Rollout throughput: the KV-cached sampler against a full-forward-per-token reference, same run.

Both variants are mrl's ``PolicySampler`` on the same model, weights, prompts and seed; only the
decoder differs:

* ``kv-cache``      ``mrl.model.decoding.KVCacheDecoder`` (Megatron-Core's static inference context:
                    one prefill, then one position per row and step, last-token logits only);
* ``full-forward``  ``tests/reference_decoding.FullForwardDecoder`` (every step runs the whole
                    sequence of every active row through the training forward, as a sampler without a
                    cache does).

With ``--vllm`` (needs vLLM: run it with ``.venv-vllm/bin/python``), a third column: the same prompts
through ``rollout.engine: vllm`` (``mrl.rl.vllm_engine``: one engine of ``--engine-tp`` workers beside
rank 0, refit from the policy's shards). Its tokens/s count generation only; its start-up seconds
and refit seconds per MiB (the fastest of ``--repeats`` refits of the whole model) are printed too.

For each sequence length S the prompts have S - new_tokens tokens and every row generates exactly
``new_tokens`` tokens (no eos), so both variants produce the same number of tokens; each variant's
time is the fastest of ``--repeats`` runs. Printed:
generated tokens/s of each, their ratio, and peak memory. Peak memory on CPU is the growth of the
process's resident set during generation (``ru_maxrss``, so each variant runs in fresh processes);
on CUDA ``torch.cuda.max_memory_allocated`` beyond the model.

    python tools/bench_rollout.py                         # CPU gloo: S = 64, 256, 1024 at TP1 and TP2
    python tools/bench_rollout.py --device cuda --tp 1    # one GPU, bf16, a larger model
    .venv-vllm/bin/python tools/bench_rollout.py --vllm   # and the vLLM engine (CPU build)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ranks import init_rank, report_failure, run_ranks, tp_degrees  # noqa: E402  (tools/, beside this file)

CPU_MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=259)
CUDA_MODEL = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8, vocab_size=32000)


def _worker(rank: int, port: int, results, args, variant: str, seq: int) -> None:
    try:
        _measure(rank, args, variant, seq, port, results)
    except BaseException:
        report_failure(results, rank)
        raise


def _measure(rank: int, args, variant: str, seq: int, port: int, results) -> None:
    from mrl.model.builder import build_model
    from mrl.model.config import ModelConfig, PrecisionConfig
    from mrl.model.decoding import KVCacheDecoder
    from mrl.ops.sampling import SamplingParams
    from mrl.parallel.layout import ParallelConfig, ParallelLayout
    from mrl.rl.sampler import PolicySampler
    from tests.reference_decoding import FullForwardDecoder

    init_rank(rank, port, args.tp, args.device, args.threads, cpu_execution=True)
    cuda = args.device == "cuda"
    layout = ParallelLayout.initialize(ParallelConfig(tp=args.tp))
    layout.seed(1)
    fields = args.model or (CUDA_MODEL if cuda else CPU_MODEL)
    model = ModelConfig(**fields, max_sequence_length=seq)
    precision = PrecisionConfig(dtype="bf16" if cuda else "fp32")
    chunks = build_model(model, precision, layout, args.device, seed=3)
    gen = torch.Generator().manual_seed(7)
    prompt_len = seq - args.new_tokens
    prompts = [torch.randint(3, model.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(args.rows)]
    if variant == "vllm":
        _measure_vllm(args, layout, model, precision, chunks, prompts, seq, results)
        layout.destroy()
        dist.destroy_process_group()
        return
    decoder = KVCacheDecoder if variant == "kv-cache" else FullForwardDecoder
    sampler = PolicySampler(chunks, layout, vocab_size=model.vocab_size, eos_id=-1, pad_id=0,
                            max_new_tokens=args.new_tokens, max_length=seq, sampling=SamplingParams(),
                            wave_rows=args.rows, decoder_factory=decoder)
    sampler.generate(prompts[:2], seed=0)  # warm-up (allocator, first-call costs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = float("inf")
    for repeat in range(args.repeats):  # the best of a few runs: other processes' load only slows a run
        dist.barrier()
        started = time.perf_counter()
        rollout = sampler.generate(prompts, seed=1 + repeat)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        seconds = min(seconds, time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    if rank == 0:
        results.put(("ok", seconds, sum(len(c) for c in rollout.completions), peak))
    layout.destroy()
    dist.destroy_process_group()


def _measure_vllm(args, layout, model, precision, chunks, prompts, seq: int, results) -> None:
    """Start-up, refit and generation of ``rollout.engine: vllm`` over the same policy and prompts."""
    from types import SimpleNamespace

    from mrl.data.config import DataConfig
    from mrl.rl.config import RolloutConfig, VLLMConfig
    from mrl.rl.vllm_engine import VLLMRolloutSource

    engine = VLLMConfig(tensor_parallel_size=args.engine_tp, dtype=precision.dtype, max_model_len=seq,
                        enforce_eager=args.device == "cpu")
    rollout = RolloutConfig(engine="vllm", max_new_tokens=args.new_tokens, vllm=engine)
    cfg = SimpleNamespace(model=model, precision=precision, device=args.device, seed=3, rollout=rollout,
                          data=DataConfig(kind="prompt", seq_length=seq))
    started = time.perf_counter()
    source = VLLMRolloutSource(cfg, chunks, layout, SimpleNamespace(eos_id=-1), log=lambda message: None)
    startup = time.perf_counter() - started
    refit_s, moved = float("inf"), 0
    for _ in range(args.repeats):
        dist.barrier()
        started = time.perf_counter()
        moved = source.refit()
        dist.barrier()
        refit_s = min(refit_s, time.perf_counter() - started)
    source.generate(prompts[:2], seed=0)  # warm-up
    seconds = float("inf")
    for repeat in range(args.repeats):
        out = source.generate(prompts, seed=1 + repeat)
        seconds = min(seconds, out.stats["generate_s"])
    source.close()
    if layout.rank == 0:
        results.put(("ok", seconds, sum(len(c) for c in out.completions), 0, startup, refit_s, moved))


def run_variant(args, variant: str, seq: int) -> tuple:
    return run_ranks(_worker, args.tp, args, variant, seq, timeout=args.timeout, what=f"{variant} at S={seq}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tp", type=int, nargs="*", help="TP degrees (default: 1 2 on CPU, 1 on CUDA)")
    parser.add_argument("--seq", type=int, nargs="*", default=[64, 256, 1024], help="sequence lengths S")
    parser.add_argument("--rows", type=int, default=16, help="rows decoded together")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (one is steadiest on a busy machine)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the fastest counts)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per variant")
    parser.add_argument("--model", type=json.loads, default=None,
                        help='model fields as JSON, e.g. \'{"num_layers": 8, "hidden_size": 512, ...}\'')
    parser.add_argument("--vllm", action="store_true", help="also the vLLM engine (needs vLLM)")
    parser.add_argument("--engine-tp", type=int, default=1, help="tensor-parallel size of the vLLM engine")
    args = parser.parse_args(argv)
    degrees = tp_degrees("bench_rollout", args.device, args.tp)
    if degrees is None:
        return 2
    model = args.model or (CUDA_MODEL if args.device == "cuda" else CPU_MODEL)
    print(f"model {model}, {args.rows} rows x {args.new_tokens} new tokens, device {args.device}")
    print(f"{'tp':>3} {'S':>5} | {'kv-cache tok/s':>14} {'peak MiB':>9} | {'full-forward tok/s':>18} "
          f"{'peak MiB':>9} | {'speed-up':>8}")
    summary = []
    for tp in degrees:
        args_tp = argparse.Namespace(**{**vars(args), "tp": tp})
        for seq in args.seq:
            kv_s, kv_n, kv_peak = run_variant(args_tp, "kv-cache", seq)
            ff_s, ff_n, ff_peak = run_variant(args_tp, "full-forward", seq)
            kv_rate, ff_rate = kv_n / kv_s, ff_n / ff_s
            print(f"{tp:>3} {seq:>5} | {kv_rate:>14.0f} {kv_peak / 2**20:>9.1f} | {ff_rate:>18.0f} "
                  f"{ff_peak / 2**20:>9.1f} | {kv_rate / ff_rate:>7.1f}x", flush=True)
            summary.append({"tp": tp, "seq": seq, "kv_tokens_per_s": kv_rate, "full_tokens_per_s": ff_rate,
                            "speedup": kv_rate / ff_rate, "kv_peak_mib": kv_peak / 2**20,
                            "full_peak_mib": ff_peak / 2**20})
            if args.vllm:
                v_s, v_n, _, startup, refit_s, moved = run_variant(args_tp, "vllm", seq)
                mib = moved / 2**20
                print(f"{'':>3} {'':>5} | vllm (engine tp {args.engine_tp}): {v_n / v_s:.0f} tok/s "
                      f"({v_n / v_s / kv_rate:.1f}x kv-cache), start-up {startup:.1f} s, refit {refit_s:.3f} s "
                      f"for {mib:.1f} MiB ({refit_s / max(mib, 1e-9):.4f} s/MiB)", flush=True)
                summary[-1].update(vllm_tokens_per_s=v_n / v_s, vllm_startup_s=startup, vllm_refit_s=refit_s,
                                   vllm_refit_mib=mib, vllm_refit_s_per_mib=refit_s / max(mib, 1e-9))
    print("SUMMARY " + json.dumps({"device": args.device, "rows": args.rows, "new_tokens": args.new_tokens,
                                   "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
