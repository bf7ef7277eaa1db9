"""The package boundaries, read from the source: the clients and the engines never import the server,
and ``rapidserve.common`` (what both sides share) imports none of the server, clients or engines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

# package -> packages it must never import (a name equal to one of them, or below it)
FORBIDDEN = {
    "rapidserve.clients": ("rapidserve.server",),
    "rapidserve.engines": ("rapidserve.server",),
    "rapidserve.common": ("rapidserve.server", "rapidserve.clients", "rapidserve.engines"),
}


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module a source file imports: ``import a.b``, ``from a import b`` (as ``a`` and ``a.b``,
    since ``b`` may be a module), relative imports resolved against ``module``, and
    ``importlib.import_module("...")`` with a literal name."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file: module`` for each forbidden import in the package's source files (subpackages included)."""
    root = Path(importlib.import_module(package).__file__ or "").parent
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        is_package = relative.name == "__init__"
        parts = relative.parts[:-1] if is_package else relative.parts
        module = ".".join((package, *parts))
        for name in sorted(imported_modules(path.read_text(encoding="utf-8"), module, is_package)):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(root.parent)}: {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_package_imports_nothing_across_its_boundary(package: str) -> None:
    assert violations(package, FORBIDDEN[package]) == []


def test_each_package_has_source_files_to_check() -> None:
    for package in FORBIDDEN:
        root = Path(importlib.import_module(package).__file__ or "").parent
        assert list(root.rglob("*.py")), package


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("import rapidserve.server.codec", "rapidserve.clients.x", "rapidserve.server.codec"),
        ("from rapidserve import server", "rapidserve.clients.x", "rapidserve.server"),
        ("from rapidserve.server.codec import heavy", "rapidserve.clients.x", "rapidserve.server.codec"),
        ("def f():\n    from rapidserve.server import app", "rapidserve.engines.x", "rapidserve.server.app"),
        ("from ..server import codec", "rapidserve.clients.x", "rapidserve.server"),
        (
            "import importlib\nimportlib.import_module('rapidserve.server.app')",
            "rapidserve.engines.x",
            "rapidserve.server.app",
        ),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, module: str, expected: str) -> None:
    assert expected in imported_modules(source, module, is_package=False)


def test_the_check_reports_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fakeclients").mkdir()
    (tmp_path / "fakeclients" / "__init__.py").write_text("")
    (tmp_path / "fakeclients" / "leak.py").write_text("from rapidserve.server.types import InferRequest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fakeclients/leak.py: rapidserve.server.types" in violations("fakeclients", ("rapidserve.server",))
