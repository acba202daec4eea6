"""Refit streaming (``mrl.rl.refit``): the TP/PP shards of a replica arrive at its first rank as the
Hugging Face tensors that ``export-hf`` writes for the same model, bucket by bucket. Runs without vLLM."""

from __future__ import annotations

import pytest
import torch

from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.parallel.layout import ParallelConfig

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=300, max_sequence_length=64,
            normalization="RMSNorm", activation="swiglu", add_bias_linear=False)
VARIANTS = {
    "untied-gqa-qkv-bias": dict(num_query_groups=2, add_qkv_bias=True),
    "tied-qk-norm": dict(tie_embeddings=True, qk_layernorm=True),
}


def _chunks(parallel: ParallelConfig, fields: dict):
    from mrl.model.builder import build_model
    from mrl.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(parallel, timeout_minutes=2)
    model = ModelConfig(**{**BASE, **fields})
    return layout, model, build_model(model, PrecisionConfig(dtype="fp32"), layout, "cpu", seed=5)


def case_export_tensors(fields: dict) -> dict | None:
    from mrl.model.hf import hf_state_dict

    layout, model, chunks = _chunks(ParallelConfig(), fields)
    return hf_state_dict(chunks, model) if layout.rank == 0 else None


def case_streamed_tensors(parallel: ParallelConfig, fields: dict, bucket_bytes: int):
    from mrl.rl.refit import CollectingSink, stream_hf_weights

    layout, model, chunks = _chunks(parallel, fields)
    first = layout.tp_rank == 0 and layout.pp_rank == 0
    sink = CollectingSink() if first else None
    stats = stream_hf_weights(chunks, model, layout, bucket_bytes=bucket_bytes, dtype=torch.float32, sink=sink)
    if not first:
        return None
    return {"dp_rank": layout.dp_rank, "tensors": sink.tensors, "buckets": sink.bucket_sizes,
            "stats": (stats.tensors, stats.bytes, stats.buckets)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_shards_equal_the_export_tensors(ranks4, variant):
    fields = VARIANTS[variant]
    expected = ranks4.run(case_export_tensors, fields)[0]
    bucket = 40_000  # several buckets; the embedding (300 × 64 fp32 = 76.8 kB) travels alone
    for parallel in (ParallelConfig(tp=2, pp=2), ParallelConfig(tp=1, pp=1), ParallelConfig(tp=2, pp=1),
                     ParallelConfig(tp=1, pp=2, vpp=2)):
        results = [r for r in ranks4.run(case_streamed_tensors, parallel, fields, bucket) if r is not None]
        assert len(results) == 4 // (parallel.tp * parallel.pp)  # one receiving rank per DP replica
        for result in results:
            got = result["tensors"]
            assert sorted(got) == sorted(expected), parallel
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), (parallel, name)
            assert len(result["buckets"]) > 1
            # Only a tensor larger than a bucket makes a bucket larger than the limit.
            largest = max(t.numel() * 4 for t in expected.values())
            assert max(result["buckets"]) <= max(bucket, largest + 64)
            assert result["stats"][1] == sum(result["buckets"])
    assert ("lm_head.weight" in expected) == (not fields.get("tie_embeddings", False))


@pytest.mark.parametrize("override, message", [
    ("rollout.vllm.tensor_parallel_size=3", "rollout.vllm.tensor_parallel_size=3 must divide model.num_attention_heads"),
    ("rollout.vllm.max_model_len=16", "rollout.vllm.max_model_len=16 must be >= data.seq_length"),
    ("rollout.vllm.refit_bucket_mb=0", "rollout.vllm.refit_bucket_mb must be a positive integer"),
    ("rollout.vllm.kv_cache_gib=0", "rollout.vllm.kv_cache_gib must be a positive integer"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization must be in"),
    ("rollout.vllm.start_timeout_s=0", "rollout.vllm.start_timeout_s must be > 0"),
    ("rollout.vllm.start_timeout_s=1800", "rollout.vllm.start_timeout_s=1800 must be below parallel.timeout_minutes=30"),
    ("rollout.vllm.refit_timeout_s=3000", "rollout.vllm.refit_timeout_s=3000 must be below parallel.timeout_minutes=30"),
    ("rollout.engine=sglang", "rollout.engine"),
])
def test_vllm_settings_are_validated_naming_the_field(override, message):
    """Checked by `mrl validate` and before any rank starts; vLLM itself is not needed."""
    from mrl.config import load_config
    from mrl.job import JobConfig

    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        cfg = load_config("configs/grpo-tiny-cpu-vllm.yaml", JobConfig, [override])
        cfg.validate(4)


def test_the_vllm_recipes_validate():
    from mrl.config import load_config
    from mrl.job import JobConfig

    tiny = load_config("configs/grpo-tiny-cpu-vllm.yaml", JobConfig)
    tiny.validate(4)
    assert (tiny.rollout.engine, tiny.rollout.vllm.dtype, tiny.precision.dtype) == ("vllm", "fp32", "fp32")
    big = load_config("configs/grpo-llama3-8b-2n8g-tp4pp2-vllm.yaml", JobConfig)
    big.validate(16)
    assert big.rollout.vllm.tensor_parallel_size == 4 and big.loss.is_correction == "truncate"
