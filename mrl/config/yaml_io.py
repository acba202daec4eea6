"""YAML reading and writing for recipes, with two fixes over PyYAML's YAML 1.1 defaults.

* Exponent floats without a dot (``1e-5``, ``3E4``) are floats, as in YAML 1.2; PyYAML reads them as
  strings. The dumper uses the same resolver, so a string such as ``'1e-5'`` is written quoted and
  reads back as a string.
* A key repeated in one mapping is an error instead of silently keeping the last value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mrl.config.errors import ConfigError

_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 exponent floats and duplicate-key detection."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class RecipeDumper(yaml.SafeDumper):
    """Safe dumper that quotes strings the loader would read as numbers; scalar lists in flow style."""

    def represent_list(self, data):
        flow = all(not isinstance(item, (dict, list, tuple)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _cls in (RecipeLoader, RecipeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
RecipeDumper.add_representer(list, RecipeDumper.represent_list)
RecipeDumper.add_representer(tuple, RecipeDumper.represent_list)


def parse_yaml(text: str, *, where: str) -> Any:
    """Parse YAML text; a syntax error becomes a ``ConfigError`` naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML in {where}{at}: {problem}") from exc


def read_yaml_file(path: Path, *, where: str) -> Any:
    """Read and parse one YAML file (see ``parse_yaml``)."""
    return parse_yaml(path.read_text(encoding="utf-8"), where=where)


def format_yaml(data: Any) -> str:
    """Block-style YAML in insertion order, readable back by ``parse_yaml`` and ``yaml.safe_load``."""
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False)


def format_scalar(value: Any) -> str:
    """One value in YAML flow syntax, e.g. ``null``, ``true``, ``1.0e-05``, ``[1, 2]``."""
    text = yaml.dump(value, Dumper=RecipeDumper, default_flow_style=True, allow_unicode=True,
                     width=10**6)
    text = text.strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text
