"""KV-cached decoding and sampling across TP/PP/VPP/SP, against a no-cache reference and float64 math.

Cases run in the shared gloo pools. The reference (``tests/reference_decoding.py``) recomputes the
whole unpadded sequence for every token through the ordinary training forward.
"""

from __future__ import annotations

import math

import pytest
import torch

from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.ops.sampling import SamplingParams
from mrl.parallel.layout import ParallelConfig

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=300, max_sequence_length=64)
# Prompts of mixed lengths; a fixed continuation is teacher-forced through the decode steps.
PROMPT_LENGTHS = [5, 12, 3, 9]
STEPS = 6


def _setup(parallel: ParallelConfig, model_fields: dict, dtype: str = "fp32"):
    from mrl.model.builder import build_model
    from mrl.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(parallel, timeout_minutes=2)
    layout.seed(1234)
    model = ModelConfig(**{**MODEL, **model_fields})
    chunks = build_model(model, PrecisionConfig(dtype=dtype), layout, "cpu", seed=11)
    for chunk in chunks:
        chunk.eval()
    return layout, model, chunks


def _prompts(lengths, vocab: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _full_vocab(layout, logits):
    from mrl.ops.comm import all_gather_last_dim

    return all_gather_last_dim(logits.contiguous(), layout.tp_group)


def _teacher_forced_logits(decoder_cls, layout, chunks, prompts, continuation, drop_after: int | None):
    """Logits [rows, V] of every step when ``continuation`` is fed; row 1 leaves after ``drop_after`` steps."""
    from mrl.model.decoding import sequence_parallel_disabled, supports_padding_masks

    longest = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
    pad = torch.tensor([longest - len(p) for p in prompts])
    active = torch.arange(len(prompts))
    steps = []
    cached = decoder_cls.__name__ == "KVCacheDecoder"  # the reference runs the training forward, SP included
    with torch.no_grad(), sequence_parallel_disabled(chunks if cached else []):
        decoder = decoder_cls(chunks, layout, max_rows=len(prompts), max_length=longest + STEPS + 1,
                              padding_masks=supports_padding_masks(chunks))
        logits = decoder.prefill(tokens, pad)
        for step in range(STEPS):
            steps.append((active.clone(), None if logits is None else _full_vocab(layout, logits)))
            if drop_after is not None and step == drop_after:
                keep = (active != 1).nonzero().squeeze(1)
                decoder.keep(keep)
                active = active[keep]
            logits = decoder.step(continuation[active, step])
    return steps


def case_incremental_equals_full_forward(parallel: ParallelConfig, model_fields: dict, drop_after):
    from mrl.model.decoding import KVCacheDecoder
    from tests.reference_decoding import FullForwardDecoder

    layout, model, chunks = _setup(parallel, model_fields)
    prompts = _prompts(PROMPT_LENGTHS, model.vocab_size)
    continuation = torch.randint(0, model.vocab_size, (len(prompts), STEPS), generator=torch.Generator().manual_seed(5))
    cached = _teacher_forced_logits(KVCacheDecoder, layout, chunks, prompts, continuation, drop_after)
    reference = _teacher_forced_logits(FullForwardDecoder, layout, chunks, prompts, continuation, drop_after)
    if not layout.is_last_stage:
        return None
    worst = 0.0
    for (rows_a, a), (rows_b, b) in zip(cached, reference):
        assert torch.equal(rows_a, rows_b)
        worst = max(worst, float((a - b).abs().max()))
    return worst, float(reference[0][1].abs().max())


LAYOUTS4 = {
    "tp2xpp2": (ParallelConfig(tp=2, pp=2), {}),
    "tp2xpp2-sp": (ParallelConfig(tp=2, pp=2, sequence_parallel=True), {}),
    "tp4-gqa": (ParallelConfig(tp=4), {"num_attention_heads": 8, "num_query_groups": 4}),
}
LAYOUTS2 = {
    "tp1": (ParallelConfig(tp=1), {}),
    "tp2": (ParallelConfig(tp=2), {}),
    "pp2xvpp2": (ParallelConfig(pp=2, vpp=2), {}),
    "tp2-learned-positions": (ParallelConfig(tp=2), {"position_embedding": "learned_absolute"}),
}


@pytest.mark.parametrize("name", list(LAYOUTS2))
def test_incremental_logits_equal_a_full_forward_2ranks(ranks2, name):
    parallel, fields = LAYOUTS2[name]
    _check_incremental(ranks2.run(case_incremental_equals_full_forward, parallel, fields, 2))


@pytest.mark.parametrize("name", list(LAYOUTS4))
def test_incremental_logits_equal_a_full_forward_4ranks(ranks4, name):
    parallel, fields = LAYOUTS4[name]
    _check_incremental(ranks4.run(case_incremental_equals_full_forward, parallel, fields, 3))


def _check_incremental(results):
    measured = [r for r in results if r is not None]
    assert measured
    for worst, scale in measured:
        assert scale > 0.1  # the logits are not trivially small
        assert worst <= 1e-5, worst


# ---- The sampler ---------------------------------------------------------------------------------

def _sampler(layout, chunks, model, *, decoder=None, eos_id=-1, max_new_tokens=6, wave_rows=64,
             params=SamplingParams()):
    from mrl.model.decoding import KVCacheDecoder
    from mrl.rl.sampler import PolicySampler

    return PolicySampler(chunks, layout, vocab_size=model.vocab_size, eos_id=eos_id, pad_id=0,
                         max_new_tokens=max_new_tokens, max_length=model.max_sequence_length, sampling=params,
                         wave_rows=wave_rows, decoder_factory=decoder or KVCacheDecoder)


def case_sampler_matches_reference(parallel: ParallelConfig, params: SamplingParams, wave_rows: int):
    from tests.reference_decoding import FullForwardDecoder

    layout, model, chunks = _setup(parallel, {})
    prompts = _prompts([7] * 6, model.vocab_size)
    cached = _sampler(layout, chunks, model, params=params, wave_rows=wave_rows).generate(prompts, seed=9)
    reference = _sampler(layout, chunks, model, params=params, wave_rows=wave_rows,
                         decoder=FullForwardDecoder).generate(prompts, seed=9)
    lp_diff = max(abs(a - b) for ra, rb in zip(cached.logprobs, reference.logprobs) for a, b in zip(ra, rb))
    return cached.completions, reference.completions, lp_diff, cached.stats


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, top_p=0.8)],
                         ids=["full", "topk-topp"])
def test_sampled_tokens_equal_the_no_cache_reference(ranks4, params):
    results = ranks4.run(case_sampler_matches_reference, ParallelConfig(tp=2, pp=2), params, 4)
    for cached, reference, lp_diff, stats in results:
        assert cached == reference
        assert all(len(c) == 6 for c in cached)
        assert lp_diff <= 1e-5
        assert stats["waves"] == 2 and stats["tokens"] == 36
    assert all(r[0] == results[0][0] for r in results)  # every rank holds the same completions


def case_eos_stops_rows(parallel: ParallelConfig):
    layout, model, chunks = _setup(parallel, {})
    prompts = _prompts([4, 8, 6, 8, 3], model.vocab_size, seed=21)
    greedy = SamplingParams(greedy=True)
    free = _sampler(layout, chunks, model, params=greedy, max_new_tokens=8).generate(prompts, seed=1)
    eos = free.completions[0][2]
    stopped = _sampler(layout, chunks, model, params=greedy, eos_id=eos, max_new_tokens=8).generate(prompts, seed=1)
    return free.completions, stopped.completions, eos


def test_rows_stop_at_eos_and_the_others_continue_unchanged(ranks2):
    free, stopped, eos = ranks2.run(case_eos_stops_rows, ParallelConfig(tp=2))[0]
    assert any(len(s) < 8 for s in stopped)
    assert any(eos not in f for f in free)  # some rows never stop and run to max_new_tokens
    for full, cut in zip(free, stopped):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected


# ---- Sampling frequencies against float64 probabilities --------------------------------------------

def case_first_token_samples(parallel: ParallelConfig, params: SamplingParams, lengths, repeats: int):
    """Many first tokens per prompt (mixed lengths, one wave), and each prompt's full-vocabulary logits."""
    from tests.reference_decoding import FullForwardDecoder

    layout, model, chunks = _setup(parallel, {"init_method_std": 0.5})
    prompts = _prompts(lengths, model.vocab_size, seed=4)
    rows = [p for p in prompts for _ in range(repeats)]
    result = _sampler(layout, chunks, model, params=params, max_new_tokens=1, wave_rows=len(rows)).generate(rows, seed=2)
    logits = []
    for prompt in prompts:
        decoder = FullForwardDecoder(chunks, layout, max_rows=1, max_length=model.max_sequence_length)
        out = decoder.prefill(torch.tensor([prompt]), torch.tensor([0]))
        logits.append(None if out is None else _full_vocab(layout, out)[0, : model.vocab_size].double())
    if not layout.is_last_stage:
        return None
    tokens = torch.tensor([c[0] for c in result.completions]).view(len(prompts), repeats)
    lps = torch.tensor([lp[0] for lp in result.logprobs]).view(len(prompts), repeats)
    return tokens, lps, torch.stack(logits)


def _truncated_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float64 log-probs of the distribution ``params`` samples from (-inf outside its support)."""
    z = logits / params.temperature
    if params.top_k:
        kth = z.topk(params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    logp = z.log_softmax(-1)
    if params.top_p < 1.0:
        probs, order = logp.exp().sort(descending=True)
        before = probs.cumsum(0) - probs
        drop = order[before >= params.top_p]
        z = z.clone()
        z[drop] = float("-inf")
        logp = z.log_softmax(-1)
    return logp


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a chi-square goodness-of-fit test; bins with expected count < 5 are merged."""
    total = counts.sum()
    expected = probs * total
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)]).double()
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    dof = len(wanted) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


# Each chi-square test rejects a correct sampler with probability 1e-4 (the seeds are fixed, so a
# given run is deterministic; the rate says how unlucky a seed would have to be).
ALPHA = 1e-4


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.8, top_k=12),
    SamplingParams(top_p=0.7),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
], ids=["full", "top-k", "top-p", "top-k+top-p"])
def test_sample_frequencies_match_the_policy_for_mixed_length_prompts(ranks4, params):
    results = ranks4.run(case_first_token_samples, ParallelConfig(tp=2, pp=2), params, [3, 11, 6], 1500)
    tokens, lps, logits = next(r for r in results if r is not None)
    reference = [_truncated_logprobs(row, params) for row in logits]
    # The prompts condition the model: their distributions differ (the test could see a mix-up).
    assert float((reference[0].exp() - reference[1].exp()).abs().sum()) > 0.3
    for prompt, logp in enumerate(reference):
        support = torch.isfinite(logp)
        drawn = tokens[prompt]
        assert bool(support[drawn].all()), "a token outside the truncated set was drawn"
        assert torch.allclose(lps[prompt].double(), logp[drawn], atol=2e-5)
        counts = torch.bincount(drawn, minlength=len(logp)).double()
        assert _chi_square_p_value(counts[support], logp[support].exp()) > ALPHA
        if params.truncated:
            assert int(support.sum()) < len(logp)


def test_chi_square_check_rejects_a_wrong_distribution():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    right = torch.bincount(torch.multinomial(probs, 3000, True, generator=gen), minlength=50).double()
    shifted = torch.softmax(probs.log() * 1.3, 0)
    wrong = torch.bincount(torch.multinomial(shifted, 3000, True, generator=gen), minlength=50).double()
    assert _chi_square_p_value(right, probs) > ALPHA
    assert _chi_square_p_value(wrong, probs) < ALPHA


def test_kv_budget_too_small_for_one_row_names_the_field():
    from mrl.rl.config import RolloutConfig, kv_cache_bytes_per_row

    model = ModelConfig(**MODEL)
    per_row = kv_cache_bytes_per_row(model, ParallelConfig(tp=2, pp=2), 64, "fp32")
    assert per_row == 2 * 2 * 2 * 16 * 64 * 4  # 2 · layers/pp · kv_heads/tp · head_dim · S · 4 bytes
    with pytest.raises(ValueError, match=r"rollout\.kv_cache_gib=.*too small for one row"):
        RolloutConfig(kv_cache_gib=per_row / 2 / 2**30).wave_rows(per_row, 8)
    assert RolloutConfig(kv_cache_gib=3.5 * per_row / 2**30).wave_rows(per_row, 8) == 3
    with pytest.raises(ValueError, match=r"rollout\.decode_rows=4 .* at most 3 rows fit"):
        RolloutConfig(decode_rows=4, kv_cache_gib=3.5 * per_row / 2**30).wave_rows(per_row, 8)
    assert math.isclose(RolloutConfig(decode_rows=2).wave_rows(per_row, 8), 2)


def test_validate_refuses_a_kv_budget_too_small_for_one_row_and_prints_the_estimate(capsys, tmp_path):
    from pathlib import Path

    from mrl.cli import main
    from mrl.config import load_config
    from mrl.job import JobConfig

    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "grpo-tiny-cpu.yaml")
    cfg = load_config(recipe, JobConfig, ["rollout.kv_cache_gib=1e-6"])
    with pytest.raises(ValueError, match=r"rollout\.kv_cache_gib=1e-06 is too small for one row"):
        cfg.validate()
    fresh = f"log.output_dir={tmp_path / 'run'}"  # not the recipe's own, which a `make run` may have filled
    assert main(["validate", recipe, fresh]) == 0
    # tiny-cpu: 4 layers / pp 2, 4 kv heads / tp 2, head_dim 32, S 32, fp32: 32 KiB a row; 128 rows.
    assert "rollout KV cache: 128 rows per wave x 0.0312 MiB per row" in capsys.readouterr().out
    assert main(["validate", recipe, fresh, "rollout.decode_rows=16"]) == 0
    assert "16 rows per wave" in capsys.readouterr().out


def test_progress_line_shows_the_latest_rollouts_phases(tmp_path, capsys):
    from mrl.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, total_steps=4, log_interval=2)
    log.write({"step": 1, "loss": 0.5, "tokens_per_s": 10.0, "time_rollout_s": 1.5, "gen_tokens_per_s": 120.0,
               "time_logprobs_s": 0.25, "time_train_s": 0.75})
    log.write({"step": 2, "loss": 0.4, "tokens_per_s": 10.0, "time_train_s": 0.5})
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 2/4")
    assert "rollout 1.5s (120 gen tok/s) logprobs 0.2s train 0.5s" in line
    assert '"time_rollout_s": 1.5' in (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
