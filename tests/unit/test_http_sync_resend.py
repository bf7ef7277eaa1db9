"""The sync HTTP client sends a request again only when that cannot run it twice: against a raw socket
server that answers, hangs up after answering, or reads a request and hangs up without answering, in the
order a test scripts, and counts every request it read."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from rapidserve.clients._http import SyncTransport
from rapidserve.clients._rest import Endpoint
from rapidserve.clients.types import InferenceServerError

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ScriptedServer:
    """Reads whole requests (head and Content-Length body); the n-th one gets ``script[n]``: "answer",
    "answer-close" (answer, then close the idle connection) or "drop" (close without answering)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.closed = threading.Semaphore(0)  # released each time the server closes a connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                self._connection(conn)
            self.closed.release()

    def _connection(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += conn.recv(65536)
            self.requests.append(head.split(b"\r\n")[0])
            action = self.script[len(self.requests) - 1] if len(self.requests) <= len(self.script) else "answer"
            if action == "drop":
                return
            conn.sendall(ANSWER)
            if action == "answer-close":
                return
            buffer = buffer[length:]

    def close(self) -> None:
        self._listener.close()


Scripted = Callable[[list[str]], ScriptedServer]


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    made: list[ScriptedServer] = []

    def make(script: list[str]) -> ScriptedServer:
        made.append(ScriptedServer(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


def transport(server: ScriptedServer) -> SyncTransport:
    return SyncTransport(Endpoint("127.0.0.1", server.port, False), None, (), 1 << 20)


def test_a_post_whose_answer_never_came_is_unavailable_not_sent_again(scripted: Scripted) -> None:
    server = scripted(["answer", "drop"])
    client = transport(server)
    assert client.request("POST", "/v2/models/m/infer", b"{}").body == b"ok"
    with pytest.raises(InferenceServerError) as error:
        client.request("POST", "/v2/models/m/infer", b"{}")  # on the kept connection, which the server drops
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "not sent again" in error.value.message
    assert server.closed.acquire(timeout=10)
    assert len(server.requests) == 2  # read once, never a second time
    assert client.request("POST", "/v2/models/m/infer", b"{}").body == b"ok"  # a fresh connection works
    client.close()


def test_a_get_whose_answer_never_came_is_sent_again(scripted: Scripted) -> None:
    server = scripted(["answer", "drop"])
    client = transport(server)
    assert client.request("GET", "/v2/health/live").status == 200
    assert client.request("GET", "/v2/health/live").body == b"ok"  # dropped, then answered on a fresh one
    assert server.requests == [b"GET /v2/health/live HTTP/1.1"] * 3
    client.close()


def test_a_post_on_a_connection_closed_while_idle_goes_out_on_a_fresh_one(scripted: Scripted) -> None:
    server = scripted(["answer-close"])
    client = transport(server)
    assert client.request("POST", "/v2/models/m/infer", b"{}").body == b"ok"
    assert server.closed.acquire(timeout=10)  # the idle connection kept for reuse is closed by the server
    assert client.request("POST", "/v2/models/m/infer", b"{}").body == b"ok"
    assert len(server.requests) == 2  # the closed connection was not written to
    client.close()
