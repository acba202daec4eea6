"""Package layering: config ← ops ← losses ← train ← rl. A package imports only the layers below it
(and packages outside this chain); ``mrl.config`` imports no other mrl package at all. Checked on
the source (every import statement, also those inside functions), so no module needs to load."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

MRL = Path(__file__).resolve().parent.parent / "mrl"

LAYERS = ("config", "ops", "losses", "train", "rl")
"""Lowest first: each may import the ones before it, never the ones after it."""


def mrl_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every ``mrl.*`` import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(MRL.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found += [(node.lineno, f"{module}.{alias.name}" if module == "mrl" else module) for alias in node.names]
    return [(line, name) for line, name in found if name == "mrl" or name.startswith("mrl.")]


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(layer: str) -> list[str]:
    allowed_above = set(LAYERS[LAYERS.index(layer) + 1:])
    bad = []
    for path in sorted((MRL / layer).rglob("*.py")):
        for line, module in mrl_imports(path):
            target = subpackage(module)
            if target == layer:
                continue
            if layer == "config" or target in allowed_above:
                bad.append(f"{path.relative_to(MRL.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_never_imports_a_higher_one(layer):
    assert violations(layer) == []


def test_config_is_a_leaf_and_train_does_not_import_rl():
    """The two rules by name (the parametrised test above covers them as part of the order)."""
    assert not [m for p in (MRL / "config").rglob("*.py") for _, m in mrl_imports(p) if subpackage(m) != "config"]
    assert not [m for p in (MRL / "train").rglob("*.py") for _, m in mrl_imports(p) if subpackage(m) == "rl"]


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "mrl"
    (fake / "train").mkdir(parents=True)
    (fake / "train" / "bad.py").write_text(
        "import os\n\ndef f():\n    from mrl.rl.grpo import GRPOTrainer\n    from ..rl import offline\n")
    monkeypatch.setattr(sys.modules[__name__], "MRL", fake)
    assert violations("train") == ["mrl/train/bad.py:4 imports mrl.rl.grpo", "mrl/train/bad.py:5 imports mrl.rl"]
