"""Model repository behaviour: control modes, version policy, warm-up, reload without downtime."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from testmodels import add_sub_graph, scale_graph, slow_graph, write_model

from rapidserve import Client, InferenceServerError
from rapidserve.server.settings import UploadPolicy

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]

INT64 = 7


def triple_repo(repo: Path, name: str = "scale", versions: dict[int, int] | None = None, config: str = "") -> Path:
    """A model whose version v multiplies INT64 input by factors[v]."""
    for version, factor in (versions or {1: 3}).items():
        write_model(repo, name, scale_graph(name, INT64, factor), version=version)
    if config:
        (repo / name / "config.pbtxt").write_text(config)
    return repo


def ones() -> dict[str, np.ndarray]:
    return {"x": np.ones((1, 4), np.int64)}


def wait_until(predicate, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_version_policy_latest_all_and_specific(tmp_path: Path, serve) -> None:
    factors = {1: 1, 2: 2, 3: 3}
    latest = triple_repo(tmp_path / "a", versions=factors)
    every = triple_repo(tmp_path / "b", versions=factors, config="version_policy: { all: {} }")
    some = triple_repo(tmp_path / "c", versions=factors, config="version_policy: { specific: { versions: [1, 3] } }")
    two = triple_repo(tmp_path / "d", versions=factors, config="version_policy: { latest: { num_versions: 2 } }")
    for repo, loaded in ((latest, ["3"]), (every, ["1", "2", "3"]), (some, ["1", "3"]), (two, ["2", "3"])):
        server = serve(repo)
        with Client(server.url) as client:
            assert list(client.model_metadata("scale").versions) == loaded
            assert client.infer("scale", ones())["y"][0, 0] == int(loaded[-1])  # "" picks the highest
            for version in loaded:
                assert client.infer("scale", ones(), version=version)["y"][0, 0] == int(version)
            missing = next(v for v in ("1", "2", "3") if v not in loaded) if len(loaded) < 3 else "9"
            with pytest.raises(InferenceServerError) as info:
                client.infer("scale", ones(), version=missing)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert not client.is_model_ready("scale", missing)


def test_explicit_mode_load_unload_and_config_override(tmp_path: Path, serve) -> None:
    repo = triple_repo(tmp_path, "scale")
    write_model(repo, "add_sub", add_sub_graph())
    server = serve(repo, model_control_mode="explicit", load_models=("scale",))
    with Client(server.url) as client:
        assert client.is_server_ready()
        index = {m.name: m.state for m in client.repository_index()}
        assert index == {"scale": "READY", "add_sub": "UNAVAILABLE"}
        with pytest.raises(InferenceServerError) as info:
            client.infer("add_sub", {})
        assert info.value.code == grpc.StatusCode.NOT_FOUND

        client.load_model("add_sub")
        assert client.is_model_ready("add_sub")
        client.unload_model("scale")
        assert not client.is_model_ready("scale")
        with pytest.raises(InferenceServerError) as info:
            client.infer("scale", ones())
        assert info.value.code == grpc.StatusCode.NOT_FOUND

        override = {"max_batch_size": 2, "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [4]}]}
        client.load_model("scale", config_json=json.dumps(override))
        assert client.model_config("scale").max_batch_size == 2
        with pytest.raises(InferenceServerError, match="exceeds the model's max_batch_size 2"):
            client.infer("scale", {"x": np.ones((3, 4), np.int64)})

        with pytest.raises(InferenceServerError) as info:
            client.load_model("does_not_exist")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InferenceServerError) as info:
            client.load_model("scale", config_json='{"max_batch_size": "lots"}')
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.infer("scale", ones())["y"][0, 0] == 3  # a failed reload keeps the old version serving


def test_load_with_uploaded_model_files(tmp_path: Path, serve) -> None:
    from onnx import helper

    server = serve(tmp_path, model_control_mode="explicit", uploads=UploadPolicy(allow_files=True))
    model = helper.make_model(scale_graph("up", INT64, 5), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with Client(server.url) as client:
        config = json.dumps({"backend": "onnxruntime"})
        client.load_model("uploaded", config, files={"1/model.onnx": model.SerializeToString()})
        assert client.infer("uploaded", ones())["y"][0, 0] == 5
        with pytest.raises(InferenceServerError, match="escapes the model directory"):
            client.load_model("evil", "{}", files={"../../escape.onnx": b"x"})
        with pytest.raises(InferenceServerError, match="requires the 'config' parameter"):
            client.load_model("noconfig", files={"1/model.onnx": b"x"})


def test_reload_keeps_serving_and_lets_in_flight_requests_finish(tmp_path: Path, serve) -> None:
    write_model(
        tmp_path,
        "slow",
        slow_graph(repeats=200),  # ~30 ms a call on one thread: the 45 calls outlast both reloads
        'max_batch_size: 4\nparameters { key: "intra_op_thread_count" value: { string_value: "1" } }',
    )
    server = serve(tmp_path, model_control_mode="explicit", load_models=("*",))
    x = np.abs(np.random.default_rng(0).standard_normal((1, 256, 256))).astype(np.float32)
    results: list[object] = []

    def hammer() -> None:
        with Client(server.url, timeout_s=30) as client:
            for _ in range(15):
                try:
                    results.append(client.infer("slow", {"x": x})["y"])
                except InferenceServerError as exc:
                    results.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    with Client(server.url) as client:
        for _ in range(2):
            # reload while requests are running: wait until the serving version has a batch executing
            wait_until(lambda: server.server.manager.get("slow").executions_in_flight or not threads[0].is_alive())
            client.load_model("slow")
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert len(results) == 45
    for y in results:
        np.testing.assert_allclose(y, x, rtol=1e-5)


def test_poll_mode_picks_up_new_models_versions_and_removals(tmp_path: Path, serve) -> None:
    repo = triple_repo(tmp_path / "repo", "scale", versions={1: 3})
    server = serve(repo, model_control_mode="poll", repository_poll_secs=0.2)
    with Client(server.url) as client:
        assert client.infer("scale", ones())["y"][0, 0] == 3
        write_model(repo, "scale", scale_graph("scale", INT64, 7), version=2)
        wait_until(lambda: client.is_model_ready("scale", "2"))
        assert client.infer("scale", ones())["y"][0, 0] == 7
        assert not client.is_model_ready("scale", "1")  # latest policy keeps one version
        write_model(repo, "other", scale_graph("other", INT64, 11))
        wait_until(lambda: client.is_model_ready("other"))
        shutil.rmtree(repo / "scale")
        wait_until(lambda: not client.is_model_ready("scale"))
        with pytest.raises(InferenceServerError) as info:
            client.load_model("other")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_poll_mode_sees_an_edit_made_while_the_model_was_loading(
    tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint is taken before the load reads the folder, so an edit made during the load (here
    from inside the load itself, once the engine has read its file) is picked up by the next poll."""
    from rapidserve.server import manager

    build_version = manager.build_version
    edited = threading.Event()

    def build_then_edit(source, version):
        loaded = build_version(source, version)
        if not edited.is_set():
            write_model(tmp_path, "scale", scale_graph("scale", INT64, 7), version=2)
            edited.set()
        return loaded

    monkeypatch.setattr(manager, "build_version", build_then_edit)
    server = serve(tmp_path, model_control_mode="poll", repository_poll_secs=0.05)
    with Client(server.url) as client:
        triple_repo(tmp_path, "scale", versions={1: 3})  # a poll loads it, not the startup
        wait_until(edited.is_set, timeout_s=10)
        wait_until(lambda: client.is_model_ready("scale", "2"), timeout_s=5)
        assert client.infer("scale", ones())["y"][0, 0] == 7


def test_warmup_runs_before_ready_and_a_failing_warmup_keeps_the_model_unavailable(tmp_path: Path, serve) -> None:
    good = """max_batch_size: 4
model_warmup [ { name: "rand" batch_size: 3 count: 2 inputs { key: "x" value: { data_type: TYPE_INT64 dims: [4] random_data: true } } },
               { name: "file" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_INT64 dims: [4] input_data_file: "x.bin" } } } ]"""
    triple_repo(tmp_path, "warm", config=good)
    (tmp_path / "warm" / "warmup").mkdir()
    (tmp_path / "warm" / "warmup" / "x.bin").write_bytes(np.arange(4, dtype=np.int64).tobytes())
    bad = 'max_batch_size: 4\nmodel_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_INT64 dims: [5] zero_data: true } } } ]'
    triple_repo(tmp_path, "cold", config=bad)
    server = serve(tmp_path)
    with Client(server.url) as client:
        assert client.is_model_ready("warm")
        assert not client.is_model_ready("cold")
        assert not client.is_server_ready()  # strict readiness: a startup model failed
        index = {m.name: (m.state, m.reason) for m in client.repository_index()}
        assert index["cold"][0] == "UNAVAILABLE" and "failed to load" in index["cold"][1]
        stats = client.model_statistics("warm").model_stats[0]
        assert stats.inference_count == 0  # warm-up does not count as traffic


def test_bad_repository_entries_are_reported(tmp_path: Path, serve) -> None:
    (tmp_path / "noversions").mkdir()
    triple_repo(tmp_path, "wrongname", config='name: "other"')
    triple_repo(tmp_path, "badplatform", config='platform: "tensorflow_savedmodel"')
    server = serve(tmp_path)
    with Client(server.url) as client:
        reasons = {m.name: m.reason for m in client.repository_index()}
    assert "no version directories" in reasons["noversions"]
    assert "does not match the directory name" in reasons["wrongname"]
    assert "platform 'tensorflow_savedmodel' is not supported" in reasons["badplatform"]


def test_upload_names_cannot_escape_and_each_upload_replaces_the_last(tmp_path: Path, serve) -> None:
    from onnx import helper

    def onnx_bytes(factor: int) -> bytes:
        model = helper.make_model(scale_graph("s", INT64, factor), opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()

    (tmp_path / "repo").mkdir()
    server = serve(tmp_path / "repo", model_control_mode="explicit", uploads=UploadPolicy(allow_files=True))
    with Client(server.url) as client:
        for bad in ("../../escape", "/abs", "a/b", ".."):
            with pytest.raises(InferenceServerError, match="invalid model name") as info:
                client.load_model(bad, "{}", files={"1/model.onnx": onnx_bytes(2)})
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert not list(tmp_path.glob("**/escape*"))
        client.load_model("up", '{"backend": "onnxruntime"}', files={"3/model.onnx": onnx_bytes(2)})
        assert client.infer("up", ones())["y"][0, 0] == 2
        client.load_model("up", '{"backend": "onnxruntime"}', files={"1/model.onnx": onnx_bytes(10)})
        assert client.infer("up", ones())["y"][0, 0] == 10  # the version 3 of the earlier upload is gone
        assert list(client.model_metadata("up").versions) == ["1"]


def test_health_follows_readiness_after_loads_and_unloads(tmp_path: Path, serve) -> None:
    from standard_services import health_check

    from rapidserve import protos

    triple_repo(tmp_path, "scale")
    server = serve(tmp_path, model_control_mode="explicit", load_models=("scale",))
    serving = protos.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.url) as channel, Client(server.url) as client:
        check = health_check(channel)

        def status() -> int:
            return check(protos.HealthCheckRequest(service="inference.GRPCInferenceService")).status

        assert status() == serving
        client.unload_model("scale")  # a startup model is gone: not ready
        wait_until(lambda: status() != serving)
        assert not client.is_server_ready()
        client.load_model("scale")
        wait_until(lambda: status() == serving)
        assert client.is_server_ready()


def test_a_load_whose_caller_gives_up_still_completes(tmp_path: Path, serve) -> None:
    config = """max_batch_size: 4
model_warmup [ { name: "w" batch_size: 1 count: 400 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [256, 256] zero_data: true } } } ]"""
    write_model(tmp_path, "slow", slow_graph(), config)
    server = serve(tmp_path, model_control_mode="explicit")
    with Client(server.url) as client:
        with pytest.raises(InferenceServerError) as info:
            client.load_model("slow", timeout_s=0.1)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: client.is_model_ready("slow"), timeout_s=60)


def test_an_unreadable_config_marks_only_that_model_unavailable(tmp_path: Path, serve) -> None:
    triple_repo(tmp_path, "good")
    triple_repo(tmp_path, "garbled")
    (tmp_path / "garbled" / "config.pbtxt").write_bytes(b"name: \xff\xfe")
    server = serve(tmp_path)
    with Client(server.url) as client:
        assert client.is_model_ready("good")
        reasons = {m.name: m.reason for m in client.repository_index()}
        assert "cannot read it" in reasons["garbled"]


def test_stop_waits_for_a_stuck_load_only_as_long_as_it_is_told(
    tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A load that never finishes (here held in its loader thread until the test ends) cannot hold the
    server's stop: stop waits the given time, logs the load it abandons and returns."""
    from rapidserve.server import manager

    build_version = manager.build_version
    entered, release = threading.Event(), threading.Event()

    def stuck(source, version):
        entered.set()
        release.wait(30)
        return build_version(source, version)

    triple_repo(tmp_path, "scale")
    monkeypatch.setattr(manager, "build_version", stuck)
    server = serve(tmp_path, model_control_mode="explicit")
    outcome: list[InferenceServerError | None] = []

    def load() -> None:
        with Client(server.url) as client:
            try:
                client.load_model("scale", timeout_s=20)
                outcome.append(None)
            except InferenceServerError as exc:
                outcome.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert entered.wait(10)
        with caplog.at_level(logging.WARNING, logger="rapidserve.server.manager"):
            server.run(server.server.manager.stop(0.3), timeout=10)
        assert any("scale" in record.getMessage() for record in caplog.records), caplog.text
    finally:
        release.set()
        loader.join(10)
    assert len(outcome) == 1 and outcome[0] is not None  # the abandoned load does not report success
    assert outcome[0].code == grpc.StatusCode.UNAVAILABLE and "stopping" in outcome[0].message, outcome[0]
    with Client(server.url) as client:  # the gRPC server is still up here: later loads are refused
        with pytest.raises(InferenceServerError) as info:
            client.load_model("scale")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "stopping" in info.value.message


def test_a_request_for_an_unknown_model_lists_the_loaded_ones(tmp_path: Path, serve) -> None:
    for name in ("beta", "alpha"):
        triple_repo(tmp_path, name)
    server = serve(tmp_path)
    calls = {
        "infer": lambda client: client.infer("nope", ones()),
        "metadata": lambda client: client.model_metadata("nope"),
        "config": lambda client: client.model_config("nope"),
        "statistics": lambda client: client.model_statistics("nope"),
    }
    with Client(server.url) as client:
        for rpc, call in calls.items():
            with pytest.raises(InferenceServerError) as info:
                call(client)
            assert info.value.code == grpc.StatusCode.NOT_FOUND, rpc
            assert info.value.message == "unknown model 'nope'; loaded models: 'alpha', 'beta'", rpc


def test_the_list_of_loaded_models_is_bounded() -> None:
    from rapidserve.server.manager import loaded_names
    from rapidserve.server.status import MAX_MESSAGE_CHARS

    assert loaded_names([]) == "no models are loaded"
    few = [f"m{i:02d}" for i in range(25)]
    assert loaded_names(few) == "loaded models: " + ", ".join(f"'{n}'" for n in few[:20]) + " and 5 more"
    long = ["x" * 255 + str(i) for i in range(50)]  # the longest model names a repository can hold
    text = loaded_names(long)
    assert text.endswith(" more") and len(f"unknown model '{'y' * 80}...'; {text}") < MAX_MESSAGE_CHARS


def test_a_repository_that_serves_nothing_says_so(tmp_path: Path, serve, caplog: pytest.LogCaptureFixture) -> None:
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    (broken / "m" / "1").mkdir(parents=True)
    (broken / "m" / "1" / "model.onnx").write_bytes(b"not onnx")
    with caplog.at_level(logging.WARNING, logger="rapidserve"):
        serve(empty)
        serve(broken)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"no models in {empty}: a model is a folder") and "model.onnx" in w for w in warnings)
    assert f"none of the 1 models in {broken} loaded: the server serves nothing (see the errors above)" in warnings
