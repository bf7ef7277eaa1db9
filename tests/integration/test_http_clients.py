"""``Client``, ``AsyncClient``, ``rapidserve infer|health`` and ``rapidserve bench --protocol http`` against a
real server's HTTP/REST port: the same results and errors as over its gRPC port, TLS, restricted APIs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from testmodels import ALL_DATATYPES, ONNX_TYPES, build_repository, scale_graph, slow_graph, write_model

from rapidserve import AsyncClient, Client, InferenceServerError
from rapidserve.cli import main
from rapidserve.server.settings import TlsSettings

pytestmark = [pytest.mark.timeout(300), pytest.mark.frontends(1, 2)]
FAST = ["--measurement-interval", "300", "--warmup-s", "0.2", "--stability-percentage", "1000", "--max-trials", "3",
        "--quiet"]  # fmt: skip
SCALE_CONFIG = 'max_batch_size: 8\ndynamic_batching { }\nparameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import ServerThread

    from rapidserve.server.settings import ServerSettings

    repo = build_repository(tmp_path_factory.mktemp("http-clients"))
    write_model(repo, "scale", scale_graph("scale", ONNX_TYPES["FP32"], 2.0), SCALE_CONFIG)
    write_model(repo, "cached", scale_graph("cached", ONNX_TYPES["FP32"], 2.0),
                SCALE_CONFIG + "response_cache { enable: true }\n")  # fmt: skip
    thread = ServerThread(
        ServerSettings(model_repositories=(repo,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    ).start()
    yield thread
    thread.stop()


def http_url(server: Any) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def every_datatype(rows: int = 2) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)
    inputs = {}
    for datatype in ALL_DATATYPES:
        if datatype == "BF16":
            continue
        if datatype == "BYTES":
            array = np.array([[f"s{i}{j}\u00e9".encode() for j in range(3)] for i in range(rows)], dtype=object)
        elif datatype == "BOOL":
            array = rng.integers(0, 2, (rows, 3)).astype(bool)
        else:
            from rapidserve.common.datatypes import numpy_dtype

            array = rng.integers(0, 100, (rows, 3)).astype(numpy_dtype(datatype))
        inputs[f"in_{datatype}"] = array
    return inputs


def test_every_datatype_round_trips_through_identity_as_over_grpc(server: Any) -> None:
    inputs = every_datatype()
    with Client(http_url(server)) as http, Client(server.url) as grpc_client:
        out = http.infer("identity", inputs)
        same = grpc_client.infer("identity", inputs)
    assert sorted(out) == sorted(f"out_{name[3:]}" for name in inputs)
    for name, array in inputs.items():
        got = out[f"out_{name[3:]}"]
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tolist() == array.tolist() == same[f"out_{name[3:]}"].tolist()
    bf16 = {"in_BF16": np.array([[1.5, -2.0, 0.25]], ml_dtypes.bfloat16), "in_FP32": np.ones((1, 3), np.float32)}
    with Client(http_url(server)) as http:
        assert http.infer("identity_bf16", bf16, ["out_BF16"])["out_BF16"].tolist() == [[1.5, -2.0, 0.25]]


def test_json_tensors_round_trip_every_datatype_like_binary_ones(server: Any) -> None:
    inputs = every_datatype()
    with Client(http_url(server), binary_data=False) as json_client, Client(http_url(server)) as binary:
        out = json_client.infer("identity", inputs)
        assert {k: v.tolist() for k, v in out.items()} == {
            k: v.tolist() for k, v in binary.infer("identity", inputs).items()
        }
        assert all(out[f"out_{name[3:]}"].dtype == array.dtype for name, array in inputs.items())
        bf16 = {"in_BF16": np.array([[1.5, -2.0, 0.25]], ml_dtypes.bfloat16), "in_FP32": np.ones((1, 3), np.float32)}
        assert json_client.infer("identity_bf16", bf16, ["out_BF16"])["out_BF16"].tolist() == [[1.5, -2.0, 0.25]]
        with pytest.raises(ValueError, match="not UTF-8"):
            json_client.infer("strings", {"text": np.array([b"\xff"], dtype=object)})
    with pytest.raises(ValueError, match="http://"):
        Client(server.url, binary_data=False)


def test_add_sub_and_the_outputs_asked_for(server: Any) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    y = np.full((2, 16), 0.5, np.float32)
    with Client(http_url(server)) as client:
        both = client.infer("add_sub", {"INPUT0": x, "INPUT1": y}, request_id="r")
        only = client.infer("add_sub", {"INPUT0": x, "INPUT1": y}, ["OUTPUT1"], version="1")
    np.testing.assert_array_equal(both["OUTPUT0"], x + y)
    np.testing.assert_array_equal(both["OUTPUT1"], x - y)
    assert list(only) == ["OUTPUT1"]
    np.testing.assert_array_equal(only["OUTPUT1"], x - y)


def test_metadata_config_index_and_health_equal_the_grpc_answers(server: Any) -> None:
    with Client(http_url(server)) as http, Client(server.url) as grpc_client:
        assert http.is_server_live() and http.is_server_ready()
        assert http.is_model_ready("add_sub") and not http.is_model_ready("nope")
        assert http.is_model_ready("add_sub", "7") == grpc_client.is_model_ready("add_sub", "7")
        for model in ("add_sub", "identity", "strings"):
            assert http.model_metadata(model) == grpc_client.model_metadata(model)
            assert http.model_config(model) == grpc_client.model_config(model)
        assert http.server_metadata() == grpc_client.server_metadata()
        assert list(http.repository_index()) == list(grpc_client.repository_index())
        assert list(http.repository_index(ready_only=True)) == list(grpc_client.repository_index(ready_only=True))


def test_statistics_count_http_calls_like_grpc_reads_them(server: Any) -> None:
    x = {"x": np.ones((3, 4), np.float32)}
    with Client(http_url(server)) as http, Client(server.url) as grpc_client:
        before = grpc_client.model_statistics("scale").model_stats[0]
        for _ in range(5):
            np.testing.assert_array_equal(http.infer("scale", x)["y"], 2 * x["x"])
        over_http = http.model_statistics("scale")
        over_grpc = grpc_client.model_statistics("scale")
        everything = http.model_statistics()
    assert over_http == over_grpc
    stats = over_http.model_stats[0]
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 5
    assert stats.inference_count - before.inference_count == 15
    assert "scale" in {s.name for s in everything.model_stats}


def test_errors_are_the_grpc_codes_with_the_http_status(server: Any) -> None:
    x = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
    with Client(http_url(server)) as http, Client(server.url) as grpc_client:
        for call in (lambda c: c.infer("nope", x), lambda c: c.infer("add_sub", {"INPUT0": x["INPUT0"]}),
                     lambda c: c.infer("add_sub", {**x, "INPUT1": np.ones((1, 15), np.float32)}),
                     lambda c: c.model_metadata("nope")):  # fmt: skip
            with pytest.raises(InferenceServerError) as over_http:
                call(http)
            with pytest.raises(InferenceServerError) as over_grpc:
                call(grpc_client)
            assert over_http.value.code == over_grpc.value.code
            assert over_http.value.message == over_grpc.value.message
            assert over_http.value.http_status in (400, 404) and over_grpc.value.http_status is None
        assert http.is_server_live()  # the connection is still usable after error answers


def test_one_client_serves_many_threads_and_outlives_the_servers_idle_timeout(serve: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "scale", scale_graph("scale", ONNX_TYPES["FP32"], 2.0), SCALE_CONFIG)
    server = serve(repo, http_keepalive_timeout_s=0.1)
    with Client(http_url(server)) as client, ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda i: client.infer("scale", {"x": np.full((1, 4), i, np.float32)})["y"], range(32)))
        for i, output in enumerate(outputs):
            np.testing.assert_array_equal(output, np.full((1, 4), 2 * i, np.float32))
        time.sleep(1)  # ten idle timeouts: the server has closed the connections kept for reuse
        assert client.is_server_live()  # sent again on a fresh connection, not an error


def test_max_message_bytes_bounds_requests_and_answers_as_over_grpc(server: Any) -> None:
    small = {"x": np.ones((1, 4), np.float32)}
    large = {"x": np.ones((64, 4), np.float32)}  # 1 KiB of data, a 1 KiB answer
    for url in (http_url(server), server.url):
        with Client(url, max_message_bytes=600) as client:
            np.testing.assert_array_equal(client.infer("scale", small)["y"], 2 * small["x"])
            with pytest.raises(InferenceServerError) as error:
                client.infer("scale", large)
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def answer_too_large() -> None:
        async with AsyncClient(http_url(server), max_message_bytes=200) as client:
            await client.model_config("add_sub")  # a GET with no body; the config's JSON is longer

    with pytest.raises(InferenceServerError) as error:
        asyncio.run(answer_too_large())
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "answer" in error.value.message


def test_a_call_past_its_deadline_is_deadline_exceeded_and_a_timeout_on_the_server_as_over_grpc(
    serve: Any, tmp_path: Path
) -> None:
    config = (
        "max_batch_size: 8\ndynamic_batching { default_queue_policy { allow_timeout_override: true } }\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    )
    write_model(tmp_path, "slow", slow_graph(repeats=400), config)  # one call alone outlasts the 50 ms timeout
    server = serve(tmp_path)
    deadline_passes_in_the_queue(server, http_url(server), server_counts=False)
    deadline_passes_in_the_queue(server, server.url, server_counts=True)


def deadline_passes_in_the_queue(server: Any, url: str, server_counts: bool) -> None:
    """A long call holds the model's only instance, so a short one waits in the queue past its deadline,
    which HTTP carries as the 'timeout' parameter and gRPC as the call's deadline. Over HTTP a 2 ms call
    may give up before its body has reached the server (a loaded machine), so only the gRPC run checks
    the server's count."""
    model = server.server.manager.get("slow")
    x = {"x": np.ones((1, 256, 256), np.float32)}  # tens of ms a call on one thread; the long one, 8 times that
    long = {"x": np.ones((8, 256, 256), np.float32)}
    before = model_failures(server)
    with Client(server.url) as blocker_client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(lambda: blocker_client.infer("slow", long, timeout_s=60))
        wait_for(lambda: model.executions_in_flight > 0 or blocker.done())
        # where the server must count it, the call lives long enough to reach the model's queue (a 2 ms call
        # may expire in the edge's or the kernel's queues on a loaded machine), and far less than the blocker
        with Client(url, timeout_s=0.05 if server_counts else 0.002) as client:
            with pytest.raises(InferenceServerError) as error:
                client.infer("slow", x)
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            blocker.result()
            if server_counts:
                wait_for(lambda: model_failures(server) > before)  # the server gave up on it as well
            assert client.infer("slow", x, timeout_s=60)["y"].shape == (1, 256, 256)
    if server_counts:
        assert model_failures(server) == before + 1


def model_failures(server: Any) -> int:
    with Client(server.url) as client:
        return int(client.model_statistics("slow").model_stats[0].inference_stats.fail.count)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_nothing_listening_is_unavailable() -> None:
    with pytest.raises(InferenceServerError) as error, Client("http://127.0.0.1:1") as client:
        client.is_server_live()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in error.value.message


def test_async_client_runs_concurrent_calls_each_with_its_own_answer(server: Any) -> None:
    async def run() -> list[np.ndarray[Any, Any]]:
        async with AsyncClient(http_url(server), timeout_s=30) as client:
            assert await client.is_server_ready() and await client.is_model_ready("scale")
            assert (await client.model_metadata("scale")).name == "scale"
            assert (await client.model_config("scale")).max_batch_size == 8
            calls = [client.infer("scale", {"x": np.full((1, 4), i, np.float32)}) for i in range(16)]
            with pytest.raises(InferenceServerError) as error:
                await client.infer("nope", {"x": np.ones((1, 4), np.float32)})
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            return [out["y"] for out in await asyncio.gather(*calls)]

    for i, output in enumerate(asyncio.run(run())):
        np.testing.assert_array_equal(output, np.full((1, 4), 2 * i, np.float32))


def test_load_and_unload_over_http(serve: Any, tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo")
    server = serve(repo, model_control_mode="explicit", load_models=("add_sub",))
    with Client(http_url(server)) as client:
        assert client.is_model_ready("add_sub") and not client.is_model_ready("int64_triple")
        client.load_model("int64_triple")
        assert client.infer("int64_triple", {"x": np.array([[1, 2, 3, 4]], np.int64)})["y"].tolist() == [[3, 6, 9, 12]]
        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        with pytest.raises(InferenceServerError) as error:
            client.load_model("nope")
        assert error.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_https_with_the_servers_ca_and_restricted_apis_with_headers(serve: Any, pki: Any, tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo")
    tls = TlsSettings(pki.server_cert, pki.server_key)
    server = serve(repo, http_tls=tls, http_restricted_api=((("inference",), "infer-key", "s3cret"),))
    url = f"https://localhost:{server.server.http_port}"
    x = {"x": np.ones((1, 4), np.int64)}
    with Client(url, root_certificates=pki.ca, ssl=True, headers={"infer-key": "s3cret"}) as client:
        assert client.infer("int64_triple", x)["y"].tolist() == [[3, 3, 3, 3]]
    with Client(url, root_certificates=pki.ca, ssl=True) as client:
        assert client.is_server_ready()  # health is not restricted
        with pytest.raises(InferenceServerError) as error:
            client.infer("int64_triple", x)
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED and error.value.http_status == 403

    async def over_aiohttp() -> list[list[int]]:
        async with AsyncClient(url, root_certificates=pki.ca, ssl=True, headers={"infer-key": "s3cret"}) as client:
            return (await client.infer("int64_triple", x))["y"].tolist()

    assert asyncio.run(over_aiohttp()) == [[3, 3, 3, 3]]
    with pytest.raises(InferenceServerError) as error, Client(url) as client:  # the system's CAs: not ours
        client.is_server_live()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "certificate" in error.value.message.lower()
    with pytest.raises(ValueError, match="https://"):
        Client(f"http://localhost:{server.server.http_port}", ssl=True)


def test_the_infer_and_health_commands_take_an_http_url(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--url", http_url(server)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--url", "http://127.0.0.1:1", "--timeout-s", "2"]) == 1
    assert "unhealthy: UNAVAILABLE" in capsys.readouterr().err
    assert main(["infer", "add_sub", "--url", http_url(server), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "OUTPUT0 float32 [2, 16]" in printed and "OUTPUT1 float32 [2, 16]" in printed
    assert main(["infer", "nope", "--url", http_url(server)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


RATE = 200  # the open loops' requests per second, at constant gaps
WARMUP_S, MEASURED_S = 0.2, 3 * 0.3  # FAST: the warm-up, then three 300 ms windows


def scale_successes(server: Any) -> int:
    with Client(server.url) as client:
        return int(client.model_statistics("scale").model_stats[0].inference_stats.success.count)


def assert_open_loop(row: dict[str, Any], server: Any, successes_before: int) -> None:
    """What an open loop shows even on a loaded 2-core machine: no errors, every answer it counted run by
    the server, a rate well above nothing, and no more answers than the schedule sent in the whole run
    (warm-up included) over the measured windows."""
    answered = round(row["requests_per_s"] * MEASURED_S)
    assert row["errors"] == {}
    assert scale_successes(server) - successes_before >= answered
    assert 20 < row["requests_per_s"] <= (RATE * (WARMUP_S + MEASURED_S) + 2) / MEASURED_S


def test_bench_closed_and_open_loops_over_http(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "closed.json"
    assert main(["bench", "scale", "--protocol", "http", "--url", f"127.0.0.1:{server.server.http_port}",
                 "--concurrency", "1,4", *FAST, "--out", str(out)]) == 0  # fmt: skip
    assert "HTTP/1.1 keep-alive" in capsys.readouterr().out
    for row in rows(out):
        assert row["protocol"] == "http" and row["infer_per_s"] > 0 and row["errors"] == {}
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["server_avg_batch"] >= 1
    out = tmp_path / "open.json"
    before = scale_successes(server)
    assert main(["bench", "scale", "--url", http_url(server), "--request-rate", str(RATE), "-b", "4", *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    assert row["protocol"] == "http"
    assert_open_loop(row, server, before)
    assert row["infer_per_s"] == pytest.approx(4 * row["requests_per_s"])


@pytest.mark.parametrize("ratio", [0.0, 0.9])
def test_bench_duplicates_over_http_are_what_the_cache_sees(server: Any, tmp_path: Path, ratio: float) -> None:
    out = tmp_path / "dup.json"
    assert main(["bench", "cached", "--url", http_url(server), "--concurrency", "2", "--duplicate-ratio", str(ratio),
                 *FAST, "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    assert row["server_cache_hit_ratio"] == pytest.approx(ratio, abs=0.08)


def test_bench_counts_http_errors_by_grpc_code(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    assert main(["bench", "scale", "--url", http_url(server), "--shape", "x:9,5", *FAST, "--out", str(out)]) == 0
    (row,) = rows(out)
    assert row["errors"].get("INVALID_ARGUMENT", 0) > 0 and row["requests_per_s"] == 0


def test_bench_worker_processes_over_http_add_up(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    before = scale_successes(server)
    assert main(["bench", "scale", "--url", http_url(server), "--request-rate", str(RATE), "--workers", "2", *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    assert_open_loop(row, server, before)
