"""``rapidserve bench`` refuses, before any load point, what would fail after it: ``--plot`` without
matplotlib, and an hpack whose decoder lacks the table the bench's HTTP/2 client reads."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import hpack
import pytest

from rapidserve.cli import main

UNREACHABLE = "127.0.0.1:1"  # nothing listens: an error about the connection would mean the check came too late


def _extra_listing(package: str) -> str:
    """The extra of pyproject.toml whose requirements name ``package``."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    listing = [name for name, requirements in extras.items() if any(r.startswith(package) for r in requirements)]
    assert listing, f"no extra lists {package}"
    return listing[0]


def test_plot_without_matplotlib_fails_before_the_run_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    plot = tmp_path / "plot.png"
    assert main(["bench", "m", "--url", UNREACHABLE, "--plot", str(plot)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "--plot needs matplotlib" in err
    assert f'pip install "rapidserve[{_extra_listing("matplotlib")}]"' in err
    assert not plot.exists()


class _DecoderWithoutTable:
    """An hpack decoder as a release without ``header_table.dynamic_entries`` would make it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.header_table = SimpleNamespace(maxsize=4096)


def test_an_hpack_without_its_internal_table_fails_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    monkeypatch.setattr(hpack, "Decoder", _DecoderWithoutTable)
    assert main(["bench", "m", "--url", UNREACHABLE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    version = importlib.metadata.version("hpack")
    assert f"hpack {version} lacks the internal table rapidserve's bench client relies on; install hpack>=4,<5" in err


def test_without_the_checks_failing_the_error_is_the_connection(capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the two tests above: with matplotlib and hpack as installed, the same command
    gets as far as the server, and says it cannot reach it."""
    pytest.importorskip("matplotlib", reason="the control needs matplotlib installed")
    assert main(["bench", "m", "--url", UNREACHABLE, "--plot", "unused.png"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" not in err and "hpack" not in err and err.startswith("error:")


def test_http_needs_no_hpack_and_reaches_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over HTTP/1.1 the bench uses no HTTP/2 client: an hpack it could not use does not stop it."""
    monkeypatch.setattr(hpack, "Decoder", _DecoderWithoutTable)
    assert main(["bench", "m", "--protocol", "http", "--url", UNREACHABLE]) == 2
    err = capsys.readouterr().err.strip()
    assert "hpack" not in err and "cannot reach 127.0.0.1:1" in err and err.count("\n") == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--protocol", "grpc", "--url", "http://127.0.0.1:1"], "--protocol grpc with the URL http://127.0.0.1:1"),
        (["--protocol", "http", "--url", UNREACHABLE, "--streaming"], "--streaming is a gRPC feature"),
        (["--url", "http://127.0.0.1:1", "--streaming"], "--streaming is a gRPC feature"),
        (["--url", "http://127.0.0.1:1", "--ssl"], "use an https:// URL"),
    ],
)
def test_protocol_options_that_do_not_go_together(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "m", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
