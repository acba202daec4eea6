"""Hugging Face Qwen3-MoE and Mixtral checkpoints load into mrl's MoE model at EP 1/2 and export back.

Tiny random checkpoints in the Hugging Face layout (config.json + safetensors) are written here; the
loaded model's logits are checked against a float64 forward written from the formulas (the Llama
attention of tests/test_hf_import.py, then each architecture's router: softmax over all experts, top-k,
renormalised (Qwen3-MoE norm_topk_prob) or not, or Mixtral's softmax over the k selected logits; SwiGLU
experts weighted by the routing weights). Export from a checkpoint saved at EP2 returns the same tensors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from mrl.model.hf import model_fields_from_hf, read_hf_config  # noqa: E402
from tests.test_hf_import import (  # noqa: E402
    _export, _model_overrides, _rms, _rope, _tokens, case_loaded_logits, case_save_after_hf_init,
)

BASE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 64,
        "rope_theta": 10000.0, "bos_token_id": 256, "eos_token_id": 257, "tie_word_embeddings": False}
VARIANTS = {
    # Qwen3-MoE: qk-norm, renormalised top-k, one dense layer (mlp_only_layers), heads wider than
    # hidden_size / heads (Qwen3-30B-A3B: 128 with 2048 / 32).
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, intermediate_size=96, moe_intermediate_size=48,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[1]),
    # Qwen3-MoE without renormalisation (Megatron's pre-softmax routing).
    "qwen3_moe_raw": dict(model_type="qwen3_moe", head_dim=16, intermediate_size=96, moe_intermediate_size=48,
                          num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                          mlp_only_layers=[]),
    # Mixtral: every layer MoE, softmax over the selected logits.
    "mixtral": dict(model_type="mixtral", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
}


def hf_config(variant: str) -> dict:
    return {**BASE, **VARIANTS[variant]}


def _moe_layer(config: dict, i: int) -> bool:
    return i not in (config.get("mlp_only_layers") or [])


def _prefix(config: dict, i: int) -> str:
    return f"model.layers.{i}." + ("block_sparse_moe." if config["model_type"] == "mixtral" else "mlp.")


def _names(config: dict) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if config["model_type"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v, nh, ng = config["hidden_size"], config["vocab_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, experts = config.get("head_dim") or h // nh, config.get("num_experts", config.get("num_local_experts"))
    moe_f = config.get("moe_intermediate_size", config["intermediate_size"])

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rand(v, h, std=0.5), "model.norm.weight": 1.0 + rand(h), "lm_head.weight": rand(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1.0 + rand(h), p + "post_attention_layernorm.weight": 1.0 + rand(h),
              p + "self_attn.q_proj.weight": rand(nh * d, h), p + "self_attn.k_proj.weight": rand(ng * d, h),
              p + "self_attn.v_proj.weight": rand(ng * d, h), p + "self_attn.o_proj.weight": rand(h, nh * d)}
        if config["model_type"] == "qwen3_moe":
            w |= {p + "self_attn.q_norm.weight": 1.0 + rand(d), p + "self_attn.k_norm.weight": 1.0 + rand(d)}
        if not _moe_layer(config, i):
            f = config["intermediate_size"]
            w |= {p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                  p + "mlp.down_proj.weight": rand(h, f)}
            continue
        q = _prefix(config, i)
        gate, up, down = _names(config)
        w[q + "gate.weight"] = rand(experts, h, std=0.5)
        for e in range(experts):
            w |= {f"{q}experts.{e}.{gate}.weight": rand(moe_f, h), f"{q}experts.{e}.{up}.weight": rand(moe_f, h),
                  f"{q}experts.{e}.{down}.weight": rand(h, moe_f)}
    return w


def write_checkpoint(directory, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    config, weights = hf_config(variant), None
    weights = random_weights(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))
    safetensors_torch.save_file(weights, str(directory / "model.safetensors"))
    return weights


def _swiglu(y, gate, up, down):
    return (torch.nn.functional.silu(y @ gate.T) * (y @ up.T)) @ down.T


def _moe(config: dict, w: dict, i: int, y: torch.Tensor) -> torch.Tensor:
    """Route every token to its top-k experts and sum their outputs weighted by the routing weights."""
    q, (gate, up, down) = _prefix(config, i), _names(config)
    k = config["num_experts_per_tok"]
    logits = y @ w[q + "gate.weight"].T  # [B, S, E]
    if config["model_type"] == "mixtral":
        top, chosen = logits.topk(k, dim=-1)
        weights = top.softmax(-1)
    else:
        top, chosen = logits.softmax(-1).topk(k, dim=-1)
        weights = top / top.sum(-1, keepdim=True) if config["norm_topk_prob"] else top
    out = torch.zeros_like(y)
    for e in range(logits.shape[-1]):
        gate_e = (weights * (chosen == e)).sum(-1, keepdim=True)  # [B, S, 1]: 0 where e was not chosen
        out = out + gate_e * _swiglu(y, w[f"{q}experts.{e}.{gate}.weight"], w[f"{q}experts.{e}.{up}.weight"],
                                     w[f"{q}experts.{e}.{down}.weight"])
    return out


def reference_logits(config: dict, weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Float64 forward from the formulas: [B, S] -> [B, S, V]."""
    w = {name: t.double() for name, t in weights.items()}
    nh, ng, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    d = config.get("head_dim") or config["hidden_size"] // nh
    b, s = tokens.shape
    causal = torch.full((s, s), -math.inf, dtype=torch.float64).triu(1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (y @ w[f"{p}self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = q.view(b, s, nh, d), k.view(b, s, ng, d), v.view(b, s, ng, d)
        if config["model_type"] == "qwen3_moe":
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], eps), _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q, config["rope_theta"]), _rope(k, config["rope_theta"])
        k, v = k.repeat_interleave(nh // ng, dim=2), v.repeat_interleave(nh // ng, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + causal
        attention = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, nh * d)
        x = x + attention @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if _moe_layer(config, i):
            x = x + _moe(config, w, i, y)
        else:
            x = x + _swiglu(y, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    return _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-moe")
    return {variant: (root / variant, write_checkpoint(root / variant, variant)) for variant in VARIANTS}


LAYOUTS = {"ep1": (dict(tp=1), 1), "ep2": (dict(ep=2), 1),
           "tp2ep2-sp": (dict(tp=2, ep=2, sequence_parallel=True), 1), "pp2ep2": (dict(pp=2, ep=2), 2)}


def test_model_fields_follow_the_architecture(checkpoints):
    fields = model_fields_from_hf(read_hf_config(checkpoints["qwen3_moe"][0]))
    assert (fields["num_experts"], fields["moe_topk"], fields["moe_ffn_hidden_size"]) == (4, 2, 48)
    assert fields["moe_layer_freq"] == [1, 0, 1, 1] and fields["qk_layernorm"] and not fields["moe_router_pre_softmax"]
    assert fields["head_dim"] == 32  # wider than hidden_size / heads = 16
    raw = model_fields_from_hf(read_hf_config(checkpoints["qwen3_moe_raw"][0]))
    assert raw["moe_router_pre_softmax"] and raw["head_dim"] is None
    mixtral = model_fields_from_hf(read_hf_config(checkpoints["mixtral"][0]))
    assert (mixtral["moe_layer_freq"], mixtral["moe_ffn_hidden_size"], mixtral["qk_layernorm"]) == (1, 48, False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_moe_model_matches_the_float64_forward(ranks4, checkpoints, variant, layout):
    directory, weights = checkpoints[variant]
    expected = reference_logits(hf_config(variant), weights, _tokens())
    parallel, micro_batches = LAYOUTS[layout]
    results = [r for r in ranks4.run(case_loaded_logits, str(directory), parallel, micro_batches) if r is not None]
    assert results
    for logits in results:
        error = (logits.double() - expected).abs().max().item()
        assert error < 2e-4 * expected.abs().max().item(), error
    print(variant, layout, "max |error| / max |logit|", error / expected.abs().max().item())


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral"])
def test_moe_export_round_trips_from_expert_parallel_checkpoints(ranks4, checkpoints, tmp_path, variant):
    from mrl.model.hf import SafetensorsReader

    directory, weights = checkpoints[variant]
    fields = model_fields_from_hf(read_hf_config(directory))
    overrides = [o.replace(" ", "") for o in _model_overrides(fields)]
    overrides += [f"train.init_checkpoint={directory}", "model.max_sequence_length=32", "data.seq_length=32",
                  "parallel.tp=1", "parallel.pp=1", "parallel.ep=2"]
    run = tmp_path / "run"
    ranks4.run(case_save_after_hf_init, str(directory), overrides, str(run))
    out = tmp_path / "exported"
    done = _export(str(run), str(out), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert model_fields_from_hf(read_hf_config(out)) == fields
    reader = SafetensorsReader(out)
    assert set(reader.weight_map) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(reader.get(name), tensor), name  # bit for bit through an EP2 checkpoint


def test_model_config_tool_prints_the_moe_block(checkpoints, capsys):
    import yaml

    from mrl.model.config import ModelConfig
    from tools.hf_model_config import main

    assert main([str(checkpoints["qwen3_moe"][0])]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["num_experts"], model["moe_topk"], model["moe_layer_freq"]) == (4, 2, [1, 0, 1, 1])
    ModelConfig(**model)  # a valid model block
