"""Recipes: YAML mappings that inherit from parent recipes, plus dotted command-line overrides.

A recipe names its parents under the reserved top-level key ``defaults`` (one file name or a list,
relative to the recipe's own directory) and states only its differences. Parents are merged in
the order listed, then the recipe on top: mappings merge key by key (the later one wins), any other
value (scalars, lists, null) replaces the earlier one whole.

Every key of the merged tree remembers its ``Source`` (the file that set it last, or the override),
so later errors can say where a bad key came from.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from mrl.config.errors import ConfigError, KeyPath, Source, format_path
from mrl.config.yaml_io import parse_yaml, read_yaml_file

DEFAULTS_KEY = "defaults"


@dataclass
class Resolved:
    """A merged config tree and the source of each of its keys."""

    data: dict = field(default_factory=dict)
    origins: dict[KeyPath, Source] = field(default_factory=dict)

    def source_of(self, path: KeyPath) -> Optional[Source]:
        """The source of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), 0, -1):
            source = self.origins.get(tuple(path[:end]))
            if source is not None:
                return source
        return None

    def sources_under(self, path: KeyPath) -> list[Source]:
        """Distinct sources of ``path`` and every key below it, in first-set order."""
        n = len(path)
        found = [s for p, s in self.origins.items() if tuple(p[:n]) == tuple(path)]
        return list(dict.fromkeys(found))


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve_recipe(path: str | os.PathLike) -> Resolved:
    """Load the recipe at ``path`` with all its parents merged in; ``defaults`` is removed."""
    return _resolve_file(Path(os.path.abspath(Path(path).expanduser())), ())


def resolve_mapping(data: Mapping, *, base_dir: Path) -> Resolved:
    """Like ``resolve_recipe`` for an in-memory mapping; its ``defaults`` are relative to ``base_dir``."""
    data = copy.deepcopy(dict(data))
    parents = _pop_defaults(data, where="the given mapping")
    return _merge_onto_parents(data, Source(), parents, base_dir, referrer="the given mapping", stack=())


def load_with_parents(path: str | os.PathLike) -> tuple[dict, Resolved]:
    """A recipe's own keys (``defaults`` removed) and its parents merged (without the recipe)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    data, parents = _read_recipe(path)
    real = path.resolve()
    merged = _merge_onto_parents({}, Source(), parents, path.parent, referrer=display_path(path),
                                 stack=(real,))
    return data, merged


def _read_recipe(path: Path) -> tuple[dict, list[str]]:
    where = display_path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {where} does not exist")
    data = read_yaml_file(path, where=where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where} must be a mapping of keys to values, got {type(data).__name__}")
    return data, _pop_defaults(data, where=where)


def _resolve_file(path: Path, stack: tuple[Path, ...]) -> Resolved:
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(display_path(p) for p in (*stack, real))
        raise ConfigError(f"recipe inheritance cycle: {chain}")
    data, parents = _read_recipe(path)
    where = display_path(path)
    return _merge_onto_parents(data, Source(file=where), parents, path.parent, referrer=where,
                               stack=(*stack, real))


def _pop_defaults(data: dict, *, where: str) -> list[str]:
    parents = data.pop(DEFAULTS_KEY, None)
    if parents is None:
        return []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(
            f"'{DEFAULTS_KEY}' in {where} must be a file name or a list of file names, got {parents!r}"
        )
    return parents


def _merge_onto_parents(data: dict, source: Source, parents: list[str], base_dir: Path, *,
                        referrer: str, stack: tuple[Path, ...]) -> Resolved:
    merged = Resolved()
    for parent in parents:
        parent_path = Path(os.path.abspath(base_dir / Path(parent).expanduser()))
        if not parent_path.is_file():
            raise ConfigError(
                f"recipe {referrer} names parent '{parent}' in '{DEFAULTS_KEY}', but "
                f"{display_path(parent_path)} does not exist"
            )
        merged = merge(merged, _resolve_file(parent_path, stack))
    return merge(merged, Resolved(data, _origins_of(data, source, ())))


def merge(base: Resolved, top: Resolved) -> Resolved:
    """``top`` deep-merged over ``base`` (mappings merge, anything else replaces); inputs unchanged."""
    replaced = _replaced_paths(base.data, top.data, ())
    origins = {
        p: s for p, s in base.origins.items()
        if not any(len(p) > len(r) and p[: len(r)] == r for r in replaced)
    }
    origins.update(top.origins)
    return Resolved(deep_merge(base.data, top.data), origins)


def deep_merge(base: Mapping, top: Mapping) -> dict:
    """A new mapping: ``top`` over ``base``, merging nested mappings, replacing everything else."""
    result = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(result.get(key), Mapping) and isinstance(value, Mapping):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _replaced_paths(base: Any, top: Mapping, prefix: KeyPath) -> list[KeyPath]:
    """Paths where ``top`` replaces (rather than merges into) what ``base`` holds."""
    paths = []
    for key, value in top.items():
        below = base.get(key) if isinstance(base, Mapping) else None
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            paths += _replaced_paths(below, value, (*prefix, key))
        else:
            paths.append((*prefix, key))
    return paths


def _origins_of(data: Mapping, source: Source, prefix: KeyPath) -> dict[KeyPath, Source]:
    origins = {}
    for key, value in data.items():
        origins[(*prefix, key)] = source
        if isinstance(value, Mapping):
            origins.update(_origins_of(value, source, (*prefix, key)))
    return origins


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """``'optim.lr=1e-5'`` → ``(('optim', 'lr'), 1e-05)``; the value is parsed as YAML flow."""
    key, sep, raw = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not key.strip() or any(not k or any(c.isspace() for c in k) for k in keys):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. optim.lr=1e-5)")
    if not raw.strip():
        raise ConfigError(f"override {text!r} has no value; write {key}=null for null or {key}=\"''\" "
                          "for an empty string")
    value = parse_yaml(raw, where=f"the value of override {text!r}")
    return keys, value


def apply_overrides(resolved: Resolved, overrides: Iterable[str]) -> Resolved:
    """``resolved`` with each ``key=value`` override applied in order; reports all bad overrides."""
    issues = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
            resolved = _apply_one(resolved, keys, value, Source(override=text))
        except ConfigError as exc:
            issues += exc.issues
    if issues:
        raise ConfigError(issues, recipe="the command-line overrides")
    return resolved


def _apply_one(resolved: Resolved, keys: KeyPath, value: Any, source: Source) -> Resolved:
    patch: Any = value
    for end in range(len(keys) - 1, 0, -1):
        patch = {keys[end]: patch}
    node: Any = resolved.data
    for depth, key in enumerate(keys[:-1]):
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            raise ConfigError(
                f"override {source.override!r}: '{format_path(keys[: depth + 1])}' holds "
                f"{node!r}, which has no keys"
            )
    top = {keys[0]: patch}
    # Intermediate mappings the override creates belong to it; existing ones keep their source.
    origins = _origins_of(top, source, ())
    origins.update({p: s for p, s in resolved.origins.items() if len(p) < len(keys) and p in origins})
    return merge(resolved, Resolved(top, origins))
