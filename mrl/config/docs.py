"""Field documentation read from the attribute docstrings in the dataclass source.

An attribute docstring is the string literal right under a field::

    lr: float = 1e-5
    \"\"\"Peak learning rate.\"\"\"

``field_docs`` walks a schema (nested dataclasses, also inside Optional/list/dict annotations; list
items appear as ``key[]``, dict values as ``key.<name>``) and ``render_reference`` turns it into
Markdown tables, one per section.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, NamedTuple, Optional

from mrl.config.convert import MAPPING_ORIGINS, SEQUENCE_ORIGINS, is_dataclass_type, type_hints, type_name
from mrl.config.loader import to_dict
from mrl.config.yaml_io import format_scalar


class FieldDoc(NamedTuple):
    """One documented config field."""

    path: str
    """Dotted path, e.g. ``model.hidden_size``."""
    type: str
    """The annotation in YAML terms, e.g. ``int | null``."""
    default: Any
    """The default value (a factory's result), or ``dataclasses.MISSING`` when required."""
    doc: str
    """The attribute docstring, whitespace-collapsed; empty when missing."""


class Section(NamedTuple):
    """A dataclass in the schema tree and the dotted path it sits at ('' for the root)."""

    path: str
    cls: type


def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for ``cls`` and its bases (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        node = _class_node(klass)
        if node is None:
            continue
        body = node.body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def class_docstring(cls: type) -> str:
    """The class's own docstring (not the signature dataclasses put there), first paragraph."""
    node = _class_node(cls)
    doc = ast.get_docstring(node) if node is not None else None
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def _class_node(cls: type) -> Optional[ast.ClassDef]:
    if cls is object or not dataclasses.is_dataclass(cls):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)


def sections(schema: type) -> list[Section]:
    """Every dataclass of the schema tree, depth first, the root first."""
    found = [Section("", schema)]
    for child_path, child in _children(schema, "", (schema,)):
        found.append(Section(child_path, child))
    return found


def _children(cls: type, prefix: str, stack: tuple[type, ...]):
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        for suffix, nested in _nested_dataclasses(hints[f.name]):
            if nested in stack:
                continue  # a recursive schema: document each class once per branch
            path = f"{prefix}{f.name}{suffix}"
            yield path, nested
            yield from _children(nested, f"{path}.", (*stack, nested))


def _nested_dataclasses(tp: Any, suffix: str = ""):
    """``(path suffix, dataclass)`` for each dataclass reachable inside annotation ``tp``."""
    if is_dataclass_type(tp):
        yield suffix, tp
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in SEQUENCE_ORIGINS:
        for arg in args:
            if arg is not Ellipsis:
                yield from _nested_dataclasses(arg, f"{suffix}[]")
    elif origin in MAPPING_ORIGINS:
        if len(args) == 2:
            yield from _nested_dataclasses(args[1], f"{suffix}.<name>")
    elif args:  # Union / Optional
        for arg in args:
            yield from _nested_dataclasses(arg, suffix)


def field_docs(schema: type) -> list[FieldDoc]:
    """All fields of ``schema`` and its nested sections, in declaration order, sections included."""
    result = []
    for section in sections(schema):
        prefix = f"{section.path}." if section.path else ""
        docs = attribute_docstrings(section.cls)
        hints = type_hints(section.cls)
        for f in dataclasses.fields(section.cls):
            if f.init:
                result.append(FieldDoc(prefix + f.name, type_name(hints[f.name]), _default(f),
                                       docs.get(f.name, "")))
    return result


def undocumented_fields(schema: type) -> list[str]:
    """Dotted paths of the fields of ``schema`` (any depth) that have no attribute docstring."""
    return [doc.path for doc in field_docs(schema) if not doc.doc]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as it would be written in YAML; ``required`` for fields without one."""
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}()"
    return format_scalar(to_dict(value))


def _section_rows(section: Section) -> list[FieldDoc]:
    """The plain (non-section) fields of one section's own class."""
    prefix = f"{section.path}." if section.path else ""
    docs = attribute_docstrings(section.cls)
    hints = type_hints(section.cls)
    return [
        FieldDoc(prefix + f.name, type_name(hints[f.name]), _default(f), docs.get(f.name, ""))
        for f in dataclasses.fields(section.cls)
        if f.init and next(_nested_dataclasses(hints[f.name]), None) is None
    ]


def render_reference(schema: type, *, heading_level: int = 3) -> str:
    """Markdown: per section a heading, the class docstring, and a table of its plain fields.

    A field typed as a union of dataclasses (e.g. ``loss``) gets one section per class.
    """
    hashes = "#" * heading_level
    blocks = []
    for section in sections(schema):
        title = (f"{hashes} `{section.path}` ({section.cls.__name__})" if section.path
                 else f"{hashes} {section.cls.__name__} (top level)")
        rows = _section_rows(section)
        if not section.path and not rows:
            continue
        lines = [title, ""]
        description = class_docstring(section.cls)
        if description:
            lines += [description, ""]
        if rows:
            lines += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
            lines += [f"| `{d.path}` | `{_cell(d.type)}` | `{_cell(format_default(d.default))}` | "
                      f"{_cell(d.doc)} |" for d in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
