"""/metrics and the statistics RPC after a known load: exact counts, and latencies that agree with
what clients measured."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from workload import Expected, build_workload_repository, run_workload

from rapidserve import Client

pytestmark = [pytest.mark.timeout(180), pytest.mark.frontends(1, 2)]

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name].get(frozenset(labels.items()), 0.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    """One server after the workload: (server, expected counts, /metrics samples)."""
    from conftest import ServerThread

    from rapidserve.server.settings import ServerSettings

    repo = build_workload_repository(tmp_path_factory.mktemp("metrics"))
    settings = ServerSettings(model_repositories=(repo,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    server = ServerThread(settings).start()
    request.addfinalizer(server.stop)
    expected = run_workload(server.url)
    return server, expected, scrape(server.metrics_url)


MODELS = ("scale", "cached", "slow_full", "slow_timeout", "reshape")


def test_every_counter_equals_what_the_clients_saw(loaded: tuple[Any, Expected, Samples]) -> None:
    _, expected, samples = loaded
    # the workload reached every reason, so each is checked below
    assert {reason for _, reason in expected.failures} == {
        "invalid", "rejected", "timeout", "engine_error", "not_found",
    }  # fmt: skip
    for model in MODELS:
        labels = {"model": model, "version": "1"}
        assert value(samples, "rapidserve_request_success_total", **labels) == expected.success[model], model
        assert value(samples, "rapidserve_inference_total", **labels) == expected.inferences[model], model
        hits = value(samples, "rapidserve_cache_hit_total", **labels)
        misses = value(samples, "rapidserve_cache_miss_total", **labels)
        assert hits + misses == expected.cache_lookups[model] and hits >= expected.cache_hits[model], model
        # one histogram sample and one summary count per successful request
        assert value(samples, "rapidserve_request_duration_seconds_count", **labels) == expected.success[model]
        assert value(samples, "rapidserve_request_latency_seconds_count", **labels) == expected.success[model]
        assert value(samples, "rapidserve_model_ready", **labels) == 1
        assert value(samples, "rapidserve_queue_pending_requests", **labels) == 0
    reported = {
        (dict(labels)["model"], dict(labels)["reason"]): count
        for labels, count in samples["rapidserve_request_failure_total"].items()
        if count  # every version also reports each reason from zero
    }
    assert reported == dict(expected.failures)
    # unknown models and versions carry no model label
    assert value(samples, "rapidserve_request_failure_total", model="", version="", reason="not_found") == 4


def test_batches_and_cache_gauges_add_up(loaded: tuple[Any, Expected, Samples]) -> None:
    _, expected, samples = loaded
    scale = {"model": "scale", "version": "1"}
    executions = value(samples, "rapidserve_execution_total", **scale)
    assert 1 <= executions <= expected.success["scale"]
    assert value(samples, "rapidserve_batch_size_count", **scale) == executions
    assert value(samples, "rapidserve_batch_size_sum", **scale) == expected.inferences["scale"]
    assert value(samples, "rapidserve_compute_infer_duration_seconds_count", **scale) == executions
    cached = {"model": "cached", "version": "1"}
    assert value(samples, "rapidserve_execution_total", **cached) == 2  # one per distinct input: misses run once
    assert value(samples, "rapidserve_cache_entries") == 2
    assert 0 < value(samples, "rapidserve_cache_bytes") <= value(samples, "rapidserve_cache_capacity_bytes")
    assert value(samples, "rapidserve_process_resident_memory_bytes") > 0
    assert value(samples, "rapidserve_process_cpu_seconds_total") > 0


def test_tritonclient_statistics_show_the_same_numbers(loaded: tuple[Any, Expected, Samples]) -> None:
    server, expected, samples = loaded
    client = tc.InferenceServerClient(server.url)
    try:
        for model in MODELS:
            stats = client.get_inference_statistics(model).model_stats[0]
            inference = stats.inference_stats
            failed = sum(n for (m, _), n in expected.failures.items() if m == model)
            labels = {"model": model, "version": "1"}
            hits = value(samples, "rapidserve_cache_hit_total", **labels)
            joins = value(samples, "rapidserve_cache_join_total", **labels)
            assert inference.success.count == expected.success[model], model
            assert inference.fail.count == failed, model
            assert (
                inference.cache_hit.count == hits and inference.cache_miss.count == expected.cache_lookups[model] - hits
            )
            assert inference.queue.count == expected.success[model]  # hits and joins count, with no queue time
            # compute time counts once per executed request; hits, joins and failures are left out
            executed = expected.success[model] - hits - joins
            assert inference.compute_infer.count == executed, model
            shared_rows = (hits + joins) * (2 if model == "cached" else 1)
            assert stats.inference_count == expected.inferences[model] - shared_rows, model
            assert stats.execution_count == value(samples, "rapidserve_execution_total", model=model, version="1"), (
                model
            )
            assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    finally:
        client.close()


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (le, count) pairs: linear within a bucket."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def test_latency_percentiles_agree_with_what_a_client_measured(tmp_path: Path, serve) -> None:
    from testmodels import slow_graph, write_model

    write_model(tmp_path, "slow", slow_graph(repeats=400), "max_batch_size: 1")  # ~40 ms: the RPC is a small part
    server = serve(tmp_path)
    x = np.ones((1, 256, 256), np.float32)
    measured = []
    with Client(server.url) as client:
        for _ in range(31):  # (the first connects: measured too, as the server counts it)
            start = time.perf_counter()
            client.infer("slow", {"x": x})
            measured.append(time.perf_counter() - start)
    samples = scrape(server.metrics_url)
    labels = {"model": "slow", "version": "1"}
    buckets = sorted(
        (float(dict(key)["le"]), count)
        for key, count in samples["rapidserve_request_duration_seconds_bucket"].items()
        if dict(key)["model"] == "slow"
    )
    bounds = [b for b, _ in buckets]
    for q in (0.5, 0.9):
        client_q = float(np.quantile(measured, q))
        # Each request's server time is at most what its client measured (which adds the RPC), and the
        # two measured the same requests, so the server's k-th smallest time is at most the client's:
        # each server quantile is at most the client's sample at the rank it picks, or the one above it
        # ("higher"): the histogram's within that sample's bucket, the window's (1% accurate) within 2%.
        # The RPC is a small part of these ~40 milliseconds, so the server's figures are more than half
        # the client's even on a loaded machine: a unit or bucket error would be far off either bound.
        client_rank = float(np.quantile(measured, q, method="higher"))
        upper = next(b for b in bounds if b >= client_rank)
        histogram = _histogram_quantile(q, buckets)
        assert 0.5 * client_q <= histogram <= upper, (q, histogram, client_q)
        window = value(samples, "rapidserve_request_latency_seconds", **labels, quantile=str(q))
        assert 0.5 * client_q <= window <= 1.02 * client_rank, (q, window, client_rank)


def _wait_for(url: str, name: str, want: float, **labels: str) -> None:
    deadline = time.monotonic() + 20
    while value(scrape(url), name, **labels) != want:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {want}"
        time.sleep(0.01)


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_queued_call_that_is_cancelled_or_times_out_counts_under_its_reason(tmp_path: Path, serve, ending) -> None:
    import threading

    import grpc
    from testmodels import slow_graph, write_model

    from rapidserve import protos
    from rapidserve.common import codec

    write_model(tmp_path, "slow", slow_graph(repeats=1000), "max_batch_size: 8")  # one instance: B waits behind A
    server = serve(tmp_path)
    labels = {"model": "slow", "version": "1"}
    big = np.ones((8, 256, 256), np.float32)  # over half a second of work: time for the scrapes below
    with Client(server.url) as client, grpc.insecure_channel(server.url) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        client.infer("slow", {"x": big[:1]})  # connect and warm up
        infer = channel.unary_unary(
            protos.method_path("ModelInfer"),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=protos.ModelInferResponse.FromString,
        )
        busy = threading.Thread(target=client.infer, args=("slow", {"x": big}))  # A
        busy.start()
        _wait_for(server.metrics_url, "rapidserve_executions_in_flight", 1, **labels)
        try:
            if ending == "cancel":
                call = infer.future(codec.encode_request("slow", {"x": big}))
                _wait_for(server.metrics_url, "rapidserve_queue_pending_requests", 1, **labels)
                assert call.cancel()
            else:
                with pytest.raises(grpc.RpcError) as info:
                    infer(codec.encode_request("slow", {"x": big}), timeout=0.1)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            reason = "cancelled" if ending == "cancel" else "timeout"
            _wait_for(server.metrics_url, "rapidserve_request_failure_total", 1, **labels, reason=reason)
        finally:
            busy.join()
        samples = scrape(server.metrics_url)
        other = "timeout" if ending == "cancel" else "cancelled"
        assert value(samples, "rapidserve_request_failure_total", **labels, reason=other) == 0
        assert client.model_statistics("slow").model_stats[0].inference_stats.fail.count == 1


HELD = "rapidserve_test_held"  # a module the test registers; the model below reaches it by import
# x FP32 [batch, 4] -> y = x; a batch holding a negative input waits in execute until the test releases it
HELD_MODEL = f"""
    import triton_python_backend_utils as pb_utils
    import {HELD} as held


    class TritonPythonModel:
        def execute(self, requests):
            inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
            if min(x.min() for x in inputs) < 0:
                held.entered.set()
                held.release.wait(60)
            return [pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]) for x in inputs]
"""


@pytest.fixture
def held() -> Iterator[Any]:
    import sys
    import threading
    import types

    module = types.ModuleType(HELD)
    module.entered, module.release = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    sys.modules[HELD] = module
    yield module
    module.release.set()  # type: ignore[attr-defined]
    del sys.modules[HELD]


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_a_running_call_that_is_cancelled_counts_as_cancelled_when_its_client_leaves(
    tmp_path: Path, serve, held: Any, frontends: int, monkeypatch, cached: bool
) -> None:
    """The model runs a request whose client has left to the end (its inputs are in use); it is counted
    as cancelled when the client leaves, and in neither the successes nor their queue and compute times,
    with any number of front ends, with the cache or without. With front ends, the engine tells the front
    end that the request's inputs are free (its answer to it) only once the run that reads them has ended."""
    import grpc
    from testmodels import write_python_model

    from rapidserve import protos
    from rapidserve.common import codec
    from rapidserve.server.frontend.handler import FrontendHandler

    answered_when_released: list[bool] = []  # for each error answer of the engine: was the run over?
    error = FrontendHandler._error

    def recording_error(self: FrontendHandler, seq: int, exc: BaseException) -> None:
        answered_when_released.append(held.release.is_set())
        error(self, seq, exc)

    monkeypatch.setattr(FrontendHandler, "_error", recording_error)
    io = 'input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]\noutput [{ name: "y" data_type: TYPE_FP32 dims: [4] }]\n'
    cache = "response_cache { enable: true }\n" if cached else ""
    write_python_model(tmp_path, "held", HELD_MODEL, f"max_batch_size: 8\n{cache}{io}")
    server = serve(tmp_path)
    labels = {"model": "held", "version": "1"}
    with Client(server.url) as client, grpc.insecure_channel(server.url) as channel:
        np.testing.assert_array_equal(client.infer("held", {"x": np.ones((1, 4), np.float32)})["y"], 1)  # one success
        infer = channel.unary_unary(
            protos.method_path("ModelInfer"),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=protos.ModelInferResponse.FromString,
        )
        call = infer.future(codec.encode_request("held", {"x": -np.ones((1, 4), np.float32)}), timeout=120)
        assert held.entered.wait(30), "the request never reached the model"
        assert call.cancel()
        _wait_for(server.metrics_url, "rapidserve_request_failure_total", 1, **labels, reason="cancelled")
        assert value(scrape(server.metrics_url), "rapidserve_executions_in_flight", **labels) == 1  # still held
        held.release.set()
        _wait_for(server.metrics_url, "rapidserve_executions_in_flight", 0, **labels)
        np.testing.assert_array_equal(client.infer("held", {"x": np.full((2, 4), 3, np.float32)})["y"], 3)
        samples = scrape(server.metrics_url)
        assert value(samples, "rapidserve_request_success_total", **labels) == 2
        assert value(samples, "rapidserve_request_failure_total", **labels, reason="timeout") == 0
        stats = client.model_statistics("held").model_stats[0].inference_stats
        assert (stats.success.count, stats.fail.count, stats.cache_hit.count) == (2, 1, 0)
        assert stats.queue.count == stats.compute_infer.count == 2  # the successes' times only
    assert answered_when_released == ([True] if frontends > 1 else [])


SINGLE_FLIGHT = """max_batch_size: 2
dynamic_batching { max_queue_delay_microseconds: 60000000 }
response_cache { enable: true }
parameters { key: "batching_mode" value: { string_value: "fixed" } }
"""


def test_identical_requests_in_flight_together_compute_once_and_count_as_joins(tmp_path: Path, serve) -> None:
    """Over one stream the server takes requests in order: the first of four identical requests waits in
    the queue (fixed mode, a minute's delay, batches of 2) until a different request fills its batch,
    so the three after it join its computation for certain, whatever the machine's speed."""
    import asyncio

    from testmodels import scale_graph, write_model

    from rapidserve import AsyncClient

    write_model(tmp_path, "once", scale_graph("once", 7, 3), SINGLE_FLIGHT)
    server = serve(tmp_path)
    same = np.arange(4, dtype=np.int64).reshape(1, 4)
    filler = same + 100

    async def send() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(server.url, timeout_s=120) as client:
            calls = [client.infer("once", {"x": same}) for _ in range(4)] + [client.infer("once", {"x": filler})]
            return await asyncio.gather(*calls)

    answers = asyncio.run(send())
    for answer, x in zip(answers, [same] * 4 + [filler], strict=True):
        np.testing.assert_array_equal(answer["y"], x * 3)
    samples = scrape(server.metrics_url)
    labels = {"model": "once", "version": "1"}
    assert value(samples, "rapidserve_cache_join_total", **labels) == 3
    assert value(samples, "rapidserve_cache_hit_total", **labels) == 0
    assert value(samples, "rapidserve_execution_total", **labels) == 1  # one batch: the leader and the filler
    assert value(samples, "rapidserve_request_success_total", **labels) == 5
    with Client(server.url) as client:
        stats = client.model_statistics("once").model_stats[0]
    assert stats.execution_count == 1 and [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(2, 1)]
    assert stats.inference_stats.success.count == 5 and stats.inference_stats.cache_hit.count == 0


@pytest.mark.frontends(1)  # (the check wraps the HTTP edge in this process: a front end is another one)
def test_an_http_call_is_counted_before_its_answer_is_sent(tmp_path: Path, serve, monkeypatch) -> None:
    """A client that has its answer and then scrapes must find its call counted: the HTTP edge counts
    a call when its answer is ready, not after it is written (which left the last call of a run
    uncounted for a moment after its client had it)."""
    from onnx import TensorProto
    from testmodels import scale_graph, write_model

    from rapidserve.server.http import HttpServer

    seen: list[tuple[int, dict[tuple[str, str, bool], int]]] = []
    write = HttpServer._write

    async def counting_write(self: HttpServer, request: Any, response: Any) -> None:
        seen.append((response.status, dict(self._api.stats.calls)))
        await write(self, request, response)

    monkeypatch.setattr(HttpServer, "_write", counting_write)
    write_model(tmp_path, "scale", scale_graph("scale", TensorProto.FLOAT, 2.0), "max_batch_size: 8")
    server = serve(tmp_path)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]})
    calls = [
        ("/v2/models/scale/infer", body, 200, ("http", "inference", True)),
        ("/v2/models/missing/infer", body, 404, ("http", "inference", False)),
        ("/v2/nowhere", None, 404, ("http", "other", False)),
    ]
    for path, data, status, key in calls:
        seen.clear()
        request = urllib.request.Request(f"http://{server.http_url}{path}", data=data and data.encode())
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == status
        except urllib.error.HTTPError as exc:
            assert exc.code == status
        [(written, counted)] = seen
        assert written == status
        assert counted.get(key, 0) == 1, f"{path}: not counted when its answer was written ({counted})"


@pytest.mark.frontends(1)  # (the check reaches into the server's event loop: a front end is another process)
def test_a_failed_grpc_call_is_counted_before_its_status_is_sent(tmp_path: Path, serve, monkeypatch) -> None:
    """gRPC sends an error status from ``abort`` before the handler resumes: the call must be counted
    before that, or its client can have the error while the call is not counted. The server's event
    loop is held from the moment the status goes out, and the count is read while it is held."""
    import asyncio
    import threading

    from onnx import TensorProto
    from testmodels import scale_graph, write_model
    from tritonclient.utils import InferenceServerException

    from rapidserve.server import servicer

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(30)

    message_of = servicer.message_of

    def holding_message_of(error: Any) -> str:  # (evaluated just before abort sends the status)
        asyncio.get_running_loop().call_soon(hold)
        return message_of(error)

    monkeypatch.setattr(servicer, "message_of", holding_message_of)
    write_model(tmp_path, "scale", scale_graph("scale", TensorProto.FLOAT, 2.0), "max_batch_size: 8")
    server = serve(tmp_path)
    calls = server.server.stats.calls
    request = tc.InferInput("x", [1, 4], "FP32")
    request.set_data_from_numpy(np.zeros((1, 4), np.float32))
    client = tc.InferenceServerClient(server.url)
    try:
        with pytest.raises(InferenceServerException, match="missing"):
            client.infer("missing", [request], client_timeout=20)
        assert held.wait(10), "the event loop was not held after the status was sent"
        counted = calls.get(("grpc", "inference", False), 0)
        release.set()
        assert counted == 1, "the client had its error before the call was counted"
    finally:
        release.set()
        client.close()


def test_calls_are_counted_by_protocol_endpoint_and_outcome(tmp_path: Path, serve) -> None:
    """The same kinds of calls over gRPC and HTTP, some failing: each edge counts exactly what its clients
    sent, and the durations it records fit inside what the clients measured."""
    import queue

    import tritonclient.http as th
    from onnx import TensorProto
    from testmodels import scale_graph, write_model
    from tritonclient.utils import InferenceServerException

    write_model(tmp_path, "scale", scale_graph("scale", TensorProto.FLOAT, 2.0), "max_batch_size: 8")
    server = serve(tmp_path)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    before = scrape(server.metrics_url)
    for protocol in ("grpc", "http"):  # inference calls are reported from zero, before the first one
        for outcome in ("success", "failure"):
            labels = {"protocol": protocol, "endpoint": "inference", "outcome": outcome}
            assert before["rapidserve_call_total"][frozenset(labels.items())] == 0
        assert value(before, "rapidserve_call_duration_seconds_count", protocol=protocol, endpoint="inference") == 0
    measured: dict[str, float] = {"grpc": 0.0, "http": 0.0}

    grpc_client = tc.InferenceServerClient(server.url)
    http_client = th.InferenceServerClient(server.http_url)
    try:
        for protocol, module, client, ok_calls in (("grpc", tc, grpc_client, 5), ("http", th, http_client, 4)):
            request = module.InferInput("x", [1, 4], "FP32")
            request.set_data_from_numpy(x)
            for _ in range(ok_calls):
                start = time.perf_counter()
                answer = client.infer("scale", [request])
                measured[protocol] += time.perf_counter() - start
                np.testing.assert_array_equal(answer.as_numpy("y"), x * 2)
            for _ in range(2):
                with pytest.raises(InferenceServerException):
                    client.infer("missing", [request])
            for _ in range(3):
                assert client.is_server_ready()
        wrong = tc.InferInput("x", [1, 3], "FP32")
        wrong.set_data_from_numpy(x[:, :3])
        with pytest.raises(InferenceServerException):
            grpc_client.infer("scale", [wrong])
        assert grpc_client.get_model_metadata("scale").name == "scale"
        answers: queue.Queue[Any] = queue.Queue()
        grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
        request = tc.InferInput("x", [1, 4], "FP32")
        request.set_data_from_numpy(x)
        for _ in range(2):
            grpc_client.async_stream_infer("scale", [request])
        for _ in range(2):
            result, error = answers.get(timeout=30)
            assert error is None
            np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
        grpc_client.stop_stream()
    finally:
        grpc_client.close()
        http_client.close()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{server.http_url}/v2/nowhere", timeout=30)
    assert info.value.code == 404

    after = scrape(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    expected = {
        ("grpc", "inference", "success"): 5,
        ("grpc", "inference", "failure"): 3,  # two unknown models, one wrong shape
        ("grpc", "health", "success"): 3,
        ("grpc", "metadata", "success"): 1,
        ("grpc", "inference-stream", "success"): 1,  # one stream of two requests
        ("http", "inference", "success"): 4,
        ("http", "inference", "failure"): 2,
        ("http", "health", "success"): 3,
        ("http", "other", "failure"): 1,
    }
    counted = {
        (dict(labels)["protocol"], dict(labels)["endpoint"], dict(labels)["outcome"]): count
        for labels, count in after["rapidserve_call_total"].items()
        if count
    }
    assert counted == expected
    for protocol, calls in (("grpc", 5), ("http", 4)):
        labels = {"protocol": protocol, "endpoint": "inference"}
        assert delta("rapidserve_call_duration_seconds_count", **labels) == calls
        assert 0 < delta("rapidserve_call_duration_seconds_sum", **labels) <= measured[protocol]
        assert delta("rapidserve_call_duration_seconds_bucket", **labels, le="+Inf") == calls
    # both edges reach the same model: its own counters see every successful request of both
    assert delta("rapidserve_request_success_total", model="scale", version="1") == 5 + 4 + 2
