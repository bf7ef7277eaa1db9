"""Failures stay with the request that caused them: engine errors (a failed batch is run again in parts,
so only the requests that fail on their own get the error), expired deadlines, cancellations."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from testmodels import slow_graph, write_model
from workload import write_reshape_model

from rapidserve import Client, InferenceServerError

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("failures")
    write_reshape_model(repo)
    write_model(
        repo,
        "slow",
        slow_graph(repeats=400),  # tens of ms a call on one thread: 12 at once outlast a 50 ms deadline
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
    version = server.server.manager.get("slow")
    settled = time.monotonic() + 60
    while version.pending_requests or version.executions_in_flight:  # until nothing is queued or running
        assert time.monotonic() < settled, "the queue never drained"
        time.sleep(0.01)
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    with Client(server.url) as client:
        executions = client.model_statistics("slow").model_stats[0].execution_count
        assert executions < 12  # expired requests left the queue without running
        np.testing.assert_array_equal(client.infer("slow", {"x": x})["y"], x)


GUARDED_CONFIG = """
backend: "pytorch"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 3 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 10000000, preferred_batch_size: [ 7 ] }
parameters { key: "batching_mode" value: { string_value: "fixed" } }
"""


def write_guarded_model(repo: Path) -> None:
    """A TorchScript model that refuses negative input (raises inside forward): y = 2x + 1."""
    torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'rapidserve[torch]'")

    class Guarded(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x < 0).any()):
                raise ValueError("negative input")
            return x * 2 + 1

    (repo / "guarded" / "1").mkdir(parents=True)
    torch.jit.script(Guarded()).save(str(repo / "guarded" / "1" / "model.pt"))
    (repo / "guarded" / "config.pbtxt").write_text(GUARDED_CONFIG)


def test_a_request_that_makes_the_engine_raise_fails_alone_in_its_batch(tmp_path: Path, serve) -> None:
    write_guarded_model(tmp_path)
    server = serve(tmp_path)
    rng = np.random.default_rng(0)
    rows = [1, 2, 1, 3]  # 7 rows: the preferred batch size, so the four requests go as one batch
    inputs = [rng.uniform(0, 10, (n, 3)).astype(np.float32) for n in rows]
    inputs[1][1, 2] = -1.0  # one row of one request is poison

    def call(x: np.ndarray) -> np.ndarray | InferenceServerError:
        with Client(server.url) as client:
            try:
                return client.infer("guarded", {"x": x})["y"]
            except InferenceServerError as exc:
                return exc

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(call, inputs))
    for index, (x, result) in enumerate(zip(inputs, results, strict=True)):
        if index == 1:
            assert isinstance(result, InferenceServerError) and result.code == grpc.StatusCode.INTERNAL
            assert result.message.startswith("model 'guarded/1' failed:") and "negative input" in result.message
        else:
            assert isinstance(result, np.ndarray), result
            np.testing.assert_array_equal(result, x * 2 + 1)
    with Client(server.url) as client:
        stats = client.model_statistics("guarded").model_stats[0]
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (3, 1)
    assert stats.inference_count == 5  # the rows answered
    # the batch of 4 failed; its half without the poison ran, then the good request of the other half
    assert stats.execution_count == 2
