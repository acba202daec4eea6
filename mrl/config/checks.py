"""Field checks shared by the config dataclasses' ``__post_init__`` validation."""

from __future__ import annotations

from typing import Any


def is_positive_int(value: Any) -> bool:
    """True for an ``int`` (not a ``bool``) that is at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive_ints(config: Any, section: str, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``section.name`` for the first field that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"{_path(section, name)} must be a positive integer, got {value!r}")


def require_optional_positive_ints(config: Any, section: str, names: tuple[str, ...]) -> None:
    """Like ``require_positive_ints``, with None (null) allowed."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not is_positive_int(value):
            raise ValueError(f"{_path(section, name)} must be a positive integer or null, got {value!r}")


def _path(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name
