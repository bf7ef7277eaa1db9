"""A real ``redis-server`` on a free loopback port, for the shared-cache tests (skipped without one)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["REDIS_SERVER", "RedisServer", "needs_redis"]

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="no redis-server binary (Debian's redis-server package; .ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``start()`` returns once it answers PING; ``stop()`` kills it (a Redis that goes away mid-run).
    With ``tls`` (a ``certs.Pki``) it speaks only TLS, with its server certificate; with ``password``
    every client must authenticate."""

    def __init__(self, directory: Path, port: int | None = None, tls: Any = None, password: str | None = None) -> None:
        self.directory = directory
        self.port = port or _free_port()
        self.tls = tls
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL a client uses: rediss:// trusting the test CA with TLS, the password in it."""
        credentials = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{credentials}127.0.0.1:{self.port}/0"
        return f"rediss://{credentials}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    def _listening(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no"]  # fmt: skip

    def start(self, timeout_s: float = 20) -> RedisServer:
        assert REDIS_SERVER is not None
        with (self.directory / f"redis-{self.port}.log").open("wb") as log:  # (the child keeps its own copy)
            self._process = subprocess.Popen(
                [REDIS_SERVER, *self._listening(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), *(["--requirepass", self.password] if self.password else [])],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / f'redis-{self.port}.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        hello = (f"AUTH {self.password}\r\n" if self.password else "").encode() + b"PING\r\n"
        want = (b"+OK\r\n" if self.password else b"") + b"+PONG\r\n"
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), timeout=1))
                if self.tls is not None:  # (the TLS socket takes the connection over: it is the one to close)
                    context = ssl.create_default_context(cafile=str(self.tls.ca))
                    sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
                sock.sendall(hello)
                got = b""
                while len(got) < len(want) and (chunk := sock.recv(64)):
                    got += chunk
                return got == want
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
