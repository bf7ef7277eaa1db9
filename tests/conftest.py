"""Shared fixtures: small models the tests build themselves, and a real server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import Pki, make_pki
from testmodels import build_repository

from rapidserve.server.frontend.engine import make_server
from rapidserve.server.settings import ServerSettings


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``frontends(1, 2)`` (a module's ``pytestmark``) run once per front-end count: their
    servers (``serve``, ``shared_server``) are started with ``frontends=N``."""
    marker = metafunc.definition.get_closest_marker("frontends")
    if marker is not None and "frontends" in metafunc.fixturenames:
        metafunc.parametrize("frontends", marker.args, scope="module", ids=[f"frontends={n}" for n in marker.args])


@pytest.fixture(scope="module")
def frontends() -> int:
    """The front-end processes of the servers a test starts (1: everything in one process)."""
    return 1


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, made for this run."""
    return make_pki(tmp_path_factory.mktemp("pki"), "a")


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


class ServerThread:
    """A real rapidserve gRPC server on a free port, its event loop in a background thread, so tests
    can use blocking clients (ours and tritonclient) against it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.server = make_server(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """``127.0.0.1:PORT`` of the HTTP/REST port, as tritonclient.http takes it (no scheme)."""
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self.run(self.server.start())
        return self

    def reload_certificates(self) -> None:
        """As SIGHUP does; returns once new connections get the certificates now in the files."""
        done = self.server.reload_certificates()
        if done is not None:  # the front-end processes reload in their own time
            done.result(30)

    def stop(self, grace_s: float = 5) -> None:
        self.run(self.server.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def serve(frontends: int) -> Iterator[Callable[..., ServerThread]]:
    """Start servers with ``serve(repo, **settings)``; all are stopped at the end of the test."""
    started: list[ServerThread] = []

    def start(*repos: Path, **settings: Any) -> ServerThread:
        settings.setdefault("frontends", frontends)
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("grpc_port", 0)
        settings.setdefault("metrics_port", 0)
        settings.setdefault("http_port", 0)
        thread = ServerThread(ServerSettings(model_repositories=tuple(repos), **settings)).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        with contextlib.suppress(Exception):
            thread.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, frontends: int) -> Iterator[ServerThread]:
    """One server over the standard repository, shared by a test module."""
    repo = build_repository(tmp_path_factory.mktemp("shared-repo"))
    settings = ServerSettings(
        model_repositories=(repo,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0, frontends=frontends
    )
    thread = ServerThread(settings).start()
    yield thread
    thread.stop()
