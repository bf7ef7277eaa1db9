"""The package boundaries, read from the source: the clients and the engines never import the server,
``rapidserve.common`` (what both sides share) imports none of the server, clients or engines, and the
modules of a package import one another without a cycle."""

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


def imported_modules(source: str, module: str, is_package: bool, *, at_run_time: bool = False) -> set[str]:
    """Every module a source file imports: ``import a.b``, ``from a import b`` (as ``a`` and ``a.b``,
    since ``b`` may be a module), relative imports resolved against ``module``, and
    ``importlib.import_module("...")`` with a literal name. ``at_run_time`` leaves out the imports under
    ``if TYPE_CHECKING:``, which never run."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    skipped = {id(n) for block in _type_checking_blocks(tree) for n in ast.walk(block)} if at_run_time else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def _type_checking_blocks(tree: ast.AST) -> list[ast.stmt]:
    """The statements under ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:`` (not their ``else``)."""
    blocks: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            blocks += node.body
    return blocks


def _modules(package: str) -> dict[str, tuple[Path, str, bool]]:
    """The package's modules (subpackages included): name -> (file, source, whether it is a package)."""
    root = Path(importlib.import_module(package).__file__ or "").parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        is_package = relative.name == "__init__"
        parts = relative.parts[:-1] if is_package else relative.parts
        found[".".join((package, *parts))] = (path, path.read_text(encoding="utf-8"), is_package)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file: module`` for each forbidden import in the package's source files (subpackages included)."""
    root = Path(importlib.import_module(package).__file__ or "").parent
    found = []
    for module, (path, source, is_package) in _modules(package).items():
        for name in sorted(imported_modules(source, module, is_package)):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(root.parent)}: {name}")
    return found


def import_cycle(package: str) -> list[str]:
    """A cycle of imports among the package's modules, as ``[a, b, ..., a]``, or ``[]`` when there is none.
    An import inside a function counts: it runs whenever the function does, and a cycle through it is one
    move of that import to module level away from a half-initialized module."""
    modules = _modules(package)
    graph = {
        module: sorted(
            name
            for name in imported_modules(source, module, is_package, at_run_time=True)
            if name in modules and name != module
        )
        for module, (_, source, is_package) in modules.items()
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        for name in graph[module]:
            cycle = visit(name, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return []

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), [])


@pytest.mark.parametrize(
    "package", ["rapidserve.engines.prepare", "rapidserve.server", "rapidserve.clients", "rapidserve.common"]
)
def test_the_modules_of_a_package_import_one_another_without_a_cycle(package: str) -> None:
    cycle = import_cycle(package)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


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


def test_the_check_reports_an_import_cycle_through_a_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fakecycle").mkdir()
    (tmp_path / "fakecycle" / "__init__.py").write_text("")
    (tmp_path / "fakecycle" / "a.py").write_text("from fakecycle.b import helper\n")
    (tmp_path / "fakecycle" / "b.py").write_text("def helper():\n    from . import a\n")
    (tmp_path / "fakecycle" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fakecycle.d\n"
    )
    (tmp_path / "fakecycle" / "d.py").write_text("import fakecycle.c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycle("fakecycle") == ["fakecycle.a", "fakecycle.b", "fakecycle.a"]
    (tmp_path / "fakecycle" / "b.py").write_text("def helper():\n    pass\n")
    assert import_cycle("fakecycle") == []  # c -> d runs only under a type checker
