"""The YAML-recipe → typed-dataclass config system: inheritance, overrides, conversion, errors,
dumps, field documentation and the two config tools."""

from __future__ import annotations

import dataclasses
import importlib.util
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest
import yaml

from mrl.config import (
    ConfigError,
    dump_yaml,
    field_docs,
    load_config,
    minimize_recipe,
    redundant_keys,
    render_reference,
    resolve_recipe,
    to_dict,
    undocumented_fields,
)
from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.parallel.layout import ParallelConfig

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Test schema
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """Optimizer settings."""

    lr: float = 1e-4
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule."""

    warmup_steps: Optional[int] = None
    """Warm-up steps; null disables warm-up."""

    milestones: tuple[int, ...] = ()
    """Steps at which to log a checkpoint."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")  # bare: the converter adds the path


@dataclass
class RewardSpec:
    """One reward function."""

    name: str = "exact_match"
    """Registered reward name."""

    weight: float = 1.0
    """Weight in the summed reward."""


@dataclass
class LossConfig:
    """Loss selection."""

    kind: Literal["grpo", "dpo", "sft"] = "grpo"
    """Which objective."""

    clip: Union[float, tuple[float, float]] = 0.2
    """Symmetric clip, or (low, high)."""

    beta: Optional[float] = None
    """KL coefficient;
    null disables
        the KL term."""


@dataclass
class JobConfig:
    """A job built from sections."""

    name: str = "run"
    """Run name."""

    seed: int = 0
    """Random seed."""

    tags: list[str] = field(default_factory=list)
    """Free-form tags."""

    weights: dict[str, float] = field(default_factory=dict)
    """Per-dataset sampling weights."""

    mix: Union[int, str] = 0
    """A count or a named preset."""

    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward functions."""

    extra: Any = None
    """Anything, passed through."""

    critic: Optional[ModelConfig] = None
    """Separate critic model; null shares the policy."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""

    loss: LossConfig = field(default_factory=LossConfig)
    """Loss."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerics."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""


@dataclass
class Needs:
    """A schema with a required field."""

    path: str
    """Where the data lives."""

    shards: int = 1
    """Number of shards."""


@dataclass
class BaseSection:
    """A base section."""

    alpha: int = 1
    """Alpha from the base."""

    beta: int = 2
    """Beta from the base."""


@dataclass
class DerivedSection(BaseSection):
    """A derived section."""

    beta: int = 3
    """Beta, redocumented by the subclass."""

    gamma: float = 0.5
    """Gamma, new in the subclass."""


@dataclass
class Leaky:
    """Some fields lack docstrings."""

    documented: int = 0
    """This one has a docstring."""

    bare: int = 0

    inner: BaseSection = field(default_factory=BaseSection)

    after_comment: int = 0
    # a comment is not a docstring


@dataclass
class HoldsLeaky:
    """Nests an incompletely documented section."""

    leaky: Leaky = field(default_factory=Leaky)
    """The nested section."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work inside tmp_path so messages show short relative file names."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Inheritance
# ---------------------------------------------------------------------------------------------


def test_multi_level_inheritance_with_relative_paths(in_tmp):
    write(in_tmp, "common/root.yaml", """
        seed: 1
        tags: [a, b, c]
        optim: {lr: 0.5, weight_decay: 0.1, schedule: cosine}
        model: {num_layers: 4, hidden_size: 128}
    """)
    write(in_tmp, "common/base.yaml", """
        defaults: root.yaml          # relative to common/
        tags: [x]
        optim: {lr: 0.25}
        loss: {beta: 0.04}
    """)
    recipe = write(in_tmp, "configs/run.yaml", """
        defaults: ../common/base.yaml
        name: child
        optim: {warmup_steps: 10}
        loss: {beta: null}
        model: {hidden_size: 64}
    """)
    config = load_config(recipe, JobConfig)
    assert config.name == "child" and config.seed == 1
    assert config.tags == ["x"]  # lists are replaced, not merged
    assert config.optim == OptimConfig(lr=0.25, weight_decay=0.1, schedule="cosine", warmup_steps=10)
    assert config.loss.beta is None  # null in the child replaces the parent's value
    assert (config.model.num_layers, config.model.hidden_size) == (4, 64)
    assert config.parallel == ParallelConfig()
    # The same recipe given by its absolute path, from another working directory.
    assert load_config(str(recipe.resolve()), JobConfig) == config


def test_list_of_parents_later_wins_and_diamond(in_tmp):
    write(in_tmp, "shared.yaml", "seed: 5\noptim: {lr: 0.1, weight_decay: 0.2}\n")
    write(in_tmp, "a.yaml", "defaults: shared.yaml\nname: from_a\nseed: 6\noptim: {lr: 0.3}\n")
    write(in_tmp, "b.yaml", "defaults: [shared.yaml]\nname: from_b\noptim: {weight_decay: 0.4}\n")
    recipe = write(in_tmp, "run.yaml", "defaults: [a.yaml, b.yaml]\ntags: [t]\n")
    config = load_config(recipe, JobConfig)
    assert config.name == "from_b"
    # b re-merges shared.yaml, so shared's seed (5) overrides a's (6); weight_decay from b.
    assert config.seed == 5
    assert config.optim.lr == 0.1 and config.optim.weight_decay == 0.4
    assert config.tags == ["t"]
    assert resolve_recipe(recipe).data == {
        "seed": 5, "optim": {"lr": 0.1, "weight_decay": 0.4}, "name": "from_b", "tags": ["t"],
    }


def test_inheritance_cycle_is_reported(in_tmp):
    write(in_tmp, "a.yaml", "defaults: b.yaml\nseed: 1\n")
    write(in_tmp, "b.yaml", "defaults: [c.yaml]\n")
    write(in_tmp, "c.yaml", "defaults: a.yaml\n")
    error = config_error("a.yaml", JobConfig)
    assert str(error) == "recipe inheritance cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"
    write(in_tmp, "self.yaml", "defaults: self.yaml\n")
    assert "cycle: self.yaml -> self.yaml" in str(config_error("self.yaml", JobConfig))


def test_missing_parent_names_file_and_referrer(in_tmp):
    write(in_tmp, "base.yaml", "defaults: [shared/missing.yaml]\n")
    write(in_tmp, "configs/run.yaml", "defaults: ../base.yaml\n")
    message = str(config_error("configs/run.yaml", JobConfig))
    assert message == ("recipe base.yaml names parent 'shared/missing.yaml' in 'defaults', but "
                       "shared/missing.yaml does not exist")
    assert "recipe nope.yaml does not exist" in str(config_error("nope.yaml", JobConfig))


def test_malformed_recipes(in_tmp):
    write(in_tmp, "list.yaml", "- 1\n- 2\n")
    assert "list.yaml must be a mapping" in str(config_error("list.yaml", JobConfig))
    write(in_tmp, "bad_defaults.yaml", "defaults: {a: 1}\n")
    assert "'defaults' in bad_defaults.yaml must be a file name or a list" in str(
        config_error("bad_defaults.yaml", JobConfig))
    write(in_tmp, "syntax.yaml", "seed: 1\noptim: [1, 2\n")
    message = str(config_error("syntax.yaml", JobConfig))
    assert message.startswith("invalid YAML in syntax.yaml line ")
    write(in_tmp, "dup.yaml", "seed: 1\noptim:\n  lr: 0.1\n  lr: 0.2\n")
    message = str(config_error("dup.yaml", JobConfig))
    assert "invalid YAML in dup.yaml line 4" in message and "duplicate key 'lr'" in message
    write(in_tmp, "empty.yaml", "# nothing here\n")
    assert load_config("empty.yaml", JobConfig) == JobConfig()


def test_mapping_source_may_name_parents(in_tmp):
    write(in_tmp, "base.yaml", "seed: 3\n")
    assert load_config({"defaults": "base.yaml", "name": "m"}, JobConfig) == JobConfig(name="m", seed=3)


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def test_overrides_nested_null_lists_and_order(in_tmp):
    recipe = write(in_tmp, "run.yaml", """
        loss: {beta: 0.1}
        optim: {lr: 0.5}
        model: {recompute: full}
    """)
    config = load_config(recipe, JobConfig, [
        "optim.lr=1e-5", "parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=null",
        "loss.kind=dpo", "optim.betas=[0.8, 0.9]", "tags=[a, 'b c']", "weights={x: 1, y: 2.5}",
        "weights.z=3", "seed=1", "seed=2", "name=a=b", "loss={clip: [0.1, 0.3]}",
    ])
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.parallel.tp == 2 and config.parallel.sequence_parallel is True
    assert config.model.recompute is None
    assert config.loss.kind == "dpo" and config.loss.beta == 0.1  # mapping overrides merge
    assert config.loss.clip == (0.1, 0.3)
    assert config.optim.betas == (0.8, 0.9)
    assert config.tags == ["a", "b c"]
    assert config.weights == {"x": 1.0, "y": 2.5, "z": 3.0}
    assert config.seed == 2  # later overrides win
    assert config.name == "a=b"  # only the first '=' separates key and value


def test_unknown_override_key_is_an_error_with_suggestion(in_tmp):
    write(in_tmp, "run.yaml", "seed: 1\n")
    error = config_error("run.yaml", JobConfig, ["optim.lrr=1e-5", "parallel.pp=2", "sede=3"])
    assert error.issues == [
        "unknown key 'optim.lrr' on the command line ('optim.lrr=1e-5'); did you mean 'optim.lr'?",
        "unknown key 'sede' on the command line ('sede=3'); did you mean 'seed'?",
    ]
    error = config_error("run.yaml", JobConfig, ["optimizer.lr=1"])
    assert str(error).startswith("unknown key 'optimizer' on the command line ('optimizer.lr=1'); "
                                 "did you mean 'optim'?")


def test_malformed_overrides_are_reported_together(in_tmp):
    write(in_tmp, "run.yaml", "seed: 1\n")
    error = config_error("run.yaml", JobConfig, ["seed", "seed=", "tags=[1, 2", "seed.x=1", "a..b=1"])
    assert len(error.issues) == 5 and str(error).startswith("5 config errors in the command-line overrides:")
    assert "override 'seed' is not of the form dotted.key=value" in error.issues[0]
    assert "override 'seed=' has no value; write seed=null" in error.issues[1]
    assert error.issues[2].startswith("invalid YAML in the value of override 'tags=[1, 2'")
    assert error.issues[3] == "override 'seed.x=1': 'seed' holds 1, which has no keys"
    assert "override 'a..b=1' is not of the form" in error.issues[4]
    with pytest.raises(TypeError, match="list of 'key=value' strings"):
        load_config("run.yaml", JobConfig, "seed=1")


# ---------------------------------------------------------------------------------------------
# Type conversion
# ---------------------------------------------------------------------------------------------


def test_accepted_conversions():
    config = load_config({
        "seed": 7,
        "mix": "3",                         # Union[int, str]: a str stays a str
        "optim": {
            "lr": "1e-5",                   # PyYAML 1.1 reads 1e-5 as a string
            "weight_decay": 1,              # int for float
            "betas": [0.5, "2.5e-1"],       # list for a fixed tuple
            "milestones": [10, 20, 30],     # variadic tuple
            "warmup_steps": None,
        },
        "loss": {"clip": [0.1, 0.2], "beta": 0},
        "rewards": [{"name": "length", "weight": 2}, {}],
        "weights": {"gsm8k": 1, "math": 0.5},
        "extra": {"anything": [1, "x", None]},
        "critic": {"num_layers": 1, "value_head": True},
    }, JobConfig)
    assert config.optim.lr == 1e-5 and type(config.optim.lr) is float
    assert config.optim.weight_decay == 1.0 and type(config.optim.weight_decay) is float
    assert config.optim.betas == (0.5, 0.25) and config.optim.milestones == (10, 20, 30)
    assert config.mix == "3"
    assert config.loss.clip == (0.1, 0.2) and config.loss.beta == 0.0 and type(config.loss.beta) is float
    assert config.rewards == [RewardSpec("length", 2.0), RewardSpec()]
    assert config.weights == {"gsm8k": 1.0, "math": 0.5}
    assert config.extra == {"anything": [1, "x", None]}
    assert config.critic == ModelConfig(num_layers=1, value_head=True)
    assert load_config({"mix": 3}, JobConfig).mix == 3
    assert load_config({"loss": {"clip": 1}}, JobConfig).loss.clip == 1.0
    # An instance of a section is accepted as it is.
    section = OptimConfig(lr=0.5)
    assert load_config({"optim": section}, JobConfig).optim == section


def test_yaml_files_read_exponent_floats_as_numbers(in_tmp):
    write(in_tmp, "run.yaml",
          "name: '1e-5'\nextra: [2E3, 1_0, 1e5x]\noptim: {lr: 1e-5, weight_decay: -3e+2}\n")
    config = load_config("run.yaml", JobConfig)
    assert config.optim.lr == 1e-5 and config.optim.weight_decay == -300.0
    assert config.name == "1e-5"  # quoted: stays a string
    assert config.extra == [2000.0, 10, "1e5x"] and type(config.extra[0]) is float


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lr": "fast"}}, "optim.lr: expected float, got 'fast' (str)"),
    ({"seed": True}, "seed: expected int, got true (bool)"),
    ({"seed": 1.5}, "seed: expected int, got 1.5 (float)"),
    ({"seed": "3"}, "seed: expected int, got '3' (str)"),
    ({"optim": {"lr": True}}, "optim.lr: expected float, got true (bool)"),
    ({"name": 12}, "name: expected str, got 12 (int)"),
    ({"parallel": {"sequence_parallel": 1}}, "parallel.sequence_parallel: expected bool, got 1 (int)"),
    ({"seed": None}, "seed: expected int, got null"),
    ({"loss": {"kind": "dpoo"}},
     "loss.kind: expected one of 'grpo', 'dpo', 'sft', got 'dpoo' (str); did you mean 'dpo'?"),
    ({"model": {"recompute": "ful"}},
     "model.recompute: expected one of 'full', 'selective', null, got 'ful' (str); did you mean 'full'?"),
    ({"model": {"recompute": 1}},
     "model.recompute: expected one of 'full', 'selective', null, got 1 (int)"),
    ({"optim": {"warmup_steps": "ten"}}, "optim.warmup_steps: expected int | null, got 'ten' (str)"),
    ({"tags": "a"}, "tags: expected list[str], got 'a' (str)"),
    ({"tags": ["a", 2]}, "tags[1]: expected str, got 2 (int)"),
    ({"optim": {"betas": [0.9]}},
     "optim.betas: expected tuple[float, float] (2 items), got 1 item: [0.9] (list)"),
    ({"optim": {"betas": [1, 2, 3]}},
     "optim.betas: expected tuple[float, float] (2 items), got 3 items: [1, 2, 3] (list)"),
    ({"optim": {"milestones": [1, "x"]}}, "optim.milestones[1]: expected int, got 'x' (str)"),
    ({"weights": [1]}, "weights: expected dict[str, float], got [1] (list)"),
    ({"weights": {"a": "heavy"}}, "weights.a: expected float, got 'heavy' (str)"),
    ({"weights": {3: 1.0}}, "weights.3: expected str, got 3 (int)"),
    ({"rewards": [{}, {"weight": "x"}]}, "rewards[1].weight: expected float, got 'x' (str)"),
    ({"rewards": [{"nme": "a"}]}, "unknown key 'rewards[0].nme'; did you mean 'rewards[0].name'?"),
    ({"mix": 1.5}, "mix: expected int | str, got 1.5 (float)"),
    ({"loss": {"clip": "wide"}}, "loss.clip: expected float | tuple[float, float], got 'wide' (str)"),
    ({"loss": {"clip": [0.1, "x"]}}, "loss.clip[1]: expected float, got 'x' (str)"),
    ({"optim": 3}, "optim: expected OptimConfig, got 3 (int) (a mapping of OptimConfig fields)"),
    ({"optim": None}, "optim: expected OptimConfig, got null (a mapping of OptimConfig fields)"),
    ({"critic": {"num_layer": 2}}, "unknown key 'critic.num_layer'; did you mean 'critic.num_layers'?"),
    ({"critic": [1]}, "critic: expected ModelConfig | null, got [1] (list)"),
    ({"zzz": 1}, "unknown key 'zzz'; valid keys: name, seed, tags, weights, mix, rewards, extra, "
                 "critic, optim, loss, model, precision, parallel"),
    ({"optim": {"qqq": 1}}, "unknown key 'optim.qqq'; valid keys under 'optim': lr, betas, "
                            "weight_decay, schedule, warmup_steps, milestones"),
    ({True: 1}, "key True (bool) under '<top level>' is not a field name (YAML 1.1 reads "
                "yes/no/on/off as booleans; quote the key)"),
])
def test_type_errors_name_path_type_and_value(data, message):
    error = config_error(data, JobConfig)
    assert error.issues == [message]
    assert str(error) == message


def test_errors_name_the_file_that_set_the_key(in_tmp):
    write(in_tmp, "configs/base.yaml", """
        optim:
          lr: fast
          weight_decy: 0.1
        model: {hidden_size: 64}
    """)
    write(in_tmp, "configs/run.yaml", """
        defaults: base.yaml
        optim: {lrr: 1e-5}
        loss: {kind: ppo}
        parallel: {tp: true}
    """)
    error = config_error("configs/run.yaml", JobConfig, ["model.num_layers=two"])
    assert isinstance(error, ValueError) and error.recipe == "configs/run.yaml"
    assert error.issues == [
        "optim.lr: expected float, got 'fast' (str), set in configs/base.yaml",
        "unknown key 'optim.weight_decy' in configs/base.yaml; did you mean 'optim.weight_decay'?",
        "unknown key 'optim.lrr' in configs/run.yaml; did you mean 'optim.lr'?",
        "model.num_layers: expected int, got 'two' (str) on the command line ('model.num_layers=two')",
        "loss.kind: expected one of 'grpo', 'dpo', 'sft', got 'ppo' (str), set in configs/run.yaml; "
        "did you mean 'dpo'?",
        "parallel.tp: expected int, got true (bool), set in configs/run.yaml",
    ]
    assert str(error).startswith("6 config errors in configs/run.yaml:\n  - optim.lr: expected float")


def test_missing_required_key(in_tmp):
    write(in_tmp, "data.yaml", "shards: 2\n")
    assert str(config_error("data.yaml", Needs)) == "missing required key 'path' in data.yaml"
    assert load_config("data.yaml", Needs, ["path=/data"]) == Needs("/data", 2)


def test_post_init_errors_keep_the_file_context(in_tmp):
    write(in_tmp, "base.yaml", "model: {num_attention_heads: 3}\n")
    write(in_tmp, "run.yaml", "defaults: base.yaml\nmodel: {hidden_size: 64}\nprecision: {fp8: e4m3}\n")
    error = config_error("run.yaml", JobConfig)
    assert len(error.issues) == 2
    assert error.issues[0].startswith("model.hidden_size=64 is not divisible by num_attention_heads=3")
    assert error.issues[0].endswith(" (from run.yaml, base.yaml)")
    assert error.issues[1] == "precision.fp8 needs dtype bf16 or fp16, got fp32 (from run.yaml)"
    error = config_error("run.yaml", JobConfig, ["model.num_attention_heads=4", "parallel.tp=0"])
    assert error.issues == [
        "precision.fp8 needs dtype bf16 or fp16, got fp32 (from run.yaml)",
        "parallel.tp must be a positive integer, got 0 (from override 'parallel.tp=0')",
    ]
    # A validation in the test schema itself, after the string-to-float conversion.
    error = config_error({"optim": {"lr": "-1e-3"}}, JobConfig)
    assert error.issues == ["optim.lr must be > 0, got -0.001"]


def test_post_init_errors_name_the_full_path_of_their_section():
    """__post_init__ names fields bare; the converter prefixes where the dataclass sits, so the same
    DataConfig reports data.* at the top and rollout.warmup_data.* inside the rollout section."""
    from mrl.job import JobConfig as Job

    recipe = REPO / "configs/grpo-tiny-cpu.yaml"
    overrides = ["data.seq_length=1", "rollout.warmup_data.seq_length=1", "rollout.vllm.gpu_memory_utilization=2",
                 "loss.kind=ppo", "loss.clip_low=1.5"]
    error = config_error(recipe, Job, overrides)
    assert [issue.split(" (from ")[0] for issue in error.issues] == [
        "data.seq_length must be >= 2 (a token and its successor), got 1",
        "loss.clip_low must be in [0, 1), got 1.5",  # the loss section's kind picks its config class
        "rollout.warmup_data.seq_length must be >= 2 (a token and its successor), got 1",
        "rollout.vllm.gpu_memory_utilization must be in (0, 1], got 2.0",
    ]
    # A section's own check of a nested one, and the top level (no prefix).
    assert config_error(recipe, Job, ["rollout.warmup_data.kind=prompt"]).issues[0].startswith(
        "rollout.warmup_data.kind must be 'sft', got 'prompt' (from ")
    assert config_error(recipe, Job, ["nproc=0"]).issues[0].startswith(
        "nproc must be a positive integer or null, got 0 (from ")


def test_qualify_prefixes_field_names_and_other_messages():
    from mrl.config.convert import qualify

    assert qualify("clip_low must be in [0, 1)", ("loss",), {"clip_low"}) == "loss.clip_low must be in [0, 1)"
    assert qualify("kind='x' is odd", ("rollout", "warmup_data"), {"kind"}) == "rollout.warmup_data.kind='x' is odd"
    assert qualify("warmup_data.kind must be 'sft'", ("rollout",), {"warmup_data"}) == \
        "rollout.warmup_data.kind must be 'sft'"
    assert qualify("no room left", ("data",), {"seq_length"}) == "data: no room left"
    assert qualify("data.path is set twice", ("data",), {"path"}) == "data.path is set twice"  # already full
    assert qualify("nproc must be >= 1", (), {"nproc"}) == "nproc must be >= 1"  # the top level


def test_schema_must_be_a_dataclass():
    with pytest.raises(TypeError, match="schema must be a dataclass type"):
        load_config({}, dict)


# ---------------------------------------------------------------------------------------------
# Dumps
# ---------------------------------------------------------------------------------------------


def test_dump_yaml_round_trip():
    config = JobConfig(
        name="1e-5", seed=3, tags=["x", "yes", "null"], weights={"a": 0.25, "on": 2.0}, mix="7",
        rewards=[RewardSpec("len", 0.5)], extra={"k": [1, 2]},
        critic=ModelConfig(num_layers=1, value_head=True, recompute="selective"),
        optim=OptimConfig(lr=3e-6, betas=(0.8, 0.99), milestones=(5, 10), warmup_steps=4),
        loss=LossConfig(kind="dpo", clip=(0.1, 0.28), beta=1e-3),
        precision=PrecisionConfig(dtype="bf16", fp8="hybrid", loss_scale=None),
        parallel=ParallelConfig(tp=2, sequence_parallel=True),
    )
    text = dump_yaml(config)
    assert load_config(yaml.safe_load(text), JobConfig) == config
    plain = yaml.safe_load(text)
    assert plain["optim"]["betas"] == [0.8, 0.99] and plain["name"] == "1e-5"
    assert plain["precision"]["loss_scale"] is None and plain["model"] == to_dict(ModelConfig())
    assert list(plain) == [f.name for f in dataclasses.fields(JobConfig)]
    assert "betas: [0.8, 0.99]" in text  # scalar lists in flow style
    assert load_config(yaml.safe_load(dump_yaml(JobConfig())), JobConfig) == JobConfig()


def test_dumped_file_loads_back_through_the_recipe_path(in_tmp):
    config = load_config({"optim": {"lr": "1e-5"}, "name": "2e3"}, JobConfig)
    write(in_tmp, "saved.yaml", dump_yaml(config))
    assert load_config("saved.yaml", JobConfig) == config


def test_to_dict_holds_every_field():
    data = to_dict(JobConfig())
    assert data["parallel"] == {"tp": 1, "pp": 1, "vpp": None, "cp": 1, "dp": None,
                                "sequence_parallel": False, "timeout_minutes": 30.0, "ep": 1, "etp": None}
    assert data["optim"]["betas"] == [0.9, 0.95] and data["critic"] is None


# ---------------------------------------------------------------------------------------------
# Field documentation
# ---------------------------------------------------------------------------------------------


def test_field_docs_of_nested_schema():
    docs = {d.path: d for d in field_docs(JobConfig)}
    assert docs["model.hidden_size"] == ("model.hidden_size", "int", 64, "Width of the residual stream.")
    assert docs["model.recompute"].type == "'full' | 'selective' | null"
    assert docs["optim.lr"] == ("optim.lr", "float", 1e-4, "Peak learning rate.")
    assert docs["optim.betas"].type == "tuple[float, float]"
    assert docs["optim.milestones"].type == "tuple[int, ...]"
    assert docs["loss.clip"].type == "float | tuple[float, float]"
    assert docs["weights"].type == "dict[str, float]" and docs["weights"].default == {}
    assert docs["rewards[].weight"] == ("rewards[].weight", "float", 1.0, "Weight in the summed reward.")
    assert docs["critic.num_layers"].doc == "Number of transformer layers."
    assert docs["optim"].type == "OptimConfig" and docs["optim"].default == OptimConfig()
    # Multi-line docstrings collapse to one line.
    assert docs["loss.beta"].doc == "KL coefficient; null disables the KL term."
    order = [d.path for d in field_docs(JobConfig)]
    assert order[:13] == [f.name for f in dataclasses.fields(JobConfig)]
    assert order.index("optim.lr") < order.index("optim.betas") < order.index("loss.kind")
    required = {d.path: d for d in field_docs(Needs)}["path"]
    assert required.default is dataclasses.MISSING and required.doc == "Where the data lives."


def test_field_docs_follow_inheritance():
    docs = {d.path: (d.default, d.doc) for d in field_docs(DerivedSection)}
    assert docs == {
        "alpha": (1, "Alpha from the base."),
        "beta": (3, "Beta, redocumented by the subclass."),
        "gamma": (0.5, "Gamma, new in the subclass."),
    }


def test_undocumented_fields_are_detected():
    assert undocumented_fields(HoldsLeaky) == ["leaky.bare", "leaky.inner", "leaky.after_comment"]
    for schema in (JobConfig, ModelConfig, PrecisionConfig, ParallelConfig):
        assert undocumented_fields(schema) == [], schema


def test_render_reference_tables():
    text = render_reference(JobConfig)
    assert text.startswith("### JobConfig (top level)\n\nA job built from sections.\n\n| Key | Type |")
    assert "| `seed` | `int` | `0` | Random seed. |" in text
    assert "### `optim` (OptimConfig)\n\nOptimizer settings.\n" in text
    assert "| `optim.lr` | `float` | `0.0001` | Peak learning rate. |" in text
    assert "| `model.recompute` | `'full' \\| 'selective' \\| null` | `null` |" in text
    assert "### `rewards[]` (RewardSpec)" in text and "| `rewards[].name` | `str` | `exact_match` |" in text
    assert "| `optim` |" not in text  # sections get headings, not rows
    assert "| `path` | `str` | `required` | Where the data lives. |" in render_reference(Needs)


def test_config_reference_tool_check_and_update(in_tmp, capsys):
    tool = load_tool("config_reference")
    spec = "tests.test_config_loader:OptimConfig"
    doc = write(in_tmp, "README.md",
                f"# Title\n\n<!-- config-reference: {spec} -->\nstale\n<!-- /config-reference -->\nend\n")
    assert tool.main([spec, "--check", str(doc)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert tool.main([spec, "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Title\n\n<!-- config-reference: ") and text.endswith("-->\nend\n")
    assert render_reference(OptimConfig) in text and "stale" not in text
    assert tool.main([spec, "--check", str(doc)]) == 0
    assert tool.main(["mrl.parallel.layout:ParallelConfig", "--check", str(doc)]) == 2
    assert tool.main([spec]) == 0
    assert capsys.readouterr().out.endswith(render_reference(OptimConfig))


# ---------------------------------------------------------------------------------------------
# Minimizing recipes
# ---------------------------------------------------------------------------------------------


def test_redundant_keys_and_minimize(in_tmp):
    write(in_tmp, "base.yaml", """
        seed: 1
        tags: [a, b]
        optim: {lr: 0.5, weight_decay: 1.0}
        loss: {kind: dpo, beta: 0.1}
        model: {num_layers: 4}
    """)
    recipe = write(in_tmp, "run.yaml", """
        # The run.
        defaults: base.yaml
        seed: 1            # same as base
        tags: [a, b, c]
        optim:
          lr: 0.5
          weight_decay: 1  # an int, the base has a float: kept
        # loss section
        loss:
          kind: dpo
          beta: 0.1

        model:
          num_layers: 4
          hidden_size: 128
        name: run
    """)
    before = resolve_recipe(recipe).data
    assert [(r.path, r.value, r.source) for r in redundant_keys(recipe)] == [
        ("seed", 1, "base.yaml"), ("optim.lr", 0.5, "base.yaml"),
        ("loss", {"kind": "dpo", "beta": 0.1}, "base.yaml"), ("model.num_layers", 4, "base.yaml"),
    ]
    result = minimize_recipe(recipe)
    assert recipe.read_text() != result.text  # not written without write=True
    assert result.comments_kept
    assert result.text == textwrap.dedent("""
        # The run.
        defaults: base.yaml
        tags: [a, b, c]
        optim:
          weight_decay: 1  # an int, the base has a float: kept
        # loss section

        model:
          hidden_size: 128
        name: run
    """)
    minimize_recipe(recipe, write=True)
    assert recipe.read_text() == result.text
    assert resolve_recipe(recipe).data == before
    assert redundant_keys(recipe) == []


def test_minimize_flow_style_falls_back_to_rewrite(in_tmp):
    write(in_tmp, "base.yaml", "optim: {lr: 0.5}\n")
    recipe = write(in_tmp, "run.yaml", "defaults: [base.yaml]\noptim: {lr: 0.5, weight_decay: 0.2}  # c\n")
    before = resolve_recipe(recipe).data
    result = minimize_recipe(recipe, write=True)
    assert [r.path for r in result.removed] == ["optim.lr"] and not result.comments_kept
    assert yaml.safe_load(recipe.read_text()) == {"defaults": ["base.yaml"], "optim": {"weight_decay": 0.2}}
    assert resolve_recipe(recipe).data == before


def test_minimize_without_parents_and_tool(in_tmp, capsys):
    root = write(in_tmp, "root.yaml", "seed: 1\n")
    assert redundant_keys(root) == [] and minimize_recipe(root).text == "seed: 1\n"
    write(in_tmp, "run.yaml", "defaults: root.yaml\nseed: 1\nname: x\n")
    tool = load_tool("minimize_recipe")
    assert tool.main(["run.yaml", "root.yaml"]) == 0
    assert capsys.readouterr().out == "run.yaml: redundant seed = 1 (already given by root.yaml)\n"
    assert tool.main(["run.yaml", "--check"]) == 1
    assert tool.main(["run.yaml", "--write"]) == 0
    assert (in_tmp / "run.yaml").read_text() == "defaults: root.yaml\nname: x\n"
    assert tool.main(["run.yaml", "--check"]) == 0
    write(in_tmp, "broken.yaml", "defaults: gone.yaml\n")
    assert tool.main(["broken.yaml"]) == 2
    assert "gone.yaml does not exist" in capsys.readouterr().err
