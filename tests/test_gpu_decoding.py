"""GPU-only: KV-cached decoding and sampling on CUDA (local layers; Transformer Engine where installed).

Skipped without CUDA (see conftest.py); ``pytest -m gpu tests/test_gpu_decoding.py`` on a GPU node.
A single-process NCCL group, TP=1.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.test_decoding import MODEL, PROMPT_LENGTHS, STEPS, _prompts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def layout(cuda_layout):
    return cuda_layout


def _chunks(layout, dtype: str, impl: str):
    from mrl.model.builder import build_model
    from mrl.model.config import ModelConfig, PrecisionConfig

    model = ModelConfig(**MODEL, transformer_impl=impl)
    chunks = build_model(model, PrecisionConfig(dtype=dtype), layout, "cuda", seed=11)
    for chunk in chunks:
        chunk.eval()
    return model, chunks


def _forced(decoder_cls, layout, chunks, prompts, continuation):
    from mrl.model.decoding import supports_padding_masks

    longest = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
    pad = torch.tensor([longest - len(p) for p in prompts])
    decoder = decoder_cls(chunks, layout, max_rows=len(prompts), max_length=longest + STEPS + 1,
                          padding_masks=supports_padding_masks(chunks))
    with torch.no_grad():
        out = [decoder.prefill(tokens, pad).float()]
        for step in range(STEPS):
            out.append(decoder.step(continuation[:, step]).float())
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-4), ("bf16", 0.1)])
def test_cuda_incremental_logits_equal_a_full_forward(layout, dtype, tolerance):
    from mrl.model.decoding import KVCacheDecoder
    from tests.reference_decoding import FullForwardDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    model, chunks = _chunks(layout, dtype, "local")
    prompts = _prompts(PROMPT_LENGTHS, model.vocab_size)
    continuation = torch.randint(0, model.vocab_size, (len(prompts), STEPS))
    cached = _forced(KVCacheDecoder, layout, chunks, prompts, continuation)
    reference = _forced(FullForwardDecoder, layout, chunks, prompts, continuation)
    assert cached.is_cuda
    assert float((cached - reference).abs().max()) <= tolerance


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine")
def test_cuda_transformer_engine_waves_hold_one_prompt_length(layout):
    from mrl.model.decoding import KVCacheDecoder, supports_padding_masks
    from mrl.ops.sampling import SamplingParams
    from mrl.rl.sampler import PolicySampler
    from tests.reference_decoding import FullForwardDecoder

    model, chunks = _chunks(layout, "bf16", "transformer_engine")
    assert not supports_padding_masks(chunks)
    prompts = _prompts([4, 4, 9, 9, 6], model.vocab_size)
    runs = []
    for decoder in (KVCacheDecoder, FullForwardDecoder):
        sampler = PolicySampler(chunks, layout, vocab_size=model.vocab_size, eos_id=-1, pad_id=0, max_new_tokens=4,
                                max_length=model.max_sequence_length, sampling=SamplingParams(greedy=True),
                                wave_rows=8, decoder_factory=decoder)
        runs.append(sampler.generate(prompts, seed=0))
    assert runs[0].stats["waves"] == 3  # one wave per prompt length
    agree = sum(a == b for a, b in zip(runs[0].completions, runs[1].completions))
    assert agree >= 4  # bf16 near-ties may flip a greedy choice
