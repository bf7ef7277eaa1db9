"""The bench's HTTP/2 gRPC client against a real rapidserve server (grpcio's HTTP/2 on the other
side): answers byte-for-byte as grpcio's client gets them, messages far over the flow-control
windows, hundreds of calls on one connection, streams, errors, and a server that stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from testmodels import slow_graph, write_model

from rapidserve import protos
from rapidserve.clients import Client
from rapidserve.clients._h2grpc import Connection
from rapidserve.common import codec

pytestmark = pytest.mark.timeout(120)
INFER = protos.method_path("ModelInfer")


def request(model: str, **inputs: np.ndarray) -> bytes:
    return codec.encode_request(model, inputs).SerializeToString()


def outputs(reply_bytes: bytes | None) -> dict[str, np.ndarray]:
    assert reply_bytes is not None
    return codec.decode_response(protos.ModelInferResponse.FromString(reply_bytes))


def test_answers_match_grpcio_and_large_messages_pass(shared_server) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 16), dtype=np.float32), rng.random((3, 16), dtype=np.float32)
    text = np.array([bytes(rng.integers(97, 123, 3_000_000, dtype=np.uint8)), b"short"], dtype=object)

    async def scenario() -> tuple:
        connection = await Connection.open(shared_server.url)
        small = await connection.unary(INFER, request("add_sub", INPUT0=a, INPUT1=b))
        large = await connection.unary(INFER, request("strings", text=text))  # 3 MB each way
        connection.close()
        return small, large

    small, large = asyncio.run(scenario())
    with Client(shared_server.url) as client:
        expected = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
    got = outputs(small.response)
    assert small.code == grpc.StatusCode.OK and got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert large.code == grpc.StatusCode.OK
    assert list(outputs(large.response)["echo"]) == list(text)


def test_many_concurrent_calls_on_one_connection(shared_server) -> None:
    inputs = [np.full((1, 16), i, dtype=np.float32) for i in range(400)]

    async def scenario() -> list:
        connection = await Connection.open(shared_server.url)
        replies = await asyncio.gather(
            *(connection.unary(INFER, request("add_sub", INPUT0=x, INPUT1=x)) for x in inputs)
        )
        connection.close()
        return replies

    replies = asyncio.run(scenario())
    for x, reply in zip(inputs, replies, strict=True):
        assert reply.code == grpc.StatusCode.OK, reply
        np.testing.assert_array_equal(outputs(reply.response)["OUTPUT0"], 2 * x)  # each answer is its own


def test_errors_carry_the_servers_status_and_message(shared_server) -> None:
    async def scenario() -> list:
        connection = await Connection.open(shared_server.url)
        replies = [
            await connection.unary(INFER, request("no_such_model", x=np.zeros((1, 4), np.float32))),
            await connection.unary(INFER, request("add_sub", INPUT0=np.zeros((1, 3), np.float32))),
            await connection.unary(INFER, b"\xff\xff\xff"),  # not a protobuf message
            await connection.unary("/inference.GRPCInferenceService/NoSuchMethod", b""),
        ]
        connection.close()
        return replies

    missing, invalid, garbage, unimplemented = asyncio.run(scenario())
    assert missing.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in missing.message
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT and "INPUT" in invalid.message
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT and "inference.ModelInferRequest" in garbage.message
    assert unimplemented.code == grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_of_requests_answered_by_id(shared_server) -> None:
    async def scenario() -> tuple:
        connection = await Connection.open(shared_server.url)
        answers: list[bytes] = []
        stream = await connection.stream(protos.method_path("ModelStreamInfer"), answers.append)
        for i in range(20):
            x = np.full((1, 16), i, dtype=np.float32)
            stream.write(
                codec.encode_request("add_sub", {"INPUT0": x, "INPUT1": x}, request_id=str(i)).SerializeToString()
            )
        while len(answers) < 20:
            await asyncio.sleep(0.01)
        stream.end()
        status = await stream.status
        connection.close()
        return answers, status

    answers, status = asyncio.run(scenario())
    assert status.code == grpc.StatusCode.OK
    for data in answers:
        response = protos.ModelStreamInferResponse.FromString(data)
        assert response.error_message == ""
        i = int(response.infer_response.id)
        np.testing.assert_array_equal(codec.decode_response(response.infer_response)["OUTPUT1"], np.zeros((1, 16)))
        np.testing.assert_array_equal(
            codec.decode_response(response.infer_response)["OUTPUT0"], np.full((1, 16), 2 * i)
        )


def test_a_server_that_stops_ends_calls_unavailable(tmp_path: Path) -> None:
    from conftest import ServerThread

    from rapidserve.server.settings import ServerSettings

    write_model(tmp_path, "slow", slow_graph(repeats=400))  # tens of ms a call: 50 take seconds
    server = ServerThread(
        ServerSettings(model_repositories=(tmp_path,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    )
    server.start()
    x = np.ones((1, 256, 256), dtype=np.float32)

    async def scenario() -> tuple:
        connection = await Connection.open(server.url)
        first = await connection.unary(INFER, request("slow", x=x))
        pending = [asyncio.create_task(connection.unary(INFER, request("slow", x=x))) for _ in range(50)]
        model = server.server.manager.get("slow")

        async def queued() -> None:  # (until some are queued behind the running one)
            while not model.pending_requests:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(queued(), 30)
        await asyncio.get_running_loop().run_in_executor(None, server.stop, 0)
        replies = await asyncio.wait_for(asyncio.gather(*pending), 30)
        after = await asyncio.wait_for(connection.unary(INFER, request("slow", x=x)), 30)
        connection.close()
        return first, replies, after

    first, replies, after = asyncio.run(scenario())
    assert first.code == grpc.StatusCode.OK
    codes = {r.code for r in replies}
    assert grpc.StatusCode.UNAVAILABLE in codes, codes  # some were still queued when the server went
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert after.code == grpc.StatusCode.UNAVAILABLE
