"""A known mix of requests (successes, every failure reason, cache hits and misses) and what a
server's counters must say after it: shared by the metrics tests and the real-Prometheus test."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from testmodels import ONNX_TYPES, scale_graph, slow_graph, write_model

from rapidserve import Client, InferenceServerError, protos

INT64 = ONNX_TYPES["INT64"]
ONE_THREAD = 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
REASON_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.INTERNAL: "engine_error",
    grpc.StatusCode.NOT_FOUND: "not_found",
}


def reshape_graph():
    """x FP32 [-1] reshaped to the INT64 `shape` input: a bad shape makes ONNX Runtime fail at run time."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1])],
    )


def write_reshape_model(repo: Path) -> None:
    # zero-filled default warm-up would reshape to [0, 0] and fail, so warm up with a real shape
    warmup = """max_batch_size: 0
model_warmup [ { name: "w" inputs [
  { key: "x" value: { data_type: TYPE_FP32 dims: [ 6 ] zero_data: true } },
  { key: "shape" value: { data_type: TYPE_INT64 dims: [ 2 ] input_data_file: "shape.bin" } } ] } ]"""
    write_model(repo, "reshape", reshape_graph(), warmup)
    (repo / "reshape" / "warmup").mkdir()
    (repo / "reshape" / "warmup" / "shape.bin").write_bytes(np.array([2, 3], np.int64).tobytes())


def build_workload_repository(repo: Path) -> Path:
    batching = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 500 }\n" + ONE_THREAD
    write_model(repo, "scale", scale_graph("scale", INT64, 3), batching)
    write_model(repo, "cached", scale_graph("cached", INT64, 3), batching + "response_cache { enable: true }\n")
    slow = "max_batch_size: 1\n" + ONE_THREAD + "dynamic_batching { default_queue_policy { %s } }\n"
    # ~10 ms a call: 6 calls sent together overlap, so the queue of 1 fills and a 2 ms wait times out
    write_model(repo, "slow_full", slow_graph(rows=64, repeats=400), slow % "max_queue_size: 1")
    write_model(repo, "slow_timeout", slow_graph(rows=64, repeats=400), slow % "default_timeout_microseconds: 2000")
    write_reshape_model(repo)
    return repo


@dataclass
class Expected:
    """What the server's counters must say: by model ("" for requests that named no loaded model)."""

    success: Counter[str] = field(default_factory=Counter)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, reason)
    inferences: Counter[str] = field(default_factory=Counter)  # batch elements, cache hits included
    cache_hits: Counter[str] = field(default_factory=Counter)  # at least these (sequential repeats)
    cache_lookups: Counter[str] = field(default_factory=Counter)  # hits + misses (joins count as misses)

    def outcome(self, model: str, rows: int, error: InferenceServerError | None) -> None:
        if error is None:
            self.success[model] += 1
            self.inferences[model] += rows
        else:
            self.failures[(model, REASON_OF[error.code])] += 1


def _call(client: Client, model: str, inputs: dict[str, np.ndarray], **kwargs) -> InferenceServerError | None:
    try:
        client.infer(model, inputs, **kwargs)
    except InferenceServerError as exc:
        return exc
    return None


def _concurrent(url: str, model: str, x: np.ndarray, count: int, name: str = "x") -> list[InferenceServerError | None]:
    outcomes: list[InferenceServerError | None] = []
    barrier = threading.Barrier(count)

    def one() -> None:
        with Client(url, timeout_s=60) as client:
            barrier.wait()
            outcomes.append(_call(client, model, {name: x}))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def run_workload(url: str) -> Expected:
    """Send the mix; every outcome the clients saw is what the server must have counted."""
    expected = Expected()
    with Client(url, timeout_s=60) as client:
        for i in range(12):  # successes of 1..3 rows
            rows = 1 + i % 3
            expected.outcome("scale", rows, _call(client, "scale", {"x": np.ones((rows, 4), np.int64)}))
        for _ in range(2):  # wrong datatype: refused by validation
            expected.outcome("scale", 1, _call(client, "scale", {"x": np.ones((1, 4), np.float32)}))
        expected.outcome("scale", 1, _bad_raw_length(url))  # refused while decoding
        for name, version in (("nope", ""), ("nope", ""), ("nope", ""), ("scale", "7")):
            expected.outcome("", 1, _call(client, name, {"x": np.ones((1, 4), np.int64)}, version=version))
        same = np.full((2, 4), 5, np.int64)
        for i in range(6):  # one miss, then hits
            expected.outcome("cached", 2, _call(client, "cached", {"x": same}))
            expected.cache_hits["cached"] += i > 0
            expected.cache_lookups["cached"] += 1
        x = np.ones(6, np.float32)
        expected.outcome("reshape", 1, _call(client, "reshape", {"x": x, "shape": np.array([4, 4], np.int64)}))
        expected.outcome("reshape", 1, _call(client, "reshape", {"x": x, "shape": np.array([3, 2], np.int64)}))
    fresh = np.full((2, 4), 7, np.int64)  # identical requests at once: single-flight joins, or hits
    for error in _concurrent(url, "cached", fresh, 4, name="x"):
        expected.outcome("cached", 2, error)
        expected.cache_lookups["cached"] += 1
    _stream(url, expected)
    slow_x = np.ones((1, 64, 256), np.float32)
    for model in ("slow_full", "slow_timeout"):
        for error in _concurrent(url, model, slow_x, 6):
            expected.outcome(model, 1, error)
    return expected


def _stream(url: str, expected: Expected) -> None:
    """Four good requests and one of the wrong datatype over one ModelStreamInfer stream (tritonclient)."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    answers: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    for index, dtype in enumerate(["INT64"] * 4 + ["FP32"]):
        tensor = tc.InferInput("x", [1, 4], dtype)
        tensor.set_data_from_numpy(np.ones((1, 4), np.int64 if dtype == "INT64" else np.float32))
        client.async_stream_infer("scale", [tensor], request_id=str(index))
    errors = [answers.get(timeout=60) for _ in range(5)]
    client.stop_stream()
    client.close()
    assert sum(e is not None for e in errors) == 1, errors
    for error in errors:
        expected.outcome(
            "scale", 1, None if error is None else InferenceServerError(grpc.StatusCode.INVALID_ARGUMENT, "")
        )


def _bad_raw_length(url: str) -> InferenceServerError | None:
    """A request whose raw bytes do not match its shape, sent as-is (our client would not build it)."""
    request = protos.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 31)
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            protos.method_path("ModelInfer"),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=protos.ModelInferResponse.FromString,
        )
        try:
            call(request, timeout=30)
        except grpc.RpcError as exc:
            return InferenceServerError(exc.code(), exc.details())
    return None
