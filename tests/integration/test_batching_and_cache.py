"""Batching and the prediction cache through a real server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from testmodels import scale_graph, write_model

from rapidserve import Client
from rapidserve.server.settings import UploadPolicy

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]
INT64 = 7

BATCHING = """max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 2000 }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def test_hundreds_of_concurrent_clients_with_different_batch_sizes_get_their_own_rows(tmp_path: Path, serve) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), BATCHING)
    server = serve(tmp_path)
    errors: list[BaseException] = []

    def client(worker: int) -> None:
        try:
            with Client(server.url, timeout_s=60) as c:
                for i in range(5):
                    rows = 1 + (worker + i) % 4
                    x = np.arange(rows * 4, dtype=np.int64).reshape(rows, 4) + 1000 * worker + 100 * i
                    np.testing.assert_array_equal(c.infer("scale", {"x": x})["y"], x * 3)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with Client(server.url) as c:
        stats = c.model_statistics("scale").model_stats[0]
    assert stats.inference_stats.success.count == 1000
    assert stats.execution_count < 1000  # requests were merged into batches
    assert max(b.batch_size for b in stats.batch_stats) > 1


def test_cache_hits_skip_the_queue_and_a_reload_never_serves_stale_answers(tmp_path: Path, serve) -> None:
    config = "max_batch_size: 8\nresponse_cache { enable: true }\n"
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), config)
    server = serve(tmp_path, model_control_mode="explicit", load_models=("*",), uploads=UploadPolicy(allow_files=True))
    x = np.arange(8, dtype=np.int64).reshape(2, 4)
    with Client(server.url) as c:
        for _ in range(5):
            np.testing.assert_array_equal(c.infer("scale", {"x": x})["y"], x * 3)
        stats = c.model_statistics("scale").model_stats[0]
        assert (stats.inference_stats.cache_miss.count, stats.inference_stats.cache_hit.count) == (1, 4)
        assert stats.execution_count == 1 and stats.inference_stats.success.count == 5
        np.testing.assert_array_equal(c.infer("scale", {"x": x}, ["y"])["y"], x * 3)  # other outputs: other key

        # same version number, new weights: the reload must drop the cached answers
        from onnx import helper

        model = helper.make_model(scale_graph("scale", INT64, 5), opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        new_config = json.dumps({"max_batch_size": 8, "response_cache": {"enable": True}})
        c.load_model("scale", new_config, files={"1/model.onnx": model.SerializeToString()})
        np.testing.assert_array_equal(c.infer("scale", {"x": x})["y"], x * 5)


def test_cache_hits_carry_each_callers_id_over_unary_and_streams(tmp_path: Path, serve) -> None:
    import queue

    import tritonclient.grpc as tc

    write_model(
        tmp_path, "scale", scale_graph("scale", INT64, 3), "max_batch_size: 8\nresponse_cache { enable: true }\n"
    )
    server = serve(tmp_path)
    x = np.arange(4, dtype=np.int64).reshape(1, 4)
    client = tc.InferenceServerClient(server.url)
    tensor = tc.InferInput("x", [1, 4], "INT64")
    tensor.set_data_from_numpy(x)
    for request_id in ("first", "", "third-id"):
        result = client.infer("scale", [tensor], request_id=request_id)
        assert result.get_response().id == request_id
        np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(5):
        client.async_stream_infer("scale", [tensor], request_id=f"s{i}")
    seen = set()
    for _ in range(5):
        result, error = answers.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
        seen.add(result.get_response().id)
    client.stop_stream()
    client.close()
    assert seen == {f"s{i}" for i in range(5)}
    with Client(server.url) as c:
        stats = c.model_statistics("scale").model_stats[0].inference_stats
    assert (stats.cache_miss.count, stats.cache_hit.count, stats.success.count) == (1, 7, 8)


def test_bad_request_parameters_are_refused_even_when_the_answer_is_cached(tmp_path: Path, serve) -> None:
    import grpc

    from rapidserve import InferenceServerError

    config = "max_batch_size: 8\nresponse_cache { enable: true }\ndynamic_batching { priority_levels: 2 }\n"
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), config)
    server = serve(tmp_path)
    x = np.ones((1, 4), np.int64)
    with Client(server.url) as c:
        c.infer("scale", {"x": x})  # cached now
        with pytest.raises(InferenceServerError, match="outside the model's priority levels") as info:
            c.infer("scale", {"x": x}, parameters={"priority": 9})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        np.testing.assert_array_equal(c.infer("scale", {"x": x}, parameters={"priority": 1})["y"], x * 3)


def _batching_config(delay_s: float, mode: str | None = None) -> str:
    param = f'parameters {{ key: "batching_mode" value: {{ string_value: "{mode}" }} }}\n' if mode else ""
    return f"max_batch_size: 8\ndynamic_batching {{ max_queue_delay_microseconds: {int(delay_s * 1e6)} }}\n{param}"


def _queue_s(client: Client, model: str) -> tuple[float, int]:
    """(seconds requests spent queued in all, requests counted), from the server's statistics."""
    queue = client.model_statistics(model).model_stats[0].inference_stats.queue
    return queue.ns / 1e9, queue.count


WAITS_S = 0.25  # a fixed-mode model's delay: each lone request queues at least this long
NEVER_S = 60.0  # an adaptive model's delay: one lone request that waited it out would show in the total
LONE_REQUESTS = 3 * 64 + 1  # more than the one-in-64 decisions that may wait to learn the load


@pytest.mark.parametrize("server_mode", ["adaptive", "fixed"])
def test_batching_mode_from_the_server_setting_and_the_model_parameter(tmp_path: Path, serve, server_mode: str) -> None:
    """The server's ``--batching-mode`` applies to a model without the ``batching_mode`` parameter; the
    parameter overrides it. A lone client of an adaptive model never waits out even a minute's delay;
    one of a fixed model waits the delay every time."""
    other = "fixed" if server_mode == "adaptive" else "adaptive"
    delays = {"adaptive": NEVER_S, "fixed": WAITS_S}
    write_model(tmp_path, "by_server", scale_graph("by_server", INT64, 3), _batching_config(delays[server_mode]))
    write_model(tmp_path, "by_model", scale_graph("by_model", INT64, 3), _batching_config(delays[other], other))
    server = serve(tmp_path, batching_mode=server_mode)
    modes = {"by_server": server_mode, "by_model": other}
    with Client(server.url, timeout_s=120) as c:
        for model, mode in modes.items():
            count = LONE_REQUESTS if mode == "adaptive" else 2
            for i in range(count):
                x = np.full((1, 4), i, np.int64)
                np.testing.assert_array_equal(c.infer(model, {"x": x})["y"], x * 3)
            total_s, counted = _queue_s(c, model)
            assert counted == count
            if mode == "fixed":
                assert total_s >= count * WAITS_S, (model, total_s)
            else:
                assert total_s < NEVER_S / 10, (model, total_s)


def test_a_steady_stream_of_concurrent_clients_gets_batches_larger_than_one(tmp_path: Path, serve) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), _batching_config(0.05))
    server = serve(tmp_path)  # adaptive, the default
    errors: list[BaseException] = []

    def client(worker: int) -> None:
        try:
            with Client(server.url, timeout_s=60) as c:
                for i in range(80):
                    x = np.full((1, 4), worker * 1000 + i, np.int64)
                    np.testing.assert_array_equal(c.infer("scale", {"x": x})["y"], x * 3)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with Client(server.url) as c:
        stats = c.model_statistics("scale").model_stats[0]
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sum(size * count for size, count in sizes.items()) == 8 * 80
    assert max(sizes) > 1, sizes


def test_the_cache_stays_within_its_byte_bound_through_a_real_server(tmp_path: Path, serve) -> None:
    """Answers of 16 KiB into a 256 KiB cache: the bytes the server reports hold at least the answers it
    keeps (sizes taken from the arrays the client got) and never exceed the bound; the oldest answers
    are evicted, the newest still answered from the cache."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from testmodels import tile_graph

    config = """max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
response_cache { enable: true }
"""
    write_model(tmp_path, "tile", tile_graph(16), config)
    capacity = 256 * 1024
    server = serve(tmp_path, cache_size_bytes=capacity)

    def gauges() -> dict[str, float]:
        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            text = response.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    answer_bytes = 0
    requests = 40
    with Client(server.url) as c:
        for i in range(requests):
            x = np.full(256, float(i), np.float32)
            y = c.infer("tile", {"x": x})["y"]
            np.testing.assert_array_equal(y, np.tile(x, 16))
            answer_bytes = y.nbytes
            held = gauges()
            assert held["rapidserve_cache_bytes"] <= held["rapidserve_cache_capacity_bytes"] == capacity
            assert held["rapidserve_cache_bytes"] >= held["rapidserve_cache_entries"] * answer_bytes
        entries = int(held["rapidserve_cache_entries"])
        assert requests * answer_bytes > capacity and capacity / 2 <= entries * answer_bytes
        assert held["rapidserve_cache_eviction_total"] == requests - entries
        before = c.model_statistics("tile").model_stats[0].inference_stats
        c.infer("tile", {"x": np.full(256, float(requests - 1), np.float32)})  # the newest: still cached
        c.infer("tile", {"x": np.full(256, 0.0, np.float32)})  # the oldest: evicted long ago
        after = c.model_statistics("tile").model_stats[0].inference_stats
    assert after.cache_hit.count - before.cache_hit.count == 1
    assert after.cache_miss.count - before.cache_miss.count == 1
