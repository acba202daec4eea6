"""Find (and remove) recipe keys that repeat what the recipe's ``defaults`` parents already give.

A key is redundant when its value equals, type included, the parents' merged value at the same
path; a mapping is redundant when every key in it is. Removal edits the file line by line, so
comments and layout elsewhere survive; when that is not possible (keys inside a flow mapping such
as ``{a: 1}``), the file is rewritten from the data and its comments are lost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import yaml

from mrl.config.errors import KeyPath, format_path
from mrl.config.recipe import load_with_parents
from mrl.config.yaml_io import RecipeLoader, format_yaml, parse_yaml


class Redundant(NamedTuple):
    """A recipe key whose value a parent already gives."""

    path: str
    """Dotted path of the key."""
    value: Any
    """The value, equal in the recipe and its parents."""
    source: str
    """The parent recipe the value comes from."""


class Minimized(NamedTuple):
    """The outcome of ``minimize_recipe``."""

    removed: list[Redundant]
    """The keys taken out."""
    text: str
    """The new file text."""
    comments_kept: bool
    """False when the file had to be rewritten from its data."""


def redundant_keys(recipe: str | os.PathLike) -> list[Redundant]:
    """Keys of ``recipe`` whose values equal what its parents already give, in file order."""
    return [found for _, found in _find(recipe)]


def minimize_recipe(recipe: str | os.PathLike, *, write: bool = False) -> Minimized:
    """The recipe's text without its redundant keys; with ``write`` the file is replaced."""
    path = Path(recipe)
    text = path.read_text(encoding="utf-8")
    found = _find(path)
    if not found:
        return Minimized([], text, True)
    paths = [p for p, _ in found]
    removed = [r for _, r in found]
    expected = parse_yaml(text, where=str(path))
    for p in paths:
        _delete(expected, p)
    new_text = _delete_lines(text, paths)
    kept = new_text is not None and parse_yaml(new_text, where=str(path)) == expected
    if not kept:
        new_text = format_yaml(expected)
    if write:
        path.write_text(new_text, encoding="utf-8")
    return Minimized(removed, new_text, kept)


def _find(recipe: str | os.PathLike) -> list[tuple[KeyPath, Redundant]]:
    own, parents = load_with_parents(recipe)
    found = []
    for path in _redundant_paths(own, parents.data, ()):
        source = parents.source_of(path)
        found.append((path, Redundant(format_path(path), _get(parents.data, path),
                                      source.name() if source else "the parents")))
    return found


def _redundant_paths(own: Mapping, parent: Any, prefix: KeyPath) -> list[KeyPath]:
    paths = []
    for key, value in own.items():
        if not isinstance(parent, Mapping) or key not in parent:
            continue
        path = (*prefix, key)
        below = parent[key]
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            inner = _redundant_paths(value, below, path)
            whole = {(*path, k) for k in value} == set(inner)
            paths += [path] if whole else inner
        elif _same(value, below):
            paths.append(path)
    return paths


def _same(a: Any, b: Any) -> bool:
    """Equal with equal types all the way down (``1`` differs from ``1.0`` and from ``true``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _get(data: Any, path: KeyPath) -> Any:
    for key in path:
        data = data[key]
    return data


def _delete(data: dict, path: KeyPath) -> None:
    del _get(data, path[:-1])[path[-1]]


def _delete_lines(text: str, paths: list[KeyPath]) -> str | None:
    """``text`` without the lines of each key in ``paths``, or None when keys share lines."""
    root = yaml.compose(text, Loader=RecipeLoader)
    constructor = RecipeLoader("")
    lines = text.splitlines(keepends=True)
    drop: set[int] = set()
    for path in paths:
        node, key_node, value_node = root, None, None
        for key in path:
            if not isinstance(node, yaml.MappingNode) or node.flow_style:
                return None
            pair = next(((k, v) for k, v in node.value
                         if constructor.construct_object(k, deep=True) == key), None)
            if pair is None:
                return None
            key_node, value_node = pair
            node = value_node
        start = key_node.start_mark.line
        if lines[start][: key_node.start_mark.column].strip():
            return None  # something else precedes the key on its line
        drop.update(range(start, _end_line(value_node)))
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def _end_line(node: yaml.Node) -> int:
    """One past the last line holding ``node``'s content (trailing comments are not content)."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _end_line(last[1] if isinstance(node, yaml.MappingNode) else last)
    return node.end_mark.line + (1 if node.end_mark.column > 0 else 0)
