"""What a user sees when the server starts: a busy port is one line naming the port and the flag that
moves it, and a machine without GPUs logs nothing about GPU metrics when Prometheus scrapes."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model

from rapidserve.server.app import InferenceServer
from rapidserve.server.errors import RapidServeError
from rapidserve.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _settings(tmp_path: Path, **ports: int) -> ServerSettings:
    return ServerSettings(
        model_repositories=(tmp_path,), host="127.0.0.1", **{"grpc_port": 0, "metrics_port": 0, "http_port": 0, **ports}
    )


@pytest.mark.parametrize("which", ["grpc_port", "metrics_port", "http_port"])
async def test_a_busy_port_names_itself_and_the_flag_that_moves_it(tmp_path: Path, busy_port: int, which: str) -> None:
    server = InferenceServer(_settings(tmp_path, **{which: busy_port}))
    try:
        with pytest.raises(RapidServeError) as info:
            await server.start()
    finally:
        await server.stop(0)
    message = str(info.value)
    flag = "--" + which.replace("_", "-")
    assert str(busy_port) in message and flag in message and "0 picks a free one" in message, message
    assert "in use" in message and "\n" not in message


def test_the_cli_says_it_in_one_line_without_a_traceback(tmp_path: Path, busy_port: int) -> None:
    command = [sys.executable, "-m", "rapidserve", "serve", "--model-repository", str(tmp_path), "--host", "127.0.0.1"]
    done = subprocess.run(
        [*command, "--grpc-port", str(busy_port), "--metrics-port", "0"], capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if str(busy_port) in line]
    assert len(lines) == 1 and "--grpc-port" in lines[0], output


def _nvml_starts() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("library", ["missing", "without a driver"])
def test_scrapes_on_a_machine_without_gpus_log_nothing(
    library: str, tmp_path: Path, serve, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most one debug line at start, none per scrape, and never advice to install the gpu extra
    (which would put onnxruntime-gpu beside onnxruntime)."""
    if library == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    elif _nvml_starts():
        pytest.skip("this machine has an NVIDIA driver: NVML starts")
    write_model(tmp_path, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    with caplog.at_level(logging.DEBUG, logger="rapidserve.server.gpu_metrics"):
        server = serve(tmp_path)
        at_start = [r for r in caplog.records if r.name == "rapidserve.server.gpu_metrics"]
        for _ in range(3):
            with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
                assert b"rapidserve_process_cpu_seconds_total" in response.read()
    records = [r for r in caplog.records if r.name == "rapidserve.server.gpu_metrics"]
    assert records == at_start and len(records) <= 1  # nothing at scrape time
    assert all(r.levelno <= logging.DEBUG for r in records)
    assert not any("rapidserve[gpu]" in r.getMessage() or "pip install" in r.getMessage() for r in records)


async def test_stop_stops_grpc_once(tmp_path: Path) -> None:
    """Two overlapping stops of a grpc.aio server can crash gRPC's core (a segfault on about one exit in
    ten): the drain refuses new requests itself and stops gRPC once, after the accepted ones."""
    server = InferenceServer(_settings(tmp_path))
    await server.start()
    grpc_server = server._server
    calls: list[float | None] = []
    stop = grpc_server.stop

    async def counted(grace: float | None) -> None:
        calls.append(grace)
        await stop(grace)

    grpc_server.stop = counted
    await server.stop(0)
    assert calls == [0]
