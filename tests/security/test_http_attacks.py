"""Attacks on the HTTP/REST port, each against a real server: bodies over the limit (declared or
chunked), slow bodies, many bodies at once, restricted APIs, gzip bombs, oversized headers, idle and
surplus connections, TLS, and requests during a drain."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from certs import Pki, make_pki
from remote import RemoteServer
from standard_services import health_check
from testmodels import ADD_SUB_CONFIG, ONNX_TYPES, add_sub_graph, scale_graph, tile_graph, write_model

from rapidserve import protos
from rapidserve.server.settings import TlsSettings

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]

MiB = 2**20
INFER = "/v2/models/int64_triple/infer"
# requests wait in the queue until 8 have come or 1.5 s have passed: admitted, not yet answered
HELD_CONFIG = (
    ADD_SUB_CONFIG
    + """
dynamic_batching { max_queue_delay_microseconds: 1500000 preferred_batch_size: [ 8 ] }
parameters { key: "batching_mode" value: { string_value: "fixed" } }
"""
)

TILE_CONFIG = """
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("http-attacks")
    write_model(repo, "int64_triple", scale_graph("int64_triple", ONNX_TYPES["INT64"], 3))
    return repo


@pytest.fixture(scope="module")
def held_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    held = tmp_path_factory.mktemp("held")
    write_model(held, "add_sub", add_sub_graph(), HELD_CONFIG)
    return held


def infer_body(rows: int = 1) -> bytes:
    data = list(range(rows * 4))
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "INT64", "data": data}]}).encode()


def add_sub_body(value: float) -> bytes:
    row = [value] * 16
    tensors = [{"name": n, "shape": [1, 16], "datatype": "FP32", "data": row} for n in ("INPUT0", "INPUT1")]
    return json.dumps({"inputs": tensors}).encode()


def head(path: str, length: int | None = None, extra: str = "", method: str = "POST") -> bytes:
    declared = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{declared}{extra}\r\n".encode()


def answer_of(sock: socket.socket) -> tuple[int, dict]:
    """Read one response (status line, headers, Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response: {data!r}")
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    is_json = "json" in headers.get("content-type", "")
    body = json.loads(rest[:length]) if is_json else {"text": rest[:length].decode("latin-1")}
    return int(lines[0].split()[1]), body


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (EOF or reset), waiting for it up to the socket's timeout."""
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, **kwargs):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, **kwargs)
    try:
        # refused before its body was read, and closed: the answer is still there to be read
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        connection.close()


@pytest.fixture
def small(repo: Path, serve) -> Iterator:
    """A server taking messages of at most 1 MiB, with room to read one at a time."""
    yield serve(repo, grpc_max_message_bytes=MiB, max_inflight_bytes=2 * MiB, grpc_request_read_timeout_s=30)


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(small) -> None:
    with connect(small.server.http_port) as sock:
        sock.sendall(head(INFER, MiB + 1))  # and never the body
        status, body = answer_of(sock)
        assert status == 413 and "--grpc-max-message-bytes" in body["error"] and str(MiB) in body["error"]
        assert closed(sock)  # the unread body is not waited for
    assert small.server.admissions[0].held == 0 and small.server.admissions[0].reading == 0
    assert small.server.stats.failures.get("too_large") == 1
    assert call(small.server.http_port, "POST", INFER, infer_body())[0] == 200


def test_a_chunked_body_is_cut_off_at_the_limit(small) -> None:
    chunk = b"x" * (256 * 1024)
    with connect(small.server.http_port) as sock:
        sock.sendall(head(INFER, extra="Transfer-Encoding: chunked\r\n"))
        with pytest.raises(OSError):  # the server stops reading and closes once over the limit
            for _ in range(400):  # 100 MiB, far more than the socket buffers hold
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = answer_of(sock)
    assert status == 413 and "more than 1048576" in body["error"]
    assert call(small.server.http_port, "POST", INFER, infer_body())[0] == 200


@pytest.mark.parametrize("budget", [4 * MiB, 0], ids=["budget", "no budget"])
# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_a_body_that_does_not_arrive_in_time_is_408(repo: Path, serve, budget: int) -> None:
    server = serve(repo, grpc_max_message_bytes=MiB, max_inflight_bytes=budget, grpc_request_read_timeout_s=0.5)
    with connect(server.server.http_port) as sock:
        sock.sendall(head(INFER, 100) + b'{"inputs"')  # then nothing
        status, body = answer_of(sock)
        assert status == 408 and "--grpc-request-read-timeout-secs" in body["error"]
        assert closed(sock)
    if budget:
        assert server.server.admissions[0].reading == 0 and server.server.admissions[0].held == 0
    assert call(server.server.http_port, "POST", INFER, infer_body())[0] == 200


# one process only: fills one process's budget; each front end has its own share, and the kernel picks the process
@pytest.mark.frontends(1)
def test_bodies_beyond_the_in_flight_budget_are_refused_with_the_budget_named(held_repo: Path, serve) -> None:
    """A request admitted and waiting for its batch holds its bytes: the next one, whose declared body
    parses to more than the room left, cannot fit and is refused at once (503) rather than read; the
    first is still answered."""
    server = serve(held_repo, grpc_max_message_bytes=MiB, max_inflight_bytes=2 * MiB)
    padding = b" " * (MiB - 4096)  # JSON whitespace: a body of about 1 MiB, reserving 16 x that to parse
    model = server.server.manager.get("add_sub")
    port = server.server.http_port
    first: list = []
    thread = threading.Thread(
        target=lambda: first.append(call(port, "POST", "/v2/models/add_sub/infer", add_sub_body(1) + padding))
    )
    thread.start()
    while model.pending_requests < 1 and thread.is_alive():
        threading.Event().wait(0.01)
    status, body = call(port, "POST", "/v2/models/add_sub/infer", add_sub_body(2) + padding)
    assert status == 503 and "--max-inflight-bytes" in body["error"], body
    thread.join(30)
    assert first and first[0][0] == 200 and first[0][1]["outputs"][0]["data"] == [2.0] * 16
    assert server.server.stats.failures.get("rejected") == 1


SECRET = "s3cret-value"


def test_restricted_apis_need_the_header_before_their_body_is_read(repo: Path, serve) -> None:
    restricted = ((("inference", "model-repository"), "admin-key", SECRET),)
    server = serve(repo, http_restricted_api=restricted, model_control_mode="explicit", load_models=("int64_triple",))
    port = server.server.http_port
    with connect(port) as sock:
        sock.sendall(head(INFER, 10 * MiB))  # a body it will never be asked for
        status, body = answer_of(sock)
        assert status == 403 and "admin-key" in body["error"] and SECRET not in body["error"]
    assert call(port, "POST", INFER, infer_body(), {"admin-key": "wrong"})[0] == 403
    assert call(port, "POST", INFER, infer_body(), {"Admin-Key": SECRET})[0] == 200  # header names: any case
    assert call(port, "POST", "/v2/repository/index", b"{}")[0] == 403
    assert call(port, "POST", "/v2/repository/index", b"{}", {"admin-key": SECRET})[0] == 200
    assert call(port, "GET", "/v2/health/ready")[0] == 200  # not in a group: open
    assert call(port, "GET", "/v2/models/int64_triple")[0] == 200
    # the gRPC header name does not open the HTTP API (Triton's HTTP header is the key itself)
    assert call(port, "POST", INFER, infer_body(), {"triton-grpc-protocol-admin-key": SECRET})[0] == 403


def test_a_gzip_bomb_is_refused_at_the_message_limit(small) -> None:
    bomb = gzip.compress(b" " * (200 * MiB), compresslevel=9)  # 200 KB on the wire
    assert len(bomb) < MiB
    status, body = call(small.server.http_port, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "error" in body, body
    small_json = gzip.compress(infer_body())
    status, body = call(small.server.http_port, "POST", INFER, small_json, {"Content-Encoding": "gzip"})
    assert status == 200 and body["outputs"][0]["data"] == [3 * v for v in range(4)]


def test_headers_over_the_limits_are_refused(small) -> None:
    port = small.server.http_port
    with connect(port) as sock:
        sock.sendall(head("/v2/health/ready", method="GET", extra=f"X-Big: {'a' * 20000}\r\n"))
        status, _ = answer_of(sock)
        assert 400 <= status < 500
    many = "".join(f"X-H{i}: 1\r\n" for i in range(500))
    with connect(port) as sock:
        sock.sendall(head("/v2/health/ready", method="GET", extra=many))
        status, _ = answer_of(sock)
        assert 400 <= status < 500
    assert call(port, "GET", "/v2/health/ready")[0] == 200


def test_connections_that_send_nothing_are_closed(repo: Path, serve) -> None:
    server = serve(repo, grpc_handshake_timeout_s=0.3)
    with connect(server.server.http_port) as sock:
        assert closed(sock)  # (within the socket's 30 s timeout; the server closes it after 0.3 s)
    assert call(server.server.http_port, "GET", "/v2/health/live")[0] == 200


def test_connections_over_the_maximum_are_closed_as_they_come(repo: Path, serve) -> None:
    server = serve(repo, http_max_connections=2)
    port = server.server.http_port
    with connect(port) as one, connect(port) as two:
        for sock in (one, two):
            sock.sendall(head("/v2/health/live", method="GET"))
            assert answer_of(sock)[0] == 200
        with connect(port) as third:
            assert closed(third)
    for _ in range(100):  # the two closed connections leave room once the server has seen them go
        try:
            assert call(port, "GET", "/v2/health/live")[0] == 200
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            threading.Event().wait(0.05)
    else:
        pytest.fail("no connection taken after the first two closed")


def _tls_client(pki: Pki, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def test_https_serves_tls_clients_and_refuses_plaintext(repo: Path, pki: Pki, serve) -> None:
    server = serve(repo, http_tls=TlsSettings(pki.server_cert, pki.server_key))
    port = server.server.http_port
    connection = http.client.HTTPSConnection("localhost", port, timeout=30, context=_tls_client(pki, False))
    connection.request("POST", INFER, body=infer_body())
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["outputs"][0]["data"] == [0, 3, 6, 9]
    connection.close()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        call(port, "GET", "/v2/health/live")


def test_mutual_tls_needs_a_client_certificate_from_the_root(repo: Path, pki: Pki, serve) -> None:
    server = serve(repo, http_tls=TlsSettings(pki.server_cert, pki.server_key, pki.ca, mutual=True))
    port = server.server.http_port

    def live(context: ssl.SSLContext) -> int:
        connection = http.client.HTTPSConnection("localhost", port, timeout=30, context=context)
        try:
            connection.request("GET", "/v2/health/live")
            return connection.getresponse().status
        finally:
            connection.close()

    assert live(_tls_client(pki, True)) == 200
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        live(_tls_client(pki, False))


# one process only: watches the one process's servicer; test_frontends.py drains the front ends
@pytest.mark.frontends(1)
def test_drain_answers_accepted_requests_and_refuses_new_ones(held_repo: Path, serve) -> None:
    server = serve(held_repo, grace_period_s=30)
    model = server.server.manager.get("add_sub")
    port = server.server.http_port
    # keep-alive connections, open before the drain (the server closes each after its answer in a drain)
    idle = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(5)]
    for connection in idle:
        connection.request("GET", "/v2/health/ready")
        first = connection.getresponse()
        first.read()
        assert first.status == 200
    answers: list = []
    threads = [
        threading.Thread(
            target=lambda v=v: answers.append(call(port, "POST", "/v2/models/add_sub/infer", add_sub_body(v)))
        )
        for v in (1.0, 2.0, 3.0)
    ]
    for thread in threads:
        thread.start()
    while model.pending_requests < 3:  # all three are admitted and queued
        threading.Event().wait(0.01)
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
    while not server.server._servicer.draining:
        threading.Event().wait(0.01)
    # health and metadata keep their answers (live 200, ready 400, as Triton's); new work gets 503
    asked = [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/add_sub")]
    asked += [("POST", "/v2/models/add_sub/infer"), ("POST", "/v2/repository/index")]
    statuses = []
    for connection, (method, path) in zip(idle, asked, strict=True):
        body = add_sub_body(4.0) if path.endswith("infer") else (b"{}" if method == "POST" else None)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        data = json.loads(response.read() or b"{}")
        statuses.append(response.status)
        if response.status == 503:
            assert "shutting down" in data["error"], data
        connection.close()
    assert statuses == [200, 400, 200, 503, 503]
    with pytest.raises(ConnectionError):
        call(port, "GET", "/v2/health/live")  # the port no longer takes connections
    for thread in threads:
        thread.join(30)
    assert sorted(a[1]["outputs"][0]["data"][0] for a in answers) == [2.0, 4.0, 6.0]
    assert all(a[0] == 200 for a in answers)
    stopping.result(30)


def _https_live(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("localhost", port, timeout=30, context=context)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status
    finally:
        connection.close()


async def _on_loop(function) -> None:
    """Run ``function`` on the server's event loop, where SIGHUP runs it, and wait for what it started
    (front-end processes reload in their own time)."""
    done = function()
    if done is not None:
        await asyncio.wrap_future(done)


def test_a_reload_serves_new_https_connections_with_the_new_certificate(repo: Path, tmp_path: Path, serve) -> None:
    old, new = make_pki(tmp_path / "old", "old"), make_pki(tmp_path / "new", "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    server = serve(repo, http_tls=TlsSettings(cert, key))  # HTTPS only: gRPC stays plaintext
    port = server.server.http_port
    assert _https_live(port, old.ca) == 200
    shutil.copy(new.server_cert, cert)  # a rotation half done: the new certificate with the old key
    server.run(_on_loop(server.server.reload_certificates))
    assert _https_live(port, old.ca) == 200  # the pair in use stays
    shutil.copy(new.server_key, key)
    server.run(_on_loop(server.server.reload_certificates))
    assert _https_live(port, new.ca) == 200
    with pytest.raises(ssl.SSLError):
        _https_live(port, old.ca)


def test_the_cli_serves_https_and_reloads_it_on_sighup(repo: Path, tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old", "old"), make_pki(tmp_path / "new", "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    remote = RemoteServer(
        "--model-repository", str(repo), "--no-metrics", "--http-use-ssl",
        "--http-server-cert", str(cert), "--http-server-key", str(key),
    )  # fmt: skip
    try:
        port = int(remote.wait_for_line(r"HTTP server listening on 127\.0\.0\.1:(\d+) \(TLS\)").group(1))
        assert _https_live(port, old.ca) == 200
        shutil.copy(new.server_cert, cert)
        shutil.copy(new.server_key, key)
        remote.proc.send_signal(signal.SIGHUP)
        remote.wait_for_line("HTTP TLS certificates reloaded")
        assert _https_live(port, new.ca) == 200
    finally:
        assert remote.stop() == 0, remote.log


def test_http_flags_and_their_variables_reach_the_settings(tmp_path: Path, monkeypatch) -> None:
    from rapidserve import cli

    secret = tmp_path / "key"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("RAPIDSERVE_HTTP_RESTRICTED_API", f"inference,health:k1=v1;model-repository:k2=@{secret}")
    monkeypatch.setenv("RAPIDSERVE_HTTP_PORT", "9000")
    settings, _ = cli._settings(cli._parser().parse_args(["serve", "--model-repository", str(tmp_path)]))
    assert settings.http_port == 9000 and settings.http_enabled and settings.http_tls is None
    assert settings.http_restricted_api == (
        (("inference", "health"), "k1", "v1"),
        (("model-repository",), "k2", "from-a-file"),
    )
    assert settings.restricted_protocols == ()  # the HTTP groups do not restrict gRPC
    args = ["serve", "--model-repository", str(tmp_path), "--no-http", "--http-port", "0", "--http-address", "::1",
            "--http-restricted-api", "statistics:k=v"]  # fmt: skip
    settings, _ = cli._settings(cli._parser().parse_args(args))
    assert not settings.http_enabled and settings.http_port == 0 and settings.http_host == "::1"
    assert settings.http_restricted_api == ((("statistics",), "k", "v"),)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--http-restricted-api", "inference,health:k1=v1", "--http-restricted-api", "health:k2=v2"],
         "more than one --http-restricted-api group"),
        (["--http-restricted-api", "infer:k=v"], "--http-restricted-api: unknown protocol(s) infer"),
        (["--http-use-ssl"], "--http-use-ssl needs --http-server-cert and --http-server-key"),
        (["--http-use-ssl-mutual", "--http-server-cert", "c", "--http-server-key", "k"], "needs --http-root-cert"),
        (["--http-port", "70000"], "--http-port must be a port number from 0 to 65535"),
        (["--http-max-connections", "0"], "--http-max-connections must be at least 1"),
    ],
)  # fmt: skip
def test_bad_http_flags_are_one_line_naming_the_flag(tmp_path: Path, flags: list[str], message: str) -> None:
    from rapidserve import cli

    with pytest.raises(ValueError) as info:
        cli._settings(cli._parser().parse_args(["serve", "--model-repository", str(tmp_path), *flags]))
    assert message in str(info.value) and "\n" not in str(info.value)


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_bodies_on_health_checks_are_refused_before_any_budget(repo: Path, serve) -> None:
    """Silent health GETs that declare a body are 400 at once: they never hold the health budget, so a
    gRPC Health/Check right after them answers SERVING."""
    server = serve(repo, grpc_request_read_timeout_s=20)
    sockets = [connect(server.server.http_port, timeout=10) for _ in range(4)]
    try:
        for sock in sockets:
            sock.sendall(head("/v2/health/live", 1, method="GET"))  # and never the byte
        for sock in sockets:
            status, body = answer_of(sock)
            assert status == 400 and "takes no body" in body["error"], body
        with grpc.insecure_channel(server.url) as channel:
            answer = health_check(channel)(protos.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == protos.HealthCheckResponse.SERVING
        assert server.server.admissions[1].reading == 0 and server.server.admissions[1].held == 0
    finally:
        for sock in sockets:
            sock.close()


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_silent_small_bodies_reserve_their_size_not_the_message_limit(repo: Path, serve) -> None:
    """Eight silent 100-byte POSTs reserve what 100 bytes of JSON can become, not twice the message
    limit each: a normal request beside them is answered well before the read timeout (20 s)."""
    server = serve(repo, grpc_request_read_timeout_s=20, model_control_mode="explicit", load_models=("int64_triple",))
    admission = server.server.admissions[0]
    sockets = [connect(server.server.http_port) for _ in range(8)]
    try:
        for sock in sockets:
            sock.sendall(head("/v2/repository/index", 100) + b"{")  # then nothing
        while admission.reading < 8:
            threading.Event().wait(0.01)
        assert admission.reserved == 8 * 100 * 16
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
        connection.request("POST", INFER, body=infer_body())
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["outputs"][0]["data"] == [0, 3, 6, 9]
        connection.close()
    finally:
        for sock in sockets:
            sock.close()


def test_a_non_utf8_restricted_header_value_is_403(repo: Path, serve) -> None:
    server = serve(repo, http_restricted_api=((("inference",), "admin-key", SECRET),))
    with connect(server.server.http_port) as sock:
        sock.sendall(head(INFER, 0, extra="admin-key: \xff\r\n").replace(b"\xc3\xbf", b"\xff"))
        status, body = answer_of(sock)
    assert status == 403 and "admin-key" in body["error"], body


# one process only: watches the one process's HTTP server
@pytest.mark.frontends(1)
def test_an_answer_the_client_does_not_read_closes_its_connection(tmp_path: Path, serve) -> None:
    """A 16 MiB answer to a client that never reads (a 4 KiB receive buffer): once the read timeout
    passes the server aborts the connection and lets the answer go."""
    write_model(tmp_path, "tile", tile_graph(64), TILE_CONFIG)
    server = serve(tmp_path, grpc_request_read_timeout_s=1)
    x = np.arange(2**16, dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2**16], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + x.tobytes()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.server.http_port))
    http_server = server.server._http._server
    try:
        sock.sendall(
            head("/v2/models/tile/infer", len(body), extra=f"Inference-Header-Content-Length: {len(header)}\r\n")
        )
        sock.sendall(body)
        while not http_server.open_connections:  # accepted (it may not be yet when connect returns)
            threading.Event().wait(0.01)
        while http_server.open_connections:  # until the server gives the connection up
            threading.Event().wait(0.05)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(2**20):
                received += len(chunk)
        assert received < 64 * x.nbytes  # cut off before the whole answer
    finally:
        sock.close()
    assert call(server.server.http_port, "GET", "/v2/health/ready")[0] == 200


def test_a_json_part_over_the_parse_limit_is_413_before_the_body_is_sent(repo: Path, serve) -> None:
    server = serve(repo)  # a 64 MiB message limit: 9 MiB fits, but not as JSON
    with connect(server.server.http_port) as sock:
        sock.sendall(head(INFER, 9 * MiB))
        status, body = answer_of(sock)
        assert status == 413 and "binary_data_size" in body["error"], body
    binary = f"Inference-Header-Content-Length: {9 * MiB - 1}\r\n"  # the JSON part, declared
    with connect(server.server.http_port) as sock:
        sock.sendall(head(INFER, 9 * MiB, extra=binary))
        status, body = answer_of(sock)
        assert status == 413 and "binary_data_size" in body["error"], body
