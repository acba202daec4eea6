"""Hugging Face Llama-family checkpoints load into the Megatron-Core model at every layout.

A tiny random checkpoint is written in the Hugging Face layout (config.json + safetensors), and
the logits of the loaded model are checked against a float64 forward written here from the Llama
formulas (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU), at TP 1/2, PP 2 and
interleaved PP. The Qwen3 checkpoint's heads are wider than hidden_size / num_attention_heads
(``model.head_dim``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

safetensors_torch = pytest.importorskip("safetensors.torch")

from mrl.model.config import ModelConfig  # noqa: E402
from mrl.model.hf import (  # noqa: E402
    HFCheckpointError, check_model_matches_hf, is_hf_model_dir, model_fields_from_hf, read_hf_config,
)

B, S = 2, 16
REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    # Llama / Mistral: grouped-query attention, untied head, no biases; two safetensors files + index.
    "llama": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    # Qwen2: biases on q/k/v, tied embeddings.
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0),
    # Llama 3.1: RoPE frequencies rescaled for long context.
    "llama31": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3: RMSNorm on each query and key head, heads wider than hidden_size / heads (32 ≠ 64 / 4),
    # as Qwen3's head_dim 128 is at every size.
    "qwen3": dict(model_type="qwen3", num_key_value_heads=4, tie_word_embeddings=False, head_dim=32),
}


def hf_config(variant: str) -> dict:
    return {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
            "vocab_size": 300, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 64,
            "rope_theta": 10000.0, "bos_token_id": 256, "eos_token_id": 257, **VARIANTS[variant]}


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nh, ng = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // nh

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + rand(n)

    w = {"model.embed_tokens.weight": rand(v, h, std=0.5), "model.norm.weight": norm(h)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
              p + "self_attn.q_proj.weight": rand(nh * d, h), p + "self_attn.k_proj.weight": rand(ng * d, h),
              p + "self_attn.v_proj.weight": rand(ng * d, h), p + "self_attn.o_proj.weight": rand(h, nh * d),
              p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
              p + "mlp.down_proj.weight": rand(h, f)}
        if config["model_type"] == "qwen2":
            w |= {p + f"self_attn.{x}_proj.bias": rand(n * d) for x, n in (("q", nh), ("k", ng), ("v", ng))}
        if config["model_type"] == "qwen3":
            w |= {p + "self_attn.q_norm.weight": norm(d), p + "self_attn.k_norm.weight": norm(d)}
    return w


def write_checkpoint(directory: Path, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a Hugging Face directory; the llama variant is split over two files with an index."""
    config = hf_config(variant)
    weights = random_weights(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))
    if variant == "llama":
        names = sorted(weights)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, part in halves.items():
            safetensors_torch.save_file({n: weights[n] for n in part}, str(directory / file))
        index = {"metadata": {}, "weight_map": {n: file for file, part in halves.items() for n in part}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        safetensors_torch.save_file(weights, str(directory / "model.safetensors"))
    return weights


# ---- float64 reference ---------------------------------------------------------------------------

def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def llama3_inv_freq(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency rescaling, from its published definition."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    out = []
    for freq in inv.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(freq)
        elif wavelen > context / low:
            out.append(freq / factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def _inv_freq(d: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return llama3_inv_freq(inv, scaling) if scaling else inv


def _rope(x, theta, scaling=None):  # x [B, S, heads, d]
    d = x.shape[-1]
    inv = _inv_freq(d, theta, scaling)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None]  # [S, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None]  # [1, S, 1, d]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None]
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def reference_logits(config: dict, weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama-family forward in float64, from the formulas: [B, S] -> [B, S, V]."""
    w = {k: t.double() for k, t in weights.items()}
    nh, ng, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    d = config.get("head_dim") or config["hidden_size"] // nh
    b, s = tokens.shape
    causal = torch.full((s, s), -math.inf, dtype=torch.float64).triu(1)
    x = w["model.embed_tokens.weight"][tokens]  # [B, S, h]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (y @ w[f"{p}self_attn.{n}_proj.weight"].T + w.get(f"{p}self_attn.{n}_proj.bias", 0.0)
                   for n in "qkv")
        q, k, v = q.view(b, s, nh, d), k.view(b, s, ng, d), v.view(b, s, ng, d)
        if config["model_type"] == "qwen3":
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], eps), _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        scaling = config.get("rope_scaling")
        q, k = _rope(q, config["rope_theta"], scaling), _rope(k, config["rope_theta"], scaling)
        k, v = k.repeat_interleave(nh // ng, dim=2), v.repeat_interleave(nh // ng, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + causal
        attention = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, nh * d)
        x = x + attention @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _rms(x, w["model.norm.weight"], eps) @ head.T


def _tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 300, (B, S), generator=torch.Generator().manual_seed(seed))


# ---- cases (run in the gloo pools) ---------------------------------------------------------------

def _logits_of(chunks, layout, vocab: int, micro_batches: int = 1) -> torch.Tensor | None:
    """Full-vocabulary logits of ``_tokens()`` through the training schedule; None off the last stage."""
    from mrl.ops.comm import all_gather_last_dim
    from mrl.train.forward import annotate_logprobs

    tokens = _tokens()
    rows = B // micro_batches
    batches = [{"tokens": tokens[i * rows:(i + 1) * rows], "labels": tokens[i * rows:(i + 1) * rows],
                "position_ids": torch.arange(S).expand(rows, S)} for i in range(micro_batches)]
    annotate_logprobs(chunks, batches, layout, key="logprobs", vocab_size=vocab, keep_logits_key="logits")
    if not layout.is_last_stage:
        return None
    return torch.cat([all_gather_last_dim(batch["logits"], layout.tp_group)[..., :vocab] for batch in batches])


def case_loaded_logits(directory: str, parallel: dict, micro_batches: int) -> torch.Tensor | None:
    from mrl.model.builder import build_model
    from mrl.model.config import PrecisionConfig
    from mrl.model.hf import load_hf_weights_
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    model = ModelConfig(max_sequence_length=S, **model_fields_from_hf(read_hf_config(directory)))
    layout = ParallelLayout.initialize(ParallelConfig(**parallel), timeout_minutes=2)
    layout.seed(1)
    chunks = build_model(model, PrecisionConfig(), layout, "cpu")
    filled = load_hf_weights_(chunks, directory, model)
    assert filled > 0
    return _logits_of(chunks, layout, model.vocab_size, micro_batches)


def case_trainer_starts_from_hf(directory: str, overrides: list[str], output_dir: str) -> dict | None:
    """The trainer's policy and its frozen 'initial' reference both start from the checkpoint."""
    import torch.distributed as dist

    from mrl.config import load_config
    from mrl.job import JobConfig
    from mrl.parallel.layout import ParallelLayout
    from mrl.runner import build_trainer

    cfg = load_config(REPO / "configs" / "dpo-tiny-cpu.yaml", JobConfig, [*overrides, f"log.output_dir={output_dir}"])
    cfg.validate(dist.get_world_size())
    layout = ParallelLayout.initialize(cfg.parallel, timeout_minutes=2)
    layout.seed(cfg.seed)
    trainer = build_trainer(cfg, layout)
    trainer._resume()
    policy = _logits_of(trainer.model, layout, cfg.model.vocab_size)
    reference = _logits_of(trainer.reference, layout, cfg.model.vocab_size)
    trainer.train_one_step()  # a tiny lr: the weights stay those of the checkpoint
    stepped = _logits_of(trainer.model, layout, cfg.model.vocab_size)
    return None if policy is None else {"policy": policy, "reference": reference, "stepped": stepped}


def case_rotary_frequencies(model_fields: dict) -> torch.Tensor:
    from mrl.model.builder import build_model
    from mrl.model.config import PrecisionConfig
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(), timeout_minutes=2)
    layout.seed(1)
    chunks = build_model(ModelConfig(**model_fields), PrecisionConfig(), layout, "cpu")
    return chunks[0].rotary_pos_emb.inv_freq.double()


def test_llama31_rope_scaling_reaches_the_model(ranks2, checkpoints):
    """Head dim 128 spans all three bands of Llama 3.1's rescaling (kept, smoothed, divided)."""
    directory, _ = checkpoints["llama31"]
    config = read_hf_config(directory)
    fields = model_fields_from_hf(config) | {"hidden_size": 512, "num_attention_heads": 4,
                                              "max_sequence_length": 64}
    assert fields["rope_scaling_factor"] == 8.0
    measured = ranks2.run(case_rotary_frequencies, fields)[0]
    plain = _inv_freq(128, config["rope_theta"], None)
    expected = _inv_freq(128, config["rope_theta"], config["rope_scaling"])
    assert torch.allclose(measured, expected, rtol=1e-6)
    changed = ~torch.isclose(expected, plain)
    assert 0 < changed.sum() < len(plain)  # some bands rescaled, the high frequencies kept


def _model_overrides(fields: dict) -> list[str]:
    return [f"model.{name}={'null' if value is None else value}" for name, value in fields.items()]


LAYOUTS = {
    "tp1": (dict(tp=1), 1),
    "tp2": (dict(tp=2), 1),
    "tp2pp2": (dict(tp=2, pp=2), 2),
    "pp2vpp2": (dict(tp=1, pp=2, vpp=2), 2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {variant: (root / variant, write_checkpoint(root / variant, variant)) for variant in VARIANTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_model_matches_the_float64_forward(ranks4, checkpoints, variant, layout):
    directory, weights = checkpoints[variant]
    expected = reference_logits(hf_config(variant), weights, _tokens())
    parallel, micro_batches = LAYOUTS[layout]
    results = [r for r in ranks4.run(case_loaded_logits, str(directory), parallel, micro_batches) if r is not None]
    assert results
    for logits in results:
        assert logits.shape == expected.shape == (B, S, 300)
        error = (logits.double() - expected).abs().max().item()
        assert error < 2e-4 * expected.abs().max().item(), error


@pytest.mark.parametrize("dtype, rel", [("fp32", 2e-4), ("bf16", 3e-2)])
def test_trainer_initialises_policy_and_reference_from_hf(ranks4, checkpoints, tmp_path, dtype, rel):
    directory, weights = checkpoints["qwen2"]
    fields = model_fields_from_hf(read_hf_config(directory))
    overrides = _model_overrides(fields)
    overrides += [f"train.init_checkpoint={directory}", "model.max_sequence_length=32", "data.seq_length=32",
                  f"precision.dtype={dtype}", "optim.lr=1e-9", "scheduler.warmup_steps=0", "log.progress=false"]
    expected = reference_logits(hf_config("qwen2"), weights, _tokens())
    results = [r for r in ranks4.run(case_trainer_starts_from_hf, str(directory), overrides, str(tmp_path)) if r]
    assert results
    for r in results:
        for which in ("policy", "reference", "stepped"):
            error = (r[which].double() - expected).abs().max().item()
            assert error < rel * expected.abs().max().item(), (which, error)


# ---- errors ----------------------------------------------------------------------------------------

def test_model_mismatch_lists_every_differing_field(checkpoints):
    directory, _ = checkpoints["llama"]
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300,
                        ffn_hidden_size=96, rotary_base=500000, norm_epsilon=1e-6, max_sequence_length=128)
    with pytest.raises(ValueError) as info:
        check_model_matches_hf(model, directory)
    message = str(info.value)
    for text in ("model.num_layers=2 (checkpoint: 4)", "model.num_query_groups=4 (checkpoint: 2)",
                 "model.max_sequence_length=128 (checkpoint: at most 64)", "tools/hf_model_config.py"):
        assert text in message, message
    assert "hidden_size" not in message and "vocab_size" not in message
    # Mistral-7B-v0.1 attends over a 4096-token window: full attention is the same model only up to it.
    mistral = hf_config("llama") | {"model_type": "mistral", "sliding_window": 16}
    (directory / "config.json").write_text(json.dumps(mistral))
    try:
        fields = model_fields_from_hf(mistral)
        check_model_matches_hf(ModelConfig(**fields, max_sequence_length=16), directory)
        with pytest.raises(ValueError, match=r"sliding-window attention over 16 tokens"):
            check_model_matches_hf(ModelConfig(**fields, max_sequence_length=32), directory)
    finally:
        (directory / "config.json").write_text(json.dumps(hf_config("llama")))


def test_head_dim_is_read_written_and_validated(checkpoints):
    from mrl.config import load_config
    from mrl.job import JobConfig
    from mrl.model.hf import hf_config as export_config

    directory, _ = checkpoints["qwen3"]
    fields = model_fields_from_hf(read_hf_config(directory)) | {"max_sequence_length": S}
    assert fields["head_dim"] == 32
    model = ModelConfig(**fields)
    assert model.kv_channels == 32 and export_config(model)["head_dim"] == 32
    # A head_dim equal to hidden_size / heads is the default width: left out, and exported as such.
    assert model_fields_from_hf(hf_config("qwen3") | {"head_dim": 16})["head_dim"] is None
    assert model_fields_from_hf(hf_config("llama"))["head_dim"] is None
    assert export_config(ModelConfig(**model_fields_from_hf(hf_config("llama"))))["head_dim"] == 16
    check_model_matches_hf(ModelConfig(**fields | {"head_dim": 32}), directory)
    with pytest.raises(ValueError, match=r"model.head_dim=None \(checkpoint: 32\)"):
        check_model_matches_hf(ModelConfig(**fields | {"head_dim": None}), directory)
    # Heads need not divide the hidden size once their width is given.
    assert ModelConfig(hidden_size=60, num_attention_heads=8, head_dim=16).kv_channels == 16
    with pytest.raises(ValueError, match=r"hidden_size=60 is not divisible by num_attention_heads=8; set head_dim"):
        ModelConfig(hidden_size=60, num_attention_heads=8)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"head_dim must be a positive integer or null"):
            ModelConfig(head_dim=bad)
    with pytest.raises(ValueError, match=r"model\.head_dim must be a positive integer or null, got 0"):
        load_config(REPO / "configs" / "sft-tiny-cpu.yaml", JobConfig, ["model.head_dim=0"])


def test_unsupported_or_broken_checkpoints_are_named(checkpoints, tmp_path):
    from mrl.model.hf import SafetensorsReader

    directory, _ = checkpoints["llama"]
    assert is_hf_model_dir(directory) and not is_hf_model_dir(tmp_path)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFCheckpointError, match=r"config.json: model_type 'gpt2' is not supported"):
        read_hf_config(gpt2)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps(hf_config("llama") | {"rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(HFCheckpointError, match="rope_scaling"):
        read_hf_config(scaled)
    reader = SafetensorsReader(directory)
    embedding = reader.get("model.embed_tokens.weight")
    assert reader.shape("model.embed_tokens.weight") == [300, 64]
    assert torch.equal(reader.get_rows("model.embed_tokens.weight", 128, 256), embedding[128:256])
    from mrl.model.hf import _vocab_rows

    padded = _vocab_rows("output_layer.weight", reader, ModelConfig(vocab_size=300), 256, 384)  # TP rank 2 of 3
    assert torch.equal(padded[:44], reader.get("lm_head.weight")[256:]) and not padded[44:].any()
    with pytest.raises(HFCheckpointError, match=r"model.embed_tokens.weight has 300 rows but the vocabulary is 299"):
        _vocab_rows("embedding.word_embeddings.weight", reader, ModelConfig(vocab_size=299), 0, 128)
    with pytest.raises(HFCheckpointError, match=r"tensor 'model.layers.9.mlp.up_proj.weight' is missing"):
        reader.get("model.layers.9.mlp.up_proj.weight")
    (directory / "model-00002-of-00002.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        name = next(n for n, f in SafetensorsReader(directory).weight_map.items() if f.startswith("model-00002"))
        with pytest.raises(HFCheckpointError, match=r"model-00002-of-00002.safetensors .* does not exist"):
            SafetensorsReader(directory).get(name)
    finally:
        (tmp_path / "moved.safetensors").rename(directory / "model-00002-of-00002.safetensors")


def test_model_config_tool_prints_settings_that_match(checkpoints, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_model_config", REPO / "tools" / "hf_model_config.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for variant, (directory, _) in checkpoints.items():
        assert tool.main([str(directory)]) == 0
        fields = yaml.safe_load(capsys.readouterr().out)["model"]
        assert fields["max_sequence_length"] == 64
        check_model_matches_hf(ModelConfig(**fields), directory)  # no mismatch
        assert fields["add_qkv_bias"] == (variant == "qwen2") and fields["qk_layernorm"] == (variant == "qwen3")
    assert tool.main([str(Path(__file__).parent)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_validate_refuses_a_model_that_does_not_match_the_checkpoint(checkpoints):
    from mrl.config import load_config
    from mrl.job import JobConfig

    directory, _ = checkpoints["llama"]
    for override in (f"train.init_checkpoint={directory}", f"reference.checkpoint={directory}"):
        cfg = load_config(REPO / "configs" / "dpo-tiny-cpu.yaml", JobConfig, [override, "reference.source=checkpoint"]
                          if override.startswith("reference") else [override])
        with pytest.raises(ValueError, match=r"does not match the Hugging Face checkpoint .*model.vocab_size=259 "
                                             r"\(checkpoint: 300\)"):
            cfg.validate(4)


# ---- export: mrl checkpoint -> Hugging Face directory -----------------------------------------------

def case_save_after_hf_init(directory: str, overrides: list[str], output_dir: str) -> None:
    """Start a run from the Hugging Face weights at this layout and save its checkpoint at once."""
    import torch.distributed as dist

    from mrl.config import dump_yaml, load_config
    from mrl.job import JobConfig
    from mrl.parallel.layout import ParallelLayout
    from mrl.runner import build_trainer

    cfg = load_config(REPO / "configs" / "sft-tiny-cpu.yaml", JobConfig, [*overrides, f"log.output_dir={output_dir}"])
    cfg.validate(dist.get_world_size())
    if dist.get_rank() == 0:
        (Path(output_dir)).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "config.yaml").write_text(dump_yaml(cfg))
    layout = ParallelLayout.initialize(cfg.parallel, timeout_minutes=2)
    layout.seed(cfg.seed)
    trainer = build_trainer(cfg, layout)
    trainer._resume()
    trainer.save()


def _export(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mrl", "export-hf", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("variant, layout", [("llama", "tp2pp2"), ("qwen2", "pp2vpp2"), ("qwen3", "tp2")])
def test_export_round_trips_the_checkpoint_exactly(ranks4, checkpoints, tmp_path, variant, layout):
    directory, weights = checkpoints[variant]
    fields = model_fields_from_hf(read_hf_config(directory))
    parallel = {"tp2pp2": ["parallel.tp=2", "parallel.pp=2"], "tp2": ["parallel.tp=2", "parallel.pp=1"],
                "pp2vpp2": ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=4"]}[layout]
    overrides = _model_overrides(fields)
    overrides += [f"train.init_checkpoint={directory}", "model.max_sequence_length=32", "data.seq_length=32", *parallel]
    run = tmp_path / "run"
    ranks4.run(case_save_after_hf_init, str(directory), overrides, str(run))

    out = tmp_path / "exported"
    done = _export(str(run), str(out), "--dtype", "fp32", "--max-shard-gb", "0.0001")
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_hf_model_dir(out) and not (tmp_path / "exported.partial").exists()
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(weights)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded at 100 kB
    assert model_fields_from_hf(read_hf_config(out)) == fields
    exported = read_hf_config(out)
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (256, 257)  # kept from the starting model
    assert exported["head_dim"] == hf_config(variant).get("head_dim", 16)
    assert (out / "generation_config.json").read_text() == (directory / "generation_config.json").read_text()
    from mrl.model.hf import SafetensorsReader

    reader = SafetensorsReader(out)
    assert set(reader.weight_map) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(reader.get(name), tensor), name  # bit for bit through a TP/PP checkpoint

    again = _export(str(run), str(out))
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
    missing = _export(str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr
