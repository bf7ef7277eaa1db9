"""Failures stay with the request that caused them: engine errors, expired deadlines, cancellations."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from testmodels import slow_graph, write_model
from workload import write_reshape_model

from rapidserve import Client, InferenceServerError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("failures")
    write_reshape_model(repo)
    write_model(
        repo,
        "slow",
        slow_graph(),
        'max_batch_size: 4\nparameters { key: "intra_op_thread_count" value: { string_value: "1" } }',
    )
    return repo


def test_engine_failure_is_internal_and_the_server_goes_on(repo: Path, serve) -> None:
    server = serve(repo)
    x = np.arange(6, dtype=np.float32)
    with Client(server.url) as client:
        with pytest.raises(InferenceServerError) as info:
            client.infer("reshape", {"x": x, "shape": np.array([4, 4], np.int64)})
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "model 'reshape/1' failed" in info.value.message
        np.testing.assert_array_equal(
            client.infer("reshape", {"x": x, "shape": np.array([2, 3], np.int64)})["y"], x.reshape(2, 3)
        )
        stats = client.model_statistics("reshape").model_stats[0].inference_stats
        assert (stats.success.count, stats.fail.count) == (1, 1)


def test_requests_whose_deadline_passes_in_the_queue_are_not_computed(repo: Path, serve) -> None:
    server = serve(repo)
    x = np.ones((1, 256, 256), np.float32)
    codes: list[grpc.StatusCode | None] = []

    def call() -> None:
        with Client(server.url) as client:
            try:
                client.infer("slow", {"x": x}, timeout_s=0.05)
                codes.append(None)
            except InferenceServerError as exc:
                codes.append(exc.code)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)  # anything still queued would have run by now
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    with Client(server.url) as client:
        executions = client.model_statistics("slow").model_stats[0].execution_count
        assert executions < 12  # expired requests left the queue without running
        np.testing.assert_array_equal(client.infer("slow", {"x": x})["y"], x)
