"""GPU-only checks: local and Transformer Engine BF16/FP8 layers, the CUDA vocab-parallel ops.

Skipped on machines without CUDA (see conftest.py); the Transformer Engine tests also skip where
it is not installed. Run on a GPU node with ``pytest -m gpu tests/test_gpu.py`` (``tools/gpu_check.py``
does); they start their own single-process NCCL group.
"""

from __future__ import annotations


import pytest
import torch

from mrl.compat import te_available

pytestmark = pytest.mark.gpu
needs_te = pytest.mark.skipif(not te_available(), reason="needs NVIDIA Transformer Engine (pip install 'mrl[gpu]')")


@pytest.fixture(scope="module")
def layout(cuda_layout):
    return cuda_layout


def _step_loss(precision, layout, transformer_impl="transformer_engine"):
    from mrl.losses.base import GlobalCounts
    from mrl.losses.factory import build_loss
    from mrl.model.builder import build_model
    from mrl.model.config import ModelConfig
    from mrl.train.step import causal_mask, model_forward

    model = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=1000,
                        max_sequence_length=128, transformer_impl=transformer_impl)
    (chunk,) = build_model(model, precision, layout, "cuda", seed=7)
    tokens = torch.randint(0, 1000, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = {"tokens": tokens, "position_ids": torch.arange(128, device="cuda").expand(4, 128),
             "labels": torch.roll(tokens, -1, 1)}
    counts = GlobalCounts(num_tokens=4 * 128, num_seqs=4)
    loss_fn = build_loss({"kind": "sft"}, vocab_size=1000)
    if precision.fp8 is None:
        output = model_forward(chunk, batch, causal_mask(128, device="cuda"))
    else:
        from mrl.compat import import_transformer_engine

        te = import_transformer_engine("the FP8 test")
        with te.fp8_autocast(enabled=True):
            output = model_forward(chunk, batch, causal_mask(128, device="cuda"))
    loss, _ = loss_fn(output, batch, counts, None)
    loss.backward()
    grads = [p.grad for p in chunk.parameters() if p.grad is not None]
    return float(loss), grads


@needs_te
def test_transformer_engine_bf16_matches_local_layers(layout):
    from mrl.model.config import PrecisionConfig

    te_loss, te_grads = _step_loss(PrecisionConfig(dtype="bf16"), layout)
    local_loss, _ = _step_loss(PrecisionConfig(dtype="bf16"), layout, transformer_impl="local")
    assert abs(te_loss - local_loss) < 2e-2 * abs(local_loss)
    assert te_grads and all(torch.isfinite(g).all() for g in te_grads)


def test_local_layers_bf16_step_is_finite(layout):
    from mrl.model.config import PrecisionConfig

    loss, grads = _step_loss(PrecisionConfig(dtype="bf16"), layout, transformer_impl="local")
    assert 0 < loss < 20
    assert grads and all(torch.isfinite(g).all() for g in grads)


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_step_is_finite_and_close_to_bf16(layout, recipe):
    from mrl.model.config import PrecisionConfig

    bf16_loss, _ = _step_loss(PrecisionConfig(dtype="bf16"), layout)
    fp8_loss, fp8_grads = _step_loss(PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe=recipe), layout)
    assert abs(fp8_loss - bf16_loss) < 5e-2 * abs(bf16_loss)
    assert all(torch.isfinite(g).all() for g in fp8_grads)


def test_cuda_logprobs_match_float64(layout):
    from mrl.ops import vocab_parallel_logprobs

    logits = torch.randn(512, 32000, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, 32000, (512,), device="cuda")
    ours = vocab_parallel_logprobs(logits, labels)
    reference = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(ours.double(), reference, atol=1e-4, rtol=1e-4)
