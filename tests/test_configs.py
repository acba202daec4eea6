"""The shipped recipes and the config surface: every recipe loads and validates at its world size,
GPU recipe names say what the recipes hold, Megatron-Core accepts their model settings, no recipe
repeats its parents, every field is documented, docs/config-reference.md is current, and
`mrl validate` reports errors precisely."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from mrl.config import dump_yaml, load_config, redundant_keys, undocumented_fields
from mrl.algorithms import ALGORITHMS
from mrl.job import JobConfig

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))
SCHEMA = "mrl.job:JobConfig"

# Parents that hold shared settings only, and the one error they give as a job of their own: the
# dataclass defaults of model and data disagree (model.vocab_size=256 < the byte tokenizer's 259).
# <algorithm>-<model>-<nodes>n<gpus per node>g-<layout>.yaml, layout e.g. "tp4pp2-fp8" or "tp2ep8".
GPU_NAME = re.compile(
    rf"(?P<algo>{'|'.join(map(re.escape, ALGORITHMS))})-(?P<model>.+)-(?P<nodes>\d+)n(?P<gpus>\d+)g"
    r"-(?P<layout>[a-z0-9-]+)\.yaml"
)
GPU_RECIPES = [p for p in RECIPES if GPU_NAME.fullmatch(p.name)]


def recipe_id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Every recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_recipe_loads_validates_and_round_trips(path):
    cfg = load_config(path, JobConfig)
    assert load_config(yaml.safe_load(dump_yaml(cfg)), JobConfig) == cfg
    cfg.validate(cfg.default_world_size())


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_recipe_states_only_differences_from_its_parents(path):
    assert redundant_keys(path) == []


def megatron_config(cfg: JobConfig, monkeypatch):
    """Megatron-Core's TransformerConfig for ``cfg``, which runs Megatron's own checks."""
    import mrl.model.builder as builder

    # No Transformer Engine on this machine (mrl.compat.te_available raises instead of saying so).
    monkeypatch.setattr(builder, "te_available", lambda: False)
    return builder.transformer_config(cfg.model, cfg.precision, types.SimpleNamespace(config=cfg.parallel),
                                      cfg.device)


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_megatron_accepts_the_model_settings(path, monkeypatch):
    cfg = load_config(path, JobConfig)
    config = megatron_config(cfg, monkeypatch)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (
        cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_size)
    assert config.tensor_model_parallel_size == cfg.parallel.tp
    assert config.kv_channels == cfg.model.kv_channels
    assert config.sequence_parallel == cfg.parallel.sequence_parallel
    assert config.fp8 == cfg.precision.fp8


def test_megatron_refuses_more_bf16_layers_than_a_stage_holds(monkeypatch):
    recipe = CONFIGS / "grpo-llama3-8b-2n8g-tp4pp2-fp8.yaml"  # 32 layers, pp=2
    cfg = load_config(recipe, JobConfig, ["precision.num_layers_at_start_in_bf16=17"])
    with pytest.raises(ValueError, match="num_layers_at_start_in_bf16"):
        megatron_config(cfg, monkeypatch)


# ---------------------------------------------------------------------------------------------
# GPU recipes
# ---------------------------------------------------------------------------------------------


def test_gpu_recipes_are_found():
    assert {p.name for p in GPU_RECIPES} >= {
        "grpo-llama3-8b-2n8g-tp4pp2-fp8.yaml",
        "dpo-llama3-8b-1n8g-tp2.yaml",
        "sft-qwen2.5-7b-1n8g-tp4.yaml",
        "offline-rl-qwen2.5-7b-1n8g-tp2pp2.yaml",
        "grpo-qwen3-30b-a3b-2n8g-tp2ep8.yaml",
    }


@pytest.mark.parametrize("path", GPU_RECIPES, ids=recipe_id)
def test_gpu_recipe_name_matches_its_settings(path):
    name = GPU_NAME.fullmatch(path.name)
    degrees_token, *flags = name["layout"].split("-")
    degrees = dict(re.findall(r"(tp|pp|cp|vpp|ep)(\d+)", degrees_token))
    assert "".join(k + v for k, v in degrees.items()) == degrees_token, f"unreadable layout {degrees_token!r}"
    assert set(flags) <= {"fp8", "vllm"}, f"unknown layout flags {flags}"

    cfg = load_config(path, JobConfig)
    world = cfg.default_world_size()
    assert cfg.algorithm == name["algo"]
    assert cfg.device == "cuda"
    assert world == int(name["nodes"]) * int(name["gpus"])
    p = cfg.parallel
    assert (p.tp, p.pp, p.cp) == tuple(int(degrees.get(k, 1)) for k in ("tp", "pp", "cp"))
    assert p.vpp == (int(degrees["vpp"]) if "vpp" in degrees else None)
    assert p.ep == int(degrees.get("ep", 1))
    assert (cfg.precision.fp8 is not None) == ("fp8" in flags)
    assert (cfg.rollout.engine == "vllm") == ("vllm" in flags)
    assert cfg.precision.dtype == "bf16"
    cfg.validate(world)

    assert "gpu-base.yaml" in _ancestors(path)


def _ancestors(path: Path) -> set[str]:
    """File names of every recipe ``path`` inherits from (``defaults:``, transitively)."""
    parents = yaml.safe_load(path.read_text()).get("defaults") or []
    names = set()
    for parent in [parents] if isinstance(parents, str) else parents:
        names.add(parent)
        names |= _ancestors(path.parent / parent)
    return names


def _parameters(cfg: JobConfig) -> int:
    """Weights of the recipe's decoder (RMSNorm, SwiGLU, GQA with heads of head_dim, optional qk-norm,
    dense or MoE MLPs with a router), counted from the formula."""
    m = cfg.model
    h, heads, ffn, d = m.hidden_size, m.num_attention_heads, m.ffn_size, m.kv_channels
    q, kv = heads * d, (m.num_query_groups or heads) * d
    attention = h * (q + 2 * kv) + q * h + (2 * d if m.qk_layernorm else 0)
    mlp = h * 2 * ffn + ffn * h
    moe = m.num_experts * h + m.num_experts * 3 * h * m.moe_ffn_size if m.is_moe else 0
    biases = (q + 2 * kv) + h + 2 * ffn + h if m.add_bias_linear else (q + 2 * kv) if m.add_qkv_bias else 0
    layers = sum(attention + (moe if is_moe else mlp) + biases + 2 * h for is_moe in m.moe_layer_pattern())
    embeddings = m.vocab_size * h * (1 if m.tie_embeddings else 2)
    return layers + embeddings + h


@pytest.mark.parametrize("fragment, published", [
    ("models/llama3-8b.yaml", 8_030_261_248),
    ("models/qwen2.5-7b.yaml", 7_615_616_512),
    ("models/qwen3-30b-a3b.yaml", 30_532_122_624),
])
def test_model_shapes_match_published_parameter_counts(fragment, published):
    cfg = load_config(CONFIGS / fragment, JobConfig)
    assert _parameters(cfg) == published


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------


def test_every_config_field_has_a_docstring():
    assert undocumented_fields(JobConfig) == []


def test_config_reference_document_is_current(capsys):
    tool = load_tool("config_reference")
    status = tool.main([SCHEMA, "--check", str(REPO / "docs" / "config-reference.md")])
    assert status == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mrl validate
# ---------------------------------------------------------------------------------------------


def _clean_env() -> dict:
    """The environment without a launcher's rank variables (so the recipe's world size counts)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


@pytest.fixture(scope="module")
def cli_runs():
    """Both `python -m mrl validate` subprocesses, started together (each takes a few seconds)."""
    commands = {
        "good": ["configs/sft-tiny-cpu.yaml"],
        "misspelt": ["configs/sft-tiny-cpu.yaml", "optim.lrr=1"],
    }
    procs = {
        key: subprocess.Popen([sys.executable, "-m", "mrl", "validate", *args], cwd=REPO, env=_clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, args in commands.items()
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[key] = (proc.returncode, out, err)
    return results


def test_cli_validate_accepts_a_good_recipe(cli_runs):
    status, out, err = cli_runs["good"]
    assert status == 0, err
    assert out.splitlines()[:2] == [
        "configs/sft-tiny-cpu.yaml: OK (sft, 4 ranks: tp=2 pp=2 cp=1 dp=1, 4 micro-batches per rank)",
        "on SIGTERM, SIGINT or SIGUSR1: finish the step and save a checkpoint within train.stop_timeout_s=240 s",
    ]


def test_cli_validate_suggests_the_key_for_a_misspelt_override(cli_runs):
    status, out, err = cli_runs["misspelt"]
    assert status == 1 and out == ""
    assert "mrl validate: error: unknown key 'optim.lrr'" in err
    assert "did you mean 'optim.lr'?" in err


@pytest.mark.parametrize("recipe, overrides, expected", [
    pytest.param("sft-tiny-cpu.yaml", ["optim.lr=abc"], ["optim.lr", "expected float", "'abc'"],
                 id="wrong-type"),
    pytest.param("sft-tiny-cpu.yaml", ["parallel.dp=3"],
                 ["tp=2", "pp=2", "cp=1", "dp=3", "= 12", "world size 4"], id="degree-mismatch"),
    pytest.param("sft-tiny-cpu.yaml", ["parallel.tp=4", "parallel.pp=1", "model.num_attention_heads=2"],
                 ["num_attention_heads=2", "tensor-parallel degree tp=4"], id="heads-not-divisible"),
    pytest.param("grpo-llama3-8b-2n8g-tp4pp2-fp8.yaml", ["device=cpu"],
                 ["precision.fp8", "device: cuda", "Transformer Engine"], id="fp8-on-cpu"),
    pytest.param("sft-tiny-cpu.yaml", ["nproc=8", "train.global_batch_size=24"],
                 ["train.global_batch_size=24", "train.micro_batch_size=8", "dp=2", "not a multiple of 16"],
                 id="global-batch-not-divisible"),
    pytest.param("sft-tiny-cpu.yaml", ["device=cuda", "data.packing=true"],
                 ["data.packing needs device: cpu", "THD"], id="packing-on-gpu"),
    pytest.param("sft-tiny-cpu.yaml", ["parallel.timeout_minutes=0"],
                 ["parallel.timeout_minutes must be > 0, got 0"], id="zero-timeout"),
])
def test_cli_validate_names_what_is_wrong(recipe, overrides, expected, capsys, monkeypatch):
    from mrl.cli import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    assert main(["validate", f"configs/{recipe}", *overrides]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mrl validate: error: ")
    for text in expected:
        assert text in captured.err, f"{text!r} missing from: {captured.err}"


def test_collective_timeout_is_set_by_an_override():
    """``parallel.timeout_minutes`` is a float field that an override sets, in minutes."""
    config = load_config(CONFIGS / "sft-tiny-cpu.yaml", JobConfig, ["parallel.timeout_minutes=90"])
    assert config.parallel.timeout_minutes == 90.0
    assert load_config(CONFIGS / "sft-tiny-cpu.yaml", JobConfig).parallel.timeout_minutes == 30.0
