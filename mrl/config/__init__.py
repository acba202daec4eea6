"""YAML recipes → typed config dataclasses: inheritance, overrides, validation, dumps and docs.

Typical use::

    from mrl.config import load_config, dump_yaml
    config = load_config("configs/grpo.yaml", JobConfig, ["optim.lr=1e-5", "parallel.tp=2"])
    (run_dir / "config.yaml").write_text(dump_yaml(config))
"""

from mrl.config.docs import FieldDoc, field_docs, render_reference, undocumented_fields
from mrl.config.errors import ConfigError
from mrl.config.loader import dump_yaml, load_config, to_dict
from mrl.config.minimize import minimize_recipe, redundant_keys
from mrl.config.recipe import apply_overrides, resolve_recipe

__all__ = [
    "ConfigError",
    "FieldDoc",
    "apply_overrides",
    "dump_yaml",
    "field_docs",
    "load_config",
    "minimize_recipe",
    "redundant_keys",
    "render_reference",
    "resolve_recipe",
    "to_dict",
    "undocumented_fields",
]
