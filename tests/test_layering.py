"""The layers import downwards only: the data, text and evaluation layers never import the phantom
generator (which is built on them), so real data needs nothing of the phantom world."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unimed"


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` statement of `path` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ["data", "text", "eval"])
def test_layer_does_not_import_the_phantom(layer: str) -> None:
    offenders = {
        path.relative_to(SRC).as_posix(): sorted(m for m in imported_modules(path)
                                                 if m.startswith("unimed.phantom"))
        for path in sorted((SRC / layer).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert offenders, f"no modules found under {SRC / layer}"
