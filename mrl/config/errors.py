"""The one exception type of the config system, and where a config value came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class ConfigError(ValueError):
    """An invalid recipe, override or config value. ``issues`` holds one line per problem."""

    def __init__(self, issues: str | Sequence[str], *, recipe: Optional[str] = None) -> None:
        self.issues = [issues] if isinstance(issues, str) else list(issues)
        self.recipe = recipe
        if len(self.issues) == 1:
            message = self.issues[0]
        else:
            where = f" in {recipe}" if recipe else ""
            lines = "\n".join(f"  - {issue}" for issue in self.issues)
            message = f"{len(self.issues)} config errors{where}:\n{lines}"
        super().__init__(message)


@dataclass(frozen=True)
class Source:
    """Where a key was set: a recipe file (its display path) or a command-line override."""

    file: Optional[str] = None
    override: Optional[str] = None

    def location(self) -> str:
        """A phrase to put after a key, e.g. "in configs/x.yaml"; empty for an in-memory mapping."""
        if self.override is not None:
            return f"on the command line ({self.override!r})"
        return f"in {self.file}" if self.file else ""

    def name(self) -> str:
        """A short name for lists of sources: "configs/x.yaml" or "override 'a.b=1'"."""
        if self.override is not None:
            return f"override {self.override!r}"
        return self.file or "the given mapping"


class Index(int):
    """A list position inside a ``KeyPath`` (a plain int there is a mapping key)."""


KeyPath = tuple  # a key path inside a config tree: mapping keys and ``Index`` list positions


def format_path(path: KeyPath) -> str:
    """``('optim', 'betas', Index(0))`` → ``optim.betas[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, Index) else (f".{part}" if text else str(part))
    return text or "<top level>"
