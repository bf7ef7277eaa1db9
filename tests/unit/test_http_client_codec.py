"""The clients' side of the KServe v2 REST protocol, without a server: request bodies read back by an
independent parser (and compared with tritonclient.http's), answers written by hand per Triton's binary
tensor data extension decoded, malformed answers refused, and the bench's HTTP/1.1 connection parsing
what a raw socket server sends in pieces."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from rapidserve.clients._http1 import Http1Connection, request_head
from rapidserve.clients._rest import decode_infer, encode_infer, error_of, index_of, parse_url, proto_of
from rapidserve.clients.bench.payloads import HttpTarget, Payloads
from rapidserve.common.errors import InvalidTensor

# the v2 wire types, written out here rather than taken from the package under test
WIRE = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
        "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}  # fmt: skip


def arrays() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    out = {f"in_{t}": rng.integers(0, 100, (2, 3)).astype(np.dtype(code)) for t, code in WIRE.items()}
    out["in_BF16"] = np.array([[1.5, -2.0, 3.25]], dtype=ml_dtypes.bfloat16)
    out["in_BYTES"] = np.array([[b"a", b"", "\u00e9".encode()]], dtype=object)
    return out


def split(body: bytes, header_length: int) -> tuple[dict[str, Any], list[bytes]]:
    """The JSON header and each input's binary data, read as a server would read them."""
    header = json.loads(body[:header_length])
    blobs, at = [], header_length
    for tensor in header["inputs"]:
        size = tensor["parameters"]["binary_data_size"]
        blobs.append(body[at : at + size])
        at += size
    assert at == len(body)
    return header, blobs


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_every_datatype_goes_as_binary_data_in_input_order() -> None:
    inputs = arrays()
    encoded = encode_infer(inputs, ["out_FP32"], request_id="r1", parameters={"priority": 2})
    header, blobs = split(encoded.body, encoded.header_length)
    assert header["id"] == "r1" and header["parameters"] == {"priority": 2, "binary_data_output": True}
    assert header["outputs"] == [{"name": "out_FP32", "parameters": {"binary_data": True}}]
    assert [t["name"] for t in header["inputs"]] == list(inputs)
    for tensor, blob in zip(header["inputs"], blobs, strict=True):
        array = inputs[tensor["name"]]
        assert tensor["shape"] == list(array.shape)
        datatype = tensor["datatype"]
        if datatype == "BYTES":
            assert blob == length_prefixed(list(array.reshape(-1)))
        elif datatype == "BF16":
            assert blob == array.view(np.uint16).astype("<u2").tobytes()
        else:
            assert datatype == tensor["name"][3:]
            np.testing.assert_array_equal(np.frombuffer(blob, WIRE[datatype]).reshape(array.shape), array)
    assert encoded.headers()["Inference-Header-Content-Length"] == str(encoded.header_length)


def test_json_tensors_carry_every_value_in_row_major_order() -> None:
    inputs = arrays()
    encoded = encode_infer(inputs, ["o"], binary=False)
    assert encoded.header_length == len(encoded.body)
    header = json.loads(encoded.body)
    assert header["parameters"] == {"binary_data_output": False}
    assert header["outputs"] == [{"name": "o", "parameters": {"binary_data": False}}]
    for tensor in header["inputs"]:
        array = inputs[tensor["name"]]
        assert "parameters" not in tensor and tensor["shape"] == list(array.shape)
        if tensor["datatype"] == "BYTES":
            assert tensor["data"] == [v.decode() for v in array.reshape(-1)]
        else:
            assert tensor["data"] == [float(v) if array.dtype.kind in "fV" else v for v in array.reshape(-1).tolist()]
    with pytest.raises(ValueError, match="no JSON form"):
        encode_infer({"x": np.array([np.nan], np.float32)}, binary=False)


def test_the_binary_data_is_what_tritonclient_http_sends() -> None:
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the reference encoder")
    inputs = {k: v for k, v in arrays().items() if k != "in_BF16"}  # (tritonclient has no BF16 numpy type)
    theirs = []
    for name, array in inputs.items():
        tensor = http.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else name[3:])
        tensor.set_data_from_numpy(array, binary_data=True)
        theirs.append(tensor)
    their_body, their_length = http.InferenceServerClient.generate_request_body(theirs)
    ours = encode_infer(inputs)
    their_header = json.loads(their_body[:their_length])
    our_header = json.loads(ours.body[: ours.header_length])
    assert ours.body[ours.header_length :] == their_body[their_length:]
    assert [(t["name"], t["datatype"], t["shape"], t["parameters"]) for t in our_header["inputs"]] == [
        (t["name"], t["datatype"], t["shape"], t["parameters"]) for t in their_header["inputs"]
    ]


def answer(outputs: list[tuple[dict[str, Any], bytes | None]]) -> tuple[bytes, int]:
    """A response body: the JSON header, then the binary outputs' bytes in order."""
    header = json.dumps({"model_name": "m", "outputs": [o for o, _ in outputs]}).encode()
    return header + b"".join(data for _, data in outputs if data is not None), len(header)


def test_binary_and_json_outputs_decode_in_response_order() -> None:
    floats = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    body, length = answer([
        ({"name": "f", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}, floats.tobytes()),
        ({"name": "nested", "datatype": "INT16", "shape": [2, 2], "data": [[1, -2], [3, 4]]}, None),
        ({"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}},
         length_prefixed([b"ab", b"c"])),
        ({"name": "flags", "datatype": "BOOL", "shape": [3], "data": [True, False, True]}, None),
        ({"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["x", "\u00e9"]}, None),
        ({"name": "half", "datatype": "FP16", "shape": [2], "data": [0.5, -1.25]}, None),
        ({"name": "brain", "datatype": "BF16", "shape": [2], "data": [0.5, 3]}, None),
    ])  # fmt: skip
    out = decode_infer(body, length)
    assert list(out) == ["f", "nested", "s", "flags", "text", "half", "brain"]
    np.testing.assert_array_equal(out["f"], floats)
    np.testing.assert_array_equal(out["nested"], np.array([[1, -2], [3, 4]], np.int16))
    assert out["nested"].dtype == np.int16
    assert out["s"].tolist() == [b"ab", b"c"]
    assert out["flags"].tolist() == [True, False, True] and out["flags"].dtype == np.bool_
    assert out["text"].tolist() == [[b"x", "\u00e9".encode()]]
    assert out["half"].dtype == np.float16 and out["half"].tolist() == [0.5, -1.25]
    assert out["brain"].dtype == ml_dtypes.bfloat16 and out["brain"].astype(np.float32).tolist() == [0.5, 3.0]
    # an all-JSON answer carries no Inference-Header-Content-Length
    body, _ = answer([({"name": "y", "datatype": "INT64", "shape": [2], "data": [2**40, -1]}, None)])
    assert decode_infer(body, None)["y"].tolist() == [2**40, -1]


@pytest.mark.parametrize(
    ("outputs", "tail", "length_shift", "message"),
    [
        ([({"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}, b"")], b"1234",
         0, "runs past the body's end"),
        ([({"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}, bytes(8))],
         b"x", 0, "1 bytes after"),
        ([({"name": "y", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 8}}, bytes(8))],
         b"", 0, "expected 12"),
        ([({"name": "y", "datatype": "FP99", "shape": [1], "data": [1]}, None)], b"", 0, "unknown datatype"),
        ([({"name": "y", "datatype": "INT32", "shape": [3], "data": [1, 2]}, None)], b"", 0, "expected 3"),
        ([({"name": "y", "datatype": "INT32", "shape": [1], "data": [1.5]}, None)], b"", 0, "integers"),
        ([({"name": "y", "datatype": "INT32", "shape": [-1], "data": []}, None)], b"", 0, "negative"),
        ([({"name": "y", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}, bytes(4))],
         b"", 10**6, "outside the body"),
    ],
)  # fmt: skip
def test_malformed_answers_are_refused_with_a_reason(
    outputs: Any, tail: bytes, length_shift: int, message: str
) -> None:
    body, length = answer(outputs)
    with pytest.raises(InvalidTensor, match=message):
        decode_infer(body + tail, length + length_shift)


def test_errors_carry_the_grpc_code_the_status_means_and_the_servers_message() -> None:
    error = error_of(404, b'{"error": "unknown model \'m\'"}')
    assert (error.code, error.http_status, error.message) == (grpc.StatusCode.NOT_FOUND, 404, "unknown model 'm'")
    assert error_of(400, b'{"error": "bad"}').code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(503, b"").code == grpc.StatusCode.UNAVAILABLE and "503" in error_of(503, b"").message
    assert error_of(403, b"Forbidden").code == grpc.StatusCode.PERMISSION_DENIED


def test_json_answers_become_the_grpc_clients_messages() -> None:
    from rapidserve import protos

    stats = proto_of(b'{"model_stats": [{"name": "m", "version": "1", "inference_count": 5, '
                     b'"inference_stats": {"success": {"count": 5, "ns": 1000}}, "new_field": 1}]}',
                     protos.ModelStatisticsResponse)  # fmt: skip
    assert stats.model_stats[0].inference_stats.success.ns == 1000 and stats.model_stats[0].inference_count == 5
    (entry,) = index_of(b'[{"name": "m", "version": "1", "state": "READY", "reason": ""}]')
    assert (entry.name, entry.version, entry.state) == ("m", "1", "READY")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost:8000", ("localhost", 8000, False, "")),
        ("https://example.org", ("example.org", 443, True, "")),
        ("http://[::1]:9/prefix/", ("::1", 9, False, "/prefix")),
    ],
)
def test_urls(url: str, expected: tuple[Any, ...]) -> None:
    endpoint = parse_url(url)
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.prefix) == expected


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "http://h:99999", "http://h/?q=1", "ftp://h"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        parse_url(url)


def test_the_bench_numbers_distinct_http_requests_where_the_server_reads_the_first_input() -> None:
    batch = {"x": np.zeros((1, 4), np.float32), "y": np.ones((1, 2), np.int32)}
    payloads = Payloads("m", "2", [batch], duplicate_ratio=0.0, http=HttpTarget("h:1", "/p", (("k", "v"),), 5000))
    numbers = []
    for index in range(3):
        request = payloads.get(index)
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /p/v2/models/m/versions/2/infer HTTP/1.1"
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        assert fields[b"Host"] == b"h:1" and fields[b"k"] == b"v" and int(fields[b"Content-Length"]) == len(body)
        header, (x, y) = split(body, int(fields[b"Inference-Header-Content-Length"]))
        assert header["parameters"]["timeout"] == 5000
        assert np.frombuffer(y, "<i4").tolist() == [1, 1]
        first, second, *rest = np.frombuffer(x, "<f4").tolist()
        assert rest == [0, 0]
        numbers.append(first + second * 2**24)
    assert numbers[1] == numbers[0] + 1 and numbers[2] == numbers[1] + 1


async def _serve_raw(pieces: list[bytes]) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    """A server that answers each request with the next answer in ``pieces`` (each sent in 3-byte bits)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            received.append(await reader.readuntil(b"\r\n\r\n"))
            for i in range(0, len(piece), 3):
                writer.write(piece[i : i + 3])
                await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def test_the_bench_connection_reads_sized_and_chunked_answers_sent_in_pieces() -> None:
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: x\r\n\r\nhello"
    chunked = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    closing = b"HTTP/1.1 503 Unavailable\r\nConnection: close\r\ncontent-length: 0\r\n\r\n"

    async def main() -> None:
        server, port, received = await _serve_raw([sized, chunked, closing])
        async with server:
            connection = await Http1Connection.open("127.0.0.1", port)
            request = request_head("GET", "/v2/health/ready", f"127.0.0.1:{port}", [("a", "b")], 0)
            assert await connection.send(request) == (200, b"hello")
            assert await connection.send(request) == (400, b"abcde")
            assert await connection.send(request) == (503, b"")
            assert connection.closed
            with pytest.raises(ConnectionError):
                await connection.send(request)
            await connection.wait_closed()
        assert received[0] == request and len(received) == 3

    asyncio.run(main())


def test_the_bench_pool_opens_connections_up_to_its_limit_and_then_queues() -> None:
    from rapidserve.clients.bench.http_transport import HttpUnary

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        release = asyncio.Event()
        connections = 0
        finished: list[asyncio.StreamWriter] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while await reader.readuntil(b"\r\n\r\n"):
                    await release.wait()
                    writer.write(answer)
            writer.close()
            finished.append(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            pool = await HttpUnary.open(lambda: Http1Connection.open("127.0.0.1", port), 1, None, max_connections=3)
            request = request_head("GET", "/", f"127.0.0.1:{port}", [], 0)
            calls = [asyncio.create_task(pool.send(request, i)) for i in range(7)]
            while connections < 3:
                await asyncio.sleep(0.01)
            release.set()
            assert await asyncio.gather(*calls) == ["OK"] * 7
            assert connections == 3  # seven requests, never more than three connections
            await pool.close()
            while len(finished) < connections:  # each handler saw its connection end
                await asyncio.sleep(0.01)

    asyncio.run(main())
