"""The real CLI as a subprocess, driven by NVIDIA's tritonclient as an outside application would."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from remote import RemoteServer
from testmodels import ADD_SUB_CONFIG, add_sub_graph, build_repository, slow_graph, write_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RemoteServer]:
    repo = build_repository(tmp_path / "repo")
    remote = RemoteServer("--model-repository", str(repo))
    yield remote
    remote.stop()


def triton_input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_tritonclient_end_to_end_matches_in_process_onnxruntime(server: RemoteServer, tmp_path: Path) -> None:
    import onnxruntime as ort

    client = tc.InferenceServerClient(server.url)
    server.wait_ready(client)
    assert client.is_server_live() and client.is_model_ready("add_sub")
    assert client.get_model_metadata("add_sub").platform == "onnxruntime_onnx"
    assert client.get_model_config("add_sub").config.max_batch_size == 8

    a = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "repo" / "add_sub" / "1" / "model.onnx"))
    expected = dict(zip(["OUTPUT0", "OUTPUT1"], session.run(None, {"INPUT0": a, "INPUT1": b}), strict=True))
    inputs = [triton_input("INPUT0", a, "FP32"), triton_input("INPUT1", b, "FP32")]

    result = client.infer("add_sub", inputs)
    for name, value in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), value)

    answers: queue.Queue = queue.Queue()
    client.async_infer("add_sub", inputs, callback=lambda result, error: answers.put((result, error)))
    result, error = answers.get(timeout=30)
    assert error is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])

    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(3):
        client.async_stream_infer("add_sub", inputs, request_id=str(i))
    for _ in range(3):
        result, error = answers.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected["OUTPUT0"])
    client.stop_stream()
    client.close()
    assert server.stop() == 0


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "slow",
        slow_graph(repeats=400),
        # the three requests leave the queue together, as one batch, and only once all three are in
        "max_batch_size: 4\n"
        "dynamic_batching { max_queue_delay_microseconds: 60000000 preferred_batch_size: [ 3 ] }\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        'parameters { key: "batching_mode" value: { string_value: "fixed" } }',
    )
    remote = RemoteServer("--model-repository", str(tmp_path), "--exit-timeout-secs", "20")
    client = tc.InferenceServerClient(remote.url)
    remote.wait_ready(client)
    x = np.ones((1, 256, 256), np.float32)
    answers: queue.Queue = queue.Queue()
    for _ in range(3):
        client.async_infer(
            "slow", [triton_input("x", x, "FP32")], callback=lambda result, error: answers.put((result, error))
        )
    metrics_url = remote.metrics_url()
    deadline = time.monotonic() + 60
    while not _executing(metrics_url, "slow"):  # the batch of all three is running
        if not answers.empty() or time.monotonic() > deadline:
            remote.stop()  # not left running when the test fails
            seen = "an answer came back" if not answers.empty() else "60 s passed"
            pytest.fail(f"/metrics never showed the batch of three running before {seen}\n{remote.log}")
        time.sleep(0.01)
    remote.proc.send_signal(signal.SIGTERM)
    for _ in range(3):
        result, error = answers.get(timeout=60)
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("y"), x)
    assert remote.stop() == 0
    assert "shutting down" in remote.log
    client.close()


def _executing(metrics_url: str, model: str) -> float:
    """The batches a model is running, as the server's /metrics reports them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rapidserve_executions_in_flight" and sample.labels.get("model") == model
    )


def test_demo_serves_without_a_repository_and_infer_prints_outputs(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "RAPIDSERVE_LOG_LEVEL": "INFO"}
    remote = RemoteServer(env=env)
    try:
        client = tc.InferenceServerClient(remote.url)
        remote.wait_ready(client)
        assert client.is_model_ready("digits")
        result = subprocess.run(
            [sys.executable, "-m", "rapidserve", "infer", "digits", "--url", remote.url, "--batch-size", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "label int64 [3]" in result.stdout and "probabilities float32 [3, 10]" in result.stdout
        np.save(tmp_path / "pixels.npy", np.zeros((2, 64), np.float32))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rapidserve",
                "infer",
                "digits",
                "--url",
                remote.url,
                "--input",
                f"pixels={tmp_path / 'pixels.npy'}",
                "--output",
                "label",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and "label int64 [2]" in result.stdout and "probabilities" not in result.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "rapidserve", "infer", "nope", "--url", remote.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
        assert bad.stderr.startswith("rapidserve infer: error: ") and "loaded models: 'digits'" in bad.stderr
        assert "Traceback" not in bad.stderr
        client.close()
    finally:
        assert remote.stop() == 0
    assert "rapidserve infer --url" in remote.log  # the demo tells the user how to call it


def test_environment_variables_configure_the_server(tmp_path: Path) -> None:
    write_model(tmp_path, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    write_model(tmp_path, "other", add_sub_graph())
    env = {
        "RAPIDSERVE_MODEL_REPOSITORY": str(tmp_path),
        "RAPIDSERVE_MODEL_CONTROL_MODE": "explicit",
        "RAPIDSERVE_LOAD_MODEL": "add_sub",
    }
    remote = RemoteServer(env=env)
    try:
        client = tc.InferenceServerClient(remote.url)
        remote.wait_ready(client)
        assert client.is_model_ready("add_sub") and not client.is_model_ready("other")
        client.close()
    finally:
        assert remote.stop() == 0


def test_startup_errors_exit_nonzero_with_a_message(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "rapidserve", "serve", "--model-repository", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "model repository not found" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "rapidserve", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAPIDSERVE_GRPC_PORT": "abc"},
    )
    assert bad.returncode == 2
    assert (
        bad.stderr == "rapidserve serve: error: environment variable RAPIDSERVE_GRPC_PORT='abc': expected an integer\n"
    )
    first = RemoteServer("--model-repository", str(tmp_path))
    try:
        first.wait_for_line(rf"no models in {re.escape(str(tmp_path))}: a model is a folder .*model\.onnx")
        busy = subprocess.run(
            [sys.executable, "-m", "rapidserve", "serve", "--model-repository", str(tmp_path),
             "--host", "127.0.0.1", "--grpc-port", str(first.port), "--metrics-port", "0", "--http-port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert busy.returncode == 1 and "cannot start" in busy.stderr
    finally:
        assert first.stop() == 0


def test_health_command_follows_readiness_and_metrics_are_served(server: RemoteServer) -> None:
    import urllib.request

    client = tc.InferenceServerClient(server.url)
    server.wait_ready(client)
    client.close()
    health = [sys.executable, "-m", "rapidserve", "health"]
    ok = subprocess.run([*health, "--url", server.url], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    with urllib.request.urlopen(server.metrics_url(), timeout=30) as response:
        assert 'rapidserve_model_ready{model="add_sub",version="1"} 1.0' in response.read().decode()
    assert server.stop() == 0
    down = subprocess.run(
        [*health, "--url", server.url, "--timeout-s", "1"], capture_output=True, text=True, timeout=60
    )
    assert down.returncode == 1 and "unhealthy: UNAVAILABLE" in down.stderr


TYPO = 'name: "typo"\nbackend: "onnxruntime"\nmax_batch_sise: 4\n'


def test_a_model_that_fails_to_load_at_start_exits_unless_exit_on_error_is_false(tmp_path: Path) -> None:
    write_model(tmp_path, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    write_model(tmp_path, "typo", add_sub_graph(), TYPO)
    failed = subprocess.run(
        [sys.executable, "-m", "rapidserve", "serve", "--model-repository", str(tmp_path), "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("rapidserve serve: error: model 'typo' failed to load: ")
    assert "load: typo/config.pbtxt:3:1: the model config has no field 'max_batch_sise'" in last
    assert "did you mean max_batch_size?" in last and "--exit-on-error=false" in last

    remote = RemoteServer("--model-repository", str(tmp_path), env={"RAPIDSERVE_EXIT_ON_ERROR": "false"})
    try:
        client = tc.InferenceServerClient(remote.url)
        remote.wait_for_line("not every startup model loaded")
        assert client.is_server_live() and not client.is_server_ready()
        assert client.is_model_ready("add_sub") and not client.is_model_ready("typo")
        client.close()
    finally:
        assert remote.stop() == 0
