"""The README's "Try it" section works as written: its Python snippets and its infer commands, each in a
fresh interpreter, against a server on the demo repository (only the address differs)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rapidserve.server.demo import build_demo_repository

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "localhost:8001"


def try_it_section() -> str:
    text = README.read_text()
    start = text.index("## Try it")
    return text[start : text.index("\n## ", start + 1)]


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", try_it_section(), re.S)


def shell_commands() -> list[list[str]]:
    """The indented command lines that run against the local demo server or make its input files."""
    lines = [line.strip() for line in try_it_section().splitlines() if line.startswith("    ")]
    wanted = [line for line in lines if line.startswith("python -c") or f"--url {README_URL} " in line]
    return [shlex.split(line, comments=True) for line in wanted]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("demo")
    build_demo_repository(repo)
    return repo


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_readme_has_what_this_test_runs() -> None:
    assert len(python_snippets()) >= 2
    commands = shell_commands()
    assert any(c[0] == "python" for c in commands) and sum(c[0] == "rapidserve" for c in commands) >= 2


def test_every_python_snippet_runs_as_written(demo_repo: Path, serve, tmp_path: Path) -> None:
    server = serve(demo_repo)
    for snippet in python_snippets():
        result = run([sys.executable, "-c", snippet.replace(README_URL, server.url)], tmp_path)
        assert result.returncode == 0, f"{snippet}\n{result.stderr}"
        assert re.search(r"\[\d\]", result.stdout), result.stdout  # a label was printed


def test_the_infer_commands_run_as_written_and_read_the_digits_they_made(demo_repo: Path, serve, tmp_path) -> None:
    server = serve(demo_repo)
    outputs = []
    for argv in shell_commands():
        argv = [a.replace(README_URL, server.url) for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "rapidserve":
            argv[:1] = [sys.executable, "-m", "rapidserve"]
        result = run(argv, tmp_path)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr}"
        outputs.append(result.stdout)
    from sklearn.datasets import load_digits

    expected = load_digits().target[:4].tolist()  # the real digits the README's x.npy holds
    assert (tmp_path / "x.npy").is_file()
    assert f"label int64 [4]\n{expected}".replace(",", "") in outputs[-1]
