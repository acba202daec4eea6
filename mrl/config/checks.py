"""Field checks shared by the config dataclasses' ``__post_init__`` validation.

A ``__post_init__`` names its fields bare (``seq_length must be ...``): one dataclass can sit at
several places of a recipe (``data`` and ``rollout.warmup_data`` are both a ``DataConfig``), and the
converter that builds it from the recipe prefixes the full path (``mrl.config.convert.qualify``).
"""

from __future__ import annotations

from typing import Any


def is_positive_int(value: Any) -> bool:
    """True for an ``int`` (not a ``bool``) that is at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first field of ``names`` that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_optional_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """Like ``require_positive_ints``, with None (null) allowed."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
