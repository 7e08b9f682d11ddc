"""The package's shape: data flows one way through its modules, and functions stay short.

``ORDER`` is the truth about the stages (docs/ARCHITECTURE.md draws it): a module may import only
modules to its left, lazily inside a function or not. A module missing from ``ORDER`` fails, so
a new module has to take its place in the list.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "cxr_pneumonia"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
# fmt: off
ORDER = (
    "config", "cores", "header", "io", "preprocess", "augment", "batch", "preview", "data", "backbones",
    "model", "features", "gate", "rundir", "distill",
    "evaluate", "report", "train", "export", "runtime", "predict", "archive", "evaluation", "calibration",
    "explain",
    "serve", "api", "cli",
)
# fmt: on
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SRC.glob("*.py")) if path.stem != "__init__"}


def _imported_modules(tree: ast.Module, known: set[str]) -> Iterator[tuple[str, int]]:
    """(package module, line) for every import of a module of this package, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    yield parts[1], node.lineno
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and (not parts or parts[0] != PACKAGE):
                continue
            inner = parts[1:] if node.level == 0 else parts
            if inner:
                yield inner[0], node.lineno
            else:  # ``from cxr_pneumonia import x``: x is a module, or a package attribute (__version__)
                for alias in node.names:
                    if alias.name in known or alias.name in ORDER:
                        yield alias.name, node.lineno


def test_every_module_has_its_place_in_the_order():
    unknown = sorted(set(_modules()) - set(ORDER))
    assert not unknown, f"modules missing from ORDER in {__file__}: {unknown}"


def test_no_module_imports_a_later_stage():
    modules = _modules()
    rank = {name: i for i, name in enumerate(ORDER)}
    violations = []
    for name, path in modules.items():
        if name not in rank:
            continue  # reported by the test above
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imported, line in _imported_modules(tree, set(modules)):
            if imported not in rank:
                violations.append(f"{name}.py:{line} imports {imported}, which is not in ORDER")
            elif rank[imported] > rank[name]:
                violations.append(f"{name}.py:{line} imports {imported}, a later stage")
    assert not violations, "\n".join(violations)


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.py:{node.lineno} {node.name}() has {length} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import cxr_pneumonia.predict", ["predict"]),
        ("from cxr_pneumonia.predict import Run", ["predict"]),
        ("from cxr_pneumonia import predict, __version__", ["predict"]),
        ("def f():\n    from cxr_pneumonia.export import load\n", ["export"]),
        ("from . import serve\nfrom .api import x", ["serve", "api"]),
        ("import numpy\nfrom numpy import predict", []),
    ],
)
def test_imports_are_found_at_any_depth(source, expected):
    found = [name for name, _ in _imported_modules(ast.parse(source), set(ORDER))]
    assert sorted(found) == sorted(expected)
