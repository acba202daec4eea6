"""Conversion of a merged config tree into typed dataclasses, collecting every problem in one pass.

Accepted values per annotation:

* nested dataclass: a mapping of its field names (or an instance); unknown keys are errors with a
  nearest-name suggestion; missing keys take the field default.
* ``int``: int (not bool). ``float``: int, float, or a numeric string such as ``'1e-5'`` (YAML 1.1
  reads exponents without a dot as strings). ``bool``: true/false only. ``str``: strings only.
* ``Literal[...]``: one of the listed values (same type). ``Optional[X]``: null or X.
  ``Union[A, B]``: the first member that accepts the value unchanged, else the first that accepts
  it with a conversion.
* ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``: a YAML list. ``dict[K, V]``: a mapping.
* ``Any``: anything.

Construction runs each dataclass's ``__post_init__``; its ``ValueError`` (which names fields bare,
``clip_low must be ...``) becomes an issue with the section's full path (``loss.clip_low must be
...``; ``qualify``) and the recipe files that set the section.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Collection, Literal, Mapping, Optional, Union

from mrl.config.errors import Index, KeyPath, Source, format_path
from mrl.config.recipe import Resolved

_LEADING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"^\s*[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?\s*$")
_INVALID = object()
SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence)
MAPPING_ORIGINS = (dict, collections.abc.Mapping)


def type_name(tp: Any) -> str:
    """Readable name of an annotation, in YAML terms: ``int | null``, ``'a' | 'b'``, ``list[int]``."""
    if tp is Any or tp is object:
        return "any"
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join("null" if a is None else repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def qualify(message: str, path: KeyPath, field_names: Collection[str]) -> str:
    """A ``__post_init__`` error of the dataclass at ``path`` with its full path: a message that starts
    with one of its ``field_names`` gets the path before it (``clip_low must be ...`` at ``loss`` →
    ``loss.clip_low must be ...``; ``kind must ...`` at ``rollout.warmup_data`` →
    ``rollout.warmup_data.kind must ...``), any other message the path and a colon. Messages at the
    top level, or already starting with the path, are returned unchanged."""
    if not path:
        return message
    prefix = format_path(path)
    if message.startswith(prefix + ".") or message.startswith(prefix + "="):
        return message
    leading = _LEADING_NAME.match(message)
    if leading and leading.group() in field_names:
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def describe_value(value: Any) -> str:
    """``'fast' (str)``, ``null``, ``{'a': 1} (mapping)``, shortened when long."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (bool)"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_hints(cls: type) -> dict[str, Any]:
    """Evaluated field annotations of a dataclass (handles ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


class Converter:
    """Builds typed values from a ``Resolved`` tree; ``issues`` collects every problem found."""

    def __init__(self, resolved: Resolved, *, fallback: Optional[Source] = None,
                 strict: bool = False) -> None:
        self.resolved = resolved
        self.fallback = fallback
        self.strict = strict
        self.issues: list[str] = []

    # -- helpers -------------------------------------------------------------------------------

    def _source(self, path: KeyPath) -> Optional[Source]:
        return self.resolved.source_of(path) or self.fallback

    def _where(self, path: KeyPath) -> str:
        """A phrase for after a key: ' in configs/x.yaml', " on the command line ('a.b=1')", or ''."""
        source = self._source(path)
        return f" {source.location()}" if source and source.location() else ""

    def _set_where(self, path: KeyPath) -> str:
        """Like ``_where``, for after a value: ', set in configs/x.yaml'."""
        source = self._source(path)
        if source is None or not source.location():
            return ""
        return f" {source.location()}" if source.override is not None else f", set in {source.file}"

    def _type_error(self, path: KeyPath, tp: Any, value: Any, hint: str = "") -> object:
        self.issues.append(f"{format_path(path)}: expected {type_name(tp)}, got "
                           f"{describe_value(value)}{self._set_where(path)}{hint}")
        return _INVALID

    # -- dispatch ------------------------------------------------------------------------------

    def convert(self, tp: Any, value: Any, path: KeyPath) -> Any:
        """``value`` converted to annotation ``tp``, or ``_INVALID`` after recording an issue."""
        if tp is Any or tp is object:
            return value
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            return self._union(tp, args, value, path)
        if origin is Literal:
            return self._literal(args, value, path)
        if is_dataclass_type(tp):
            return self._dataclass(tp, value, path)
        if tp in (list, tuple) or origin in SEQUENCE_ORIGINS:
            return self._sequence(tp, origin or tp, args, value, path)
        if tp is dict or origin in MAPPING_ORIGINS:
            return self._mapping(tp, args, value, path)
        return self._scalar(tp, value, path)

    def _scalar(self, tp: Any, value: Any, path: KeyPath) -> Any:
        if tp is type(None):
            return None if value is None else self._type_error(path, tp, value)
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and not self.strict and _NUMBER.match(value):
                return float(value.replace("_", ""))
            return self._type_error(path, tp, value)
        if tp is int and isinstance(value, bool):
            return self._type_error(path, tp, value)
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        return self._type_error(path, tp, value)

    def _literal(self, allowed: tuple, value: Any, path: KeyPath) -> Any:
        for choice in allowed:
            if type(choice) is type(value) and choice == value:
                return choice
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join("null" if a is None else repr(a) for a in allowed)
        self.issues.append(f"{format_path(path)}: expected one of {choices}, got "
                           f"{describe_value(value)}{self._set_where(path)}{hint}")
        return _INVALID

    def _union(self, tp: Any, members: tuple, value: Any, path: KeyPath) -> Any:
        if value is None and type(None) in members:
            return None
        candidates = [m for m in members if m is not type(None)]
        shaped = [m for m in candidates if _accepts_shape(m, value)]
        if len(shaped) > 1 and isinstance(value, Mapping):
            shaped = _selected_by_kind(shaped, value)
        if len(shaped) == 1 and isinstance(value, (Mapping, list, tuple)):
            return self.convert(shaped[0], value, path)  # detailed errors from the one candidate
        for strict in (True, False):
            for member in candidates:
                trial = Converter(self.resolved, fallback=self.fallback, strict=strict or self.strict)
                result = trial.convert(member, value, path)
                if not trial.issues:
                    return result
        if all(m is type(None) or typing.get_origin(m) is Literal for m in members):
            choices = tuple(a for m in members for a in (typing.get_args(m) or (None,)))
            return self._literal(choices, value, path)
        return self._type_error(path, tp, value)

    def _sequence(self, tp: Any, kind: type, args: tuple, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, (list, tuple)):
            return self._type_error(path, tp, value)
        if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                self.issues.append(
                    f"{format_path(path)}: expected {type_name(tp)} ({len(args)} items), got "
                    f"{len(value)} item{'s' * (len(value) != 1)}: {describe_value(value)}"
                    f"{self._set_where(path)}"
                )
                return _INVALID
            item_types = args
        else:
            item_types = (args[0] if args else Any,) * len(value)
        items = [self.convert(item_type, item, (*path, Index(i)))
                 for i, (item_type, item) in enumerate(zip(item_types, value))]
        if any(item is _INVALID for item in items):
            return _INVALID
        return tuple(items) if kind is tuple else items

    def _mapping(self, tp: Any, args: tuple, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, Mapping):
            return self._type_error(path, tp, value)
        key_type, value_type = args if args else (Any, Any)
        result, valid = {}, True
        for key, item in value.items():
            new_key = self.convert(key_type, key, (*path, key))
            new_item = self.convert(value_type, item, (*path, key))
            valid = valid and new_key is not _INVALID and new_item is not _INVALID
            result[new_key] = new_item
        return result if valid else _INVALID

    def _dataclass(self, cls: type, value: Any, path: KeyPath) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            return self._type_error(path, cls, value, hint=f" (a mapping of {cls.__name__} fields)")
        hints = type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        before = len(self.issues)
        kwargs = {}
        for key, item in value.items():
            if key not in fields:
                self._unknown_key(path, key, list(fields))
                continue
            converted = self.convert(hints[key], item, (*path, key))
            if converted is not _INVALID:
                kwargs[key] = converted
        for name, f in fields.items():
            if name not in value and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                self.issues.append(f"missing required key '{format_path((*path, name))}'"
                                   f"{self._where(path)}")
        if len(self.issues) > before:
            return _INVALID
        try:
            return cls(**kwargs)
        except ValueError as exc:
            self.issues.append(f"{qualify(str(exc), path, fields)}{self._sections_note(path)}")
            return _INVALID

    def _unknown_key(self, path: KeyPath, key: Any, valid: list[str]) -> None:
        full = format_path((*path, key))
        if not isinstance(key, str):
            note = " (YAML 1.1 reads yes/no/on/off as booleans; quote the key)" \
                if isinstance(key, bool) else ""
            self.issues.append(f"key {key!r} ({type(key).__name__}) under '{format_path(path)}' "
                               f"is not a field name{self._where((*path, key))}{note}")
            return
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean '{format_path((*path, close[0]))}'?"
        else:
            hint = f"; valid keys{' under ' + repr(format_path(path)) if path else ''}: {', '.join(valid)}"
        self.issues.append(f"unknown key '{full}'{self._where((*path, key))}{hint}")

    def _sections_note(self, path: KeyPath) -> str:
        sources = self.resolved.sources_under(path) or ([self.fallback] if self.fallback else [])
        sources = [s for s in sources if s.file or s.override is not None]
        return f" (from {', '.join(s.name() for s in sources)})" if sources else ""


def _selected_by_kind(members: list, value: Mapping) -> list:
    """The dataclass members whose ``kind`` field (a ``Literal``) admits ``value['kind']``, when that
    singles one out (a union of configs told apart by their ``kind``, like ``loss``); else ``members``."""
    if "kind" not in value or not all(is_dataclass_type(m) for m in members):
        return members
    kinds = [type_hints(m).get("kind") for m in members]
    chosen = [m for m, kind in zip(members, kinds)
              if typing.get_origin(kind) is Literal and value["kind"] in typing.get_args(kind)]
    return chosen if len(chosen) == 1 else members


def _accepts_shape(tp: Any, value: Any) -> bool:
    """Whether ``tp`` takes values of ``value``'s container kind (mapping, list, or scalar)."""
    origin = typing.get_origin(tp) or tp
    if isinstance(value, Mapping):
        return is_dataclass_type(tp) or origin in MAPPING_ORIGINS or tp is Any
    if isinstance(value, (list, tuple)):
        return origin in SEQUENCE_ORIGINS or tp is Any
    return not (is_dataclass_type(tp) or origin in MAPPING_ORIGINS or origin in SEQUENCE_ORIGINS)


def build(schema: type, resolved: Resolved, *, fallback: Optional[Source] = None) -> tuple[Any, list[str]]:
    """``(instance or None, issues)`` for a dataclass ``schema`` built from ``resolved.data``.

    ``fallback`` is the source named for problems with no key of their own (e.g. the recipe).
    """
    converter = Converter(resolved, fallback=fallback)
    result = converter.convert(schema, resolved.data, ())
    return (None if result is _INVALID else result), converter.issues
