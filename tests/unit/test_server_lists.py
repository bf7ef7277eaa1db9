"""Several servers (replicas) for one client: ``rapidserve bench --url a,b,c`` checks the list before any
load, spreads requests round-robin over the servers and adds up every server's statistics; ``Client`` and
``AsyncClient`` given a list call the servers in turn."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from testmodels import ONNX_TYPES, scale_graph, write_model

from rapidserve import AsyncClient, Client
from rapidserve.cli import main
from rapidserve.clients.bench.server_stats import ServerStats
from rapidserve.clients.bench.transports import RoundRobin

pytestmark = pytest.mark.timeout(120)
FAST = ["--measurement-interval", "300", "--warmup-s", "0.2", "--stability-percentage", "1000", "--max-trials", "3",
        "--quiet"]  # fmt: skip
CONFIG = "max_batch_size: 8\nresponse_cache { enable: true }\n"


@pytest.mark.parametrize(
    ("url", "protocol", "message"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", [], "an empty entry in the list of servers"),
        ("127.0.0.1:1,", [], "an empty entry in the list of servers"),
        ("http://127.0.0.1:1,http://127.0.0.1:2", [], "several servers in --url: over gRPC only"),
        ("127.0.0.1:1,127.0.0.1:2", ["--protocol", "http"], "several servers in --url: over gRPC only"),
    ],
)
def test_a_bad_list_of_servers_is_refused_before_any_connection(
    url: str, protocol: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "m", "--url", url, *protocol]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and err.count("\n") == 0, err


def test_a_list_with_spaces_gets_as_far_as_its_first_server(capsys: pytest.CaptureFixture[str]) -> None:
    """The control: a well-formed list is accepted, and the metadata is asked of its first server."""
    assert main(["bench", "m", "--url", "127.0.0.1:1, 127.0.0.1:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "127.0.0.1:1" in err and "127.0.0.1:2" not in err, err


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.closed = False

    async def send(self, payload: bytes, index: int) -> str:
        self.sent.append((payload, index))
        return "OK"

    async def close(self) -> None:
        self.closed = True


def test_round_robin_sends_request_i_to_server_i_mod_n_numbered_as_its_own() -> None:
    servers = [_Recorder() for _ in range(3)]
    spread = RoundRobin(servers)

    async def drive() -> None:
        for i in range(8):
            assert await spread.send(b"request %d" % i, i) == "OK"
        await spread.close()

    asyncio.run(drive())
    assert [[payload for payload, _ in s.sent] for s in servers] == [
        [b"request 0", b"request 3", b"request 6"],
        [b"request 1", b"request 4", b"request 7"],
        [b"request 2", b"request 5"],
    ]
    assert [[index for _, index in s.sent] for s in servers] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    assert all(s.closed for s in servers)


def _successes(url: str) -> int:
    with Client(url) as client:
        return int(client.model_statistics("scale").model_stats[0].inference_stats.success.count)


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["unary", "streaming"])
def test_bench_spreads_its_requests_evenly_over_the_servers_listed(
    tmp_path: Path, serve: Any, streaming: list[str]
) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", ONNX_TYPES["FP32"], 2.0), "max_batch_size: 8\n")
    a, b, left_out = (serve(tmp_path) for _ in range(3))
    concurrency = 4
    out = tmp_path / "bench.json"
    assert main(["bench", "scale", "--url", f"{a.url},{b.url}", "--concurrency", str(concurrency), *streaming,
                 *FAST, "--out", str(out)]) == 0  # fmt: skip
    counts = [_successes(a.url), _successes(b.url)]
    assert min(counts) > 0 and _successes(left_out.url) == 0
    # request i went to server i mod 2; the last few in flight may have been cancelled at the end
    assert abs(counts[0] - counts[1]) <= concurrency + 1, counts


def test_server_side_columns_add_up_every_server(tmp_path: Path, serve: Any) -> None:
    """Known traffic, in batches of known rows, on two servers: the averages are over both together
    (each server's alone would differ: 1 and 2.5 inferences per execution, 1/2 and 0 hits per lookup)."""
    write_model(tmp_path, "scale", scale_graph("scale", ONNX_TYPES["INT64"], 3), CONFIG)
    a, b = serve(tmp_path), serve(tmp_path)
    stats = ServerStats(f"{a.url},{b.url}", "scale", "")
    stats.start()
    rows = [np.arange(4 * n, dtype=np.int64).reshape(n, 4) for n in (1, 2, 3)]
    with Client(a.url) as client:
        client.infer("scale", {"x": rows[0]})  # a miss, computed
        client.infer("scale", {"x": rows[0]})  # a hit: neither an execution nor (statistics) an inference
    with Client(b.url) as client:
        client.infer("scale", {"x": rows[1]})
        client.infer("scale", {"x": rows[2]})
    delta = stats.delta()
    assert delta["server_avg_batch"] == pytest.approx((1 + 2 + 3) / 3)
    assert delta["server_cache_hit_ratio"] == pytest.approx(1 / 4)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", "an empty server address"),
        ([], "an empty server address"),
        (["http://127.0.0.1:1", "http://127.0.0.1:2"], "gRPC addresses (HOST:PORT) only"),
    ],
)
def test_a_client_refuses_a_bad_list_of_servers(url: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Client(url)


@pytest.mark.parametrize("as_list", [False, True], ids=["commas", "list"])
def test_clients_call_the_servers_in_turn(tmp_path: Path, serve: Any, as_list: bool) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", ONNX_TYPES["INT64"], 3), "max_batch_size: 8\n")
    a, b = serve(tmp_path), serve(tmp_path)
    servers: str | list[str] = [a.url, b.url] if as_list else f"{a.url},{b.url}"
    x = np.arange(4, dtype=np.int64).reshape(1, 4)
    with Client(servers) as client:
        for _ in range(4):
            np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)
    assert (_successes(a.url), _successes(b.url)) == (2, 2)

    async def infer_async(streaming: bool) -> None:
        async with AsyncClient(servers, streaming=streaming) as client:
            answers = await asyncio.gather(*(client.infer("scale", {"x": x + i}) for i in range(6)))
        for i, answer in enumerate(answers):
            np.testing.assert_array_equal(answer["y"], (x + i) * 3)

    asyncio.run(infer_async(streaming=True))
    assert (_successes(a.url), _successes(b.url)) == (5, 5)  # one stream per server, requests in turn
    asyncio.run(infer_async(streaming=False))
    assert (_successes(a.url), _successes(b.url)) == (8, 8)


async def _unary_only_server(answered: list[str]) -> tuple[Any, str]:
    """A server with ModelInfer alone (ModelStreamInfer is UNIMPLEMENTED), appending its name per call;
    it echoes no tensors, so its answers decode to no outputs."""
    import grpc

    from rapidserve import protos

    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    url = f"127.0.0.1:{port}"

    async def model_infer(request: Any, context: Any) -> Any:
        assert request.id == "mine", "the caller's request id"
        answered.append(url)
        return protos.ModelInferResponse(model_name=request.model_name, id=request.id)

    handler = grpc.unary_unary_rpc_method_handler(
        model_infer,
        request_deserializer=protos.ModelInferRequest.FromString,
        response_serializer=protos.ModelInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(protos.SERVICE_NAME, {"ModelInfer": handler}),)
    )
    await server.start()
    return server, url


def test_a_stream_refused_by_a_server_is_retried_unary_on_that_same_server() -> None:
    async def scenario() -> list[str]:
        answered: list[str] = []
        (a, url_a), (b, url_b) = await _unary_only_server(answered), await _unary_only_server(answered)
        try:
            async with AsyncClient([url_a, url_b], streaming=True) as client:
                for _ in range(3):
                    await client.infer("m", {"x": np.zeros((1, 2), np.float32)}, request_id="mine")
        finally:
            await a.stop(None)
            await b.stop(None)
        return [("a" if url == url_a else "b") for url in answered]

    # the first call's stream goes to a and is refused: its unary retry goes to a too, then b, a in turn
    assert asyncio.run(scenario()) == ["a", "b", "a"]
