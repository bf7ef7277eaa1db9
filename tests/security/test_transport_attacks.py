"""Attacks on the transport, scaled down for CI: oversized and concurrent large messages (server RSS
measured from /proc), bodies that never arrive, answers too large to send, streams that are never
read, stalled connections, ping floods and unexpected errors."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from remote import RemoteServer
from testmodels import SUM_CONFIG, identity_graph, strings_graph, sum_graph, tile_graph, write_model

from rapidserve import AsyncClient, Client, InferenceServerError, protos
from rapidserve.clients import _h2grpc as h2grpc
from rapidserve.server import streams
from rapidserve.server.streams import StreamAnswers

MiB = 2**20
INFER = protos.method_path("ModelInfer")

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("transport")
    write_model(repo, "sum", sum_graph(), SUM_CONFIG)
    write_model(
        repo,
        "tile",
        tile_graph(4),
        'max_batch_size: 0 input [{ name: "x" data_type: TYPE_FP32 dims: [-1] }] '
        'output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]',
    )
    write_model(repo, "identity", identity_graph(["FP32"]))
    return repo


def _sum_request(count: int) -> bytes:
    request = protos.ModelInferRequest(model_name="sum")
    request.inputs.add(name="x", datatype="FP32", shape=[count])
    request.raw_input_contents.append(np.ones(count, np.float32).tobytes())
    return request.SerializeToString()


class Probe:
    """A server in its own process, whose memory is read from /proc."""

    def __init__(self, repo: Path, *args: str) -> None:
        self.remote = RemoteServer("--model-repository", str(repo), "--no-metrics", *args)
        self.channel = grpc.insecure_channel(self.remote.url, options=[("grpc.max_send_message_length", 2**31 - 1)])
        self.infer = self.channel.unary_unary(INFER)
        deadline = time.monotonic() + 60
        while True:  # ready once a small request goes through
            try:
                self.infer(_sum_request(4), timeout=5)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, self.remote.log
                time.sleep(0.1)
        self.baseline_mb = self.memory_mb("VmRSS")

    def memory_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.remote.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {key} in /proc")

    def growth_mb(self) -> float:
        """How far the peak RSS rose above the RSS measured once the server was ready."""
        return self.memory_mb("VmHWM") - self.baseline_mb

    def call(self, data: bytes, timeout_s: float = 60) -> grpc.StatusCode:
        try:
            self.infer(data, timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def close(self) -> None:
        self.channel.close()
        self.remote.stop()


@pytest.fixture
def probe(repo: Path) -> Iterator[Probe]:
    started: list[Probe] = []

    def start(*args: str) -> Probe:
        started.append(Probe(repo, *args))
        return started[-1]

    yield start  # type: ignore[misc]
    for p in started:
        p.close()


def test_a_message_over_the_limit_is_refused_before_it_is_buffered(probe) -> None:
    server = probe("--grpc-max-message-bytes", "64MiB")
    data = _sum_request(70 * MiB // 4)
    with pytest.raises(grpc.RpcError) as info:
        server.infer(data, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    assert server.growth_mb() < 20, f"the server grew {server.growth_mb():.0f} MB for a refused 70 MB message"
    assert server.call(_sum_request(4)) == grpc.StatusCode.OK


def test_concurrent_large_requests_stay_within_the_in_flight_budget(probe) -> None:
    """8 concurrent 24 MiB requests under a 128 MiB budget (the 1 GiB / 8 x 256 MB probe, scaled by 8):
    three reads at a time fit (3 x 32 MiB reserved, one more for the hand-over), the rest wait or are refused."""
    server = probe("--max-inflight-bytes", "128MiB", "--grpc-max-message-bytes", "32MiB")
    data = _sum_request(24 * MiB // 4)
    codes: list[grpc.StatusCode] = []
    threads = [threading.Thread(target=lambda: codes.append(server.call(data))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.OK in codes
    # Unbounded, the same load held 8 x 24 MiB several times over (gRPC's buffers, Python's copies). Beyond
    # the budget: an engine's copy of a request it runs (ONNX Runtime copies unaligned tensors) and gRPC's
    # buffers that linger a moment after the hand-over.
    bound = 128 + 4 * 32
    assert server.growth_mb() < bound, f"peak RSS rose {server.growth_mb():.0f} MB over a 128 MiB budget"
    assert server.call(_sum_request(4)) == grpc.StatusCode.OK


# one process only: fills one process's budget; each front end has its own share, and the kernel picks the process
@pytest.mark.frontends(1)
def test_over_the_budget_the_answer_is_resource_exhausted_naming_the_flag(repo: Path, serve) -> None:
    server = serve(repo, max_inflight_bytes=24 * MiB, grpc_max_message_bytes=8 * MiB)
    server.server._servicer.admission.admit(10 * MiB)  # as if a request of 10 MiB were being served
    try:
        with Client(server.url) as client:
            with pytest.raises(InferenceServerError) as info:
                client.infer("sum", {"x": np.ones(4, np.float32)})
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-inflight-bytes" in info.value.message
    finally:
        server.server._servicer.admission.release(10 * MiB)
    with Client(server.url) as client:
        assert client.infer("sum", {"x": np.ones(4, np.float32)})["total"][0] == 4


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_every_rpc_is_read_through_a_budget_and_probes_through_their_own(repo: Path, serve) -> None:
    """Not only inference: a 60 MiB body sent to ServerMetadata or to a health check is a request too.
    Health checks read from a budget of their own, so that probes answer while inference fills the main one."""
    server = serve(repo, max_inflight_bytes=24 * MiB, grpc_max_message_bytes=8 * MiB)
    main, health = server.server.admissions
    health_methods = (protos.method_path("ServerLive"), "/grpc.health.v1.Health/Check")
    with grpc.insecure_channel(server.url) as channel:

        def code(method: str) -> grpc.StatusCode:
            try:
                channel.unary_unary(method)(b"", timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        main.admit(10 * MiB)  # as if a request of 10 MiB were being served: no room for another read
        assert code(protos.method_path("ServerMetadata")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [code(method) for method in health_methods] == [grpc.StatusCode.OK] * 2
        main.release(10 * MiB)
        full = health.budget - health.reserve + 1  # the health budget full: health is bounded too
        health.admit(full)
        assert [code(method) for method in health_methods] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        health.release(full)
        assert [code(method) for method in health_methods] == [grpc.StatusCode.OK] * 2
    assert main.held == health.held == 0 and main.reading == health.reading == 0


def test_a_message_of_countless_tiny_fields_is_refused_without_building_them(repo: Path, serve) -> None:
    """2M empty raw_input_contents entries in 4 MiB: refused by count, the event loop free meanwhile."""
    server = serve(repo, grpc_max_message_bytes=8 * MiB)
    data = protos.ModelInferRequest(model_name="sum").SerializeToString() + b"\x3a\x00" * (2 * MiB)
    with grpc.insecure_channel(server.url) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(INFER)(data, timeout=30)
        took = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top-level fields" in info.value.details()
        assert took < 5, f"refusing it took {took:.1f} s"
        assert Client(server.url).is_server_live()


def test_a_connection_with_no_call_is_closed_after_the_idle_timeout(repo: Path, serve) -> None:
    server = serve(repo, grpc_max_connection_idle_s=0.5)
    host, port = server.url.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(50)]
    try:
        for sock in idle:  # a proper HTTP/2 client that then never calls
            sock.sendall(h2grpc.PREFACE + h2grpc.frame(h2grpc.SETTINGS, 0, 0))
        deadline = time.monotonic() + 20
        for sock in idle:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except TimeoutError:
                pytest.fail("an idle HTTP/2 connection was still open well after the idle timeout")
            assert h2grpc.GOAWAY in [kind for kind, _ in _frames(received)]
    finally:
        for sock in idle:
            sock.close()


def test_a_call_whose_body_never_arrives_ends_deadline_exceeded(repo: Path, serve) -> None:
    server = serve(repo, grpc_request_read_timeout_s=0.3)

    async def stalled_then_healthy() -> tuple[h2grpc.Reply, h2grpc.Reply]:
        connection = await h2grpc.Connection.open(server.url)
        try:
            stream = await connection.stream(INFER, lambda data: None)  # headers sent, no message, no end
            healthy = await connection.unary(INFER, _sum_request(4), timeout_s=10)
            return await asyncio.wait_for(stream.status, 10), healthy
        finally:
            connection.close()

    stalled, healthy = asyncio.run(stalled_then_healthy())
    assert healthy.code == grpc.StatusCode.OK
    assert stalled.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive in time" in stalled.message


def test_an_answer_over_the_message_limit_is_internal_and_says_why(repo: Path, serve) -> None:
    server = serve(repo, grpc_max_message_bytes=MiB)
    x = np.arange(100_000, dtype=np.float32)  # 0.4 MB in, 1.6 MB out
    with Client(server.url) as client:
        with pytest.raises(InferenceServerError) as info:
            client.infer("tile", {"x": x})
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "--grpc-max-message-bytes" in info.value.message and "tile" in info.value.message
        np.testing.assert_array_equal(client.infer("tile", {"x": x[:10]})["y"], np.tile(x[:10], 4))


# one process only: patches a limit in the test's process, which front ends do not share
@pytest.mark.frontends(1)
async def test_a_stream_whose_answers_are_not_read_stops_being_read(repo: Path, serve, monkeypatch) -> None:
    monkeypatch.setattr(streams, "STREAM_MAX_PENDING_BYTES", 2 * MiB)
    server = serve(repo)
    x = np.arange(64 * 1024, dtype=np.float32)  # 256 KiB in, 1 MiB out
    request = protos.ModelInferRequest(model_name="tile")
    request.inputs.add(name="x", datatype="FP32", shape=[x.size])
    request.raw_input_contents.append(x.tobytes())
    sent = 60
    # no BDP probing: the client's window stays small, so answers it does not read stay on the server
    channel = grpc.aio.insecure_channel(server.url, options=[("grpc.http2.bdp_probe", 0)])
    stream = channel.stream_stream(
        protos.method_path("ModelStreamInfer"), response_deserializer=protos.ModelStreamInferResponse.FromString
    )
    call = stream(iter([request.SerializeToString()] * sent))
    with Client(server.url) as client:

        def inferences() -> int:
            stats = client.model_statistics("tile").model_stats
            return stats[0].inference_count if stats else 0

        seen, last_change = 0, time.monotonic()
        while time.monotonic() - last_change < 1.0:  # until no new request has started for a second
            await asyncio.sleep(0.05)
            now = await asyncio.to_thread(inferences)
            if now != seen:
                seen, last_change = now, time.monotonic()
        assert seen < 12, f"{seen} of {sent} requests were read while their answers were not"
        answers = 0
        async for response in call:
            assert not response.error_message
            answers += 1
        assert answers == sent
        assert await asyncio.to_thread(inferences) == sent
    await channel.close()


def test_stalled_connections_are_closed_and_do_not_stop_a_healthy_client(repo: Path, serve) -> None:
    server = serve(repo, grpc_handshake_timeout_s=1.0)
    host, port = server.url.rsplit(":", 1)
    stalled = [socket.create_connection((host, int(port))) for _ in range(500)]  # never send the preface
    try:
        with Client(server.url, timeout_s=10) as client:
            assert client.infer("sum", {"x": np.ones(8, np.float32)})["total"][0] == 8
        deadline = time.monotonic() + 15
        for sock in stalled:  # the server's own SETTINGS may come first; then it must hang up
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                while sock.recv(4096):
                    pass
            except TimeoutError:
                pytest.fail("a connection that sent nothing was still open well after the handshake timeout")
    finally:
        for sock in stalled:
            sock.close()


def test_a_ping_flood_is_answered_with_goaway(repo: Path, serve) -> None:
    server = serve(repo, grpc_http2_max_ping_strikes=2, grpc_http2_min_recv_ping_interval_without_data_ms=60_000)
    host, port = server.url.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(h2grpc.PREFACE + h2grpc.frame(h2grpc.SETTINGS, 0, 0))
        for i in range(10):  # one ping at a time, reading what comes back, until the server has had enough
            try:
                sock.sendall(h2grpc.frame(h2grpc.PING, 0, 0, i.to_bytes(8, "big")))
                while not any(kind == h2grpc.PING and payload == i.to_bytes(8, "big") for kind, payload in
                              _frames(received)) and (chunk := sock.recv(65536)):  # fmt: skip
                    received += chunk
            except OSError:  # it closed the connection
                break
            if h2grpc.GOAWAY in [kind for kind, _ in _frames(received)]:
                break
    goaway = [payload for kind, payload in _frames(received) if kind == h2grpc.GOAWAY]
    assert goaway, "the server never sent GOAWAY to a client pinging without data"
    error_code = int.from_bytes(goaway[0][4:8], "big")
    assert error_code == 0xB  # ENHANCE_YOUR_CALM: too many pings


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        frames.append((data[pos + 3], data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


def test_the_server_announces_its_limit_on_streams_per_connection(repo: Path, serve) -> None:
    server = serve(repo, grpc_max_concurrent_streams=7)

    async def announced() -> int:
        connection = await h2grpc.Connection.open(server.url)
        try:
            return connection.max_streams
        finally:
            connection.close()

    assert asyncio.run(announced()) == 7


# one process only: patches the manager in the test's process
@pytest.mark.frontends(1)
def test_unexpected_errors_reach_the_caller_without_internals(repo: Path, serve, caplog) -> None:
    server = serve(repo)

    def broken(*args, **kwargs):
        raise RuntimeError("/var/secret/path exploded")

    server.server.manager.index = broken
    with Client(server.url) as client, pytest.raises(InferenceServerError) as info:
        client.repository_index()
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "/var/secret" not in info.value.message and "Traceback" not in info.value.message
    reference = info.value.message.rsplit("reference ", 1)[1].split()[0]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)  # the log keeps the details


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
async def test_with_the_budget_turned_off_every_rpc_is_still_served(repo: Path, serve) -> None:
    """--max-inflight-bytes 0: gRPC reads requests as they come (unary, stream and health alike)."""
    server = serve(repo, max_inflight_bytes=0)
    assert server.server.admissions == (None, None)
    x = np.arange(6, dtype=np.float32)
    with Client(server.url) as client:
        assert client.is_server_live()
        assert client.infer("sum", {"x": x})["total"][0] == 15
    async with AsyncClient(server.url) as client:
        assert (await client.infer("sum", {"x": x}))["total"][0] == 15
    with grpc.insecure_channel(server.url) as channel:
        assert channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)


def test_health_and_control_requests_are_refused_unparsed_when_large(repo: Path, serve) -> None:
    """They name a model, a version, a service: 64 KiB is plenty, and parsing more would cost the loop."""
    server = serve(repo, model_control_mode="none")
    padding = b"\x7a" + protos.varint(100_000) + b"x" * 100_000  # an unknown field of 100 kB
    with grpc.insecure_channel(server.url) as channel:
        for method in ("ServerLive", "ModelReady", "ModelMetadata", "ModelStatistics", "RepositoryIndex"):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(protos.method_path(method))(padding, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "at most 65536" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/grpc.health.v1.Health/Check")(padding, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        load = protos.RepositoryModelLoadRequest(model_name="sum")
        load.parameters["config"].string_param = "{}" + " " * (3 * MiB)  # over a config's 1 MiB and then some
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(protos.method_path("RepositoryModelLoad"))(load.SerializeToString(), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in info.value.details()
    assert Client(server.url).is_server_live()


# one process only: watches the one process's servicer
@pytest.mark.frontends(1)
async def test_a_stream_request_cancelled_before_it_starts_gives_its_bytes_back(repo: Path, serve) -> None:
    server = serve(repo)
    servicer = server.server._servicer
    request = protos.ModelInferRequest(model_name="sum")
    request.inputs.add(name="x", datatype="FP32", shape=[6 * MiB])
    request.raw_input_contents.append(np.ones(6 * MiB, np.float32).tobytes())  # 24 MiB: decoded in a task

    async def begin_then_end_the_stream() -> int:
        stream = StreamAnswers(servicer)
        stream._in_flight += 1  # as read() does
        assert stream._begin(request, request.ByteSize())
        stream.cancel_pending()  # the stream ends in the same turn
        for _ in range(5):
            await asyncio.sleep(0)
        return servicer.admission.held

    assert server.run(begin_then_end_the_stream()) == 0


# one process only: patches the encoder in the test's process, which front ends do not share
@pytest.mark.frontends(1)
def test_large_bytes_outputs_are_encoded_off_the_event_loop(repo: Path, serve, monkeypatch) -> None:
    from rapidserve.server import codec

    write_model(
        repo,
        "echo",
        strings_graph(),
        'max_batch_size: 0\ninput [{ name: "text" data_type: TYPE_STRING dims: [-1] }]\n'
        'output [{ name: "echo" data_type: TYPE_STRING dims: [-1] }]\n',
    )
    server = serve(repo)
    threads: list[int] = []
    encode = codec.encode_response

    def spy(response):
        threads.append(threading.get_ident())
        return encode(response)

    monkeypatch.setattr(codec, "encode_response", spy)
    loop_thread = server.run(_thread_id())
    texts = np.array([b"a"] * 20_000, dtype=object)
    with Client(server.url) as client:
        assert list(client.infer("echo", {"text": texts})["echo"][:3]) == [b"a"] * 3
        client.infer("echo", {"text": texts[:10]})
    assert threads[0] != loop_thread and threads[1] == loop_thread  # many elements: a worker thread


async def _thread_id() -> int:
    return threading.get_ident()
