"""``load_config``: recipe file or mapping + overrides → a typed, validated config; and its inverse."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from mrl.config.convert import build, is_dataclass_type
from mrl.config.errors import ConfigError, Source
from mrl.config.recipe import apply_overrides, display_path, resolve_mapping, resolve_recipe
from mrl.config.yaml_io import format_yaml


def load_config(source: str | os.PathLike | Mapping, schema: type, overrides: Iterable[str] = ()) -> Any:
    """Build a ``schema`` instance from a recipe (path or mapping) and ``key=value`` overrides.

    The recipe's ``defaults`` parents are merged first, then the overrides in order; the result is
    converted field by field into ``schema`` (a dataclass), running every ``__post_init__``. All
    unknown keys and wrong types are reported together in one ``ConfigError``.
    """
    if not is_dataclass_type(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if isinstance(source, Mapping):
        resolved, recipe = resolve_mapping(source, base_dir=Path.cwd()), None
    else:
        resolved, recipe = resolve_recipe(source), display_path(Path(source).expanduser())
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    resolved = apply_overrides(resolved, overrides)
    config, issues = build(schema, resolved, fallback=Source(file=recipe))
    if issues:
        raise ConfigError(issues, recipe=recipe)
    return config


def to_dict(config: Any) -> Any:
    """The config as plain YAML-ready data: every init field, defaults included; tuples as lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, Mapping):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    return config


def dump_yaml(config: Any) -> str:
    """The fully resolved config as YAML.

    ``load_config(yaml.safe_load(text), type(config)) == config`` for the returned ``text``.
    """
    return format_yaml(to_dict(config))
