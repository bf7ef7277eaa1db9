"""The KServe v2 HTTP/REST port of a real server (ONNX Runtime, port 0), called through
tritonclient.http (JSON and binary tensors) and through raw requests, beside the gRPC port."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tc_grpc
import tritonclient.http as tc
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model
from tritonclient.utils import InferenceServerException

from rapidserve.common.datatypes import DATATYPES

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]


@pytest.fixture(scope="module")
def triton(shared_server):
    client = tc.InferenceServerClient(shared_server.http_url, concurrency=8)
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_grpc(shared_server):
    client = tc_grpc.InferenceServerClient(shared_server.url)
    yield client
    client.close()


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> tc.InferInput:
    given = tc.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array, binary_data=binary)
    return given


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One raw request (curl-like); returns (status, response, parsed JSON or raw bytes)."""
    return request_port(server.server.http_port, method, path, body, headers)


def request_port(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, response, json.loads(data) if "json" in kind else data
    finally:
        connection.close()


def test_health_metadata_and_config(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("add_sub") and not triton.is_model_ready("missing")
    meta = triton.get_model_metadata("add_sub")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    config = triton.get_model_config("add_sub")
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert [o["name"] for o in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    server = triton.get_server_metadata()
    assert server["name"] == "rapidserve" and "model_repository" in server["extensions"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_inputs_outputs_and_output_selection(triton, binary: bool) -> None:
    a = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    inputs = [tensor("INPUT0", a, "FP32", binary), tensor("INPUT1", b, "FP32", binary)]
    result = triton.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = triton.infer("add_sub", inputs, outputs=[tc.InferRequestedOutput("OUTPUT1", binary_data=binary)])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)
    sent_binary = [o for o in only.get_response()["outputs"] if "binary_data_size" in o.get("parameters", {})]
    assert len(sent_binary) == int(binary)  # the answer comes the way it was asked for


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp16_int64_and_bytes(triton, binary: bool) -> None:
    half = np.arange(8, dtype=np.float16).reshape(2, 4) / 4
    out = triton.infer("fp16_double", [tensor("x", half, "FP16", binary)]).as_numpy("y")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, half * 2)
    ints = np.array([[2**40, -5, 0, 7]], dtype=np.int64)
    np.testing.assert_array_equal(
        triton.infer("int64_triple", [tensor("x", ints, "INT64", binary)]).as_numpy("y"), ints * 3
    )
    words = np.array([b"hello", "w\u00f6rld".encode(), b""], dtype=object)
    echoed = triton.infer("strings", [tensor("text", words, "BYTES", binary)]).as_numpy("echo")
    assert [bytes(w) if isinstance(w, bytes) else w.encode() for w in echoed] == list(words)


def _every_datatype(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for datatype, dtype in DATATYPES.items():
        if datatype == "BYTES":
            arrays[datatype] = np.array([[b"a", b"bc", b""], [b"d", b"e", b"f"]], dtype=object)
        elif datatype == "BOOL":
            arrays[datatype] = rng.integers(0, 2, (2, 3)).astype(bool)
        elif datatype == "BF16":
            arrays[datatype] = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
        elif dtype.kind == "f":
            arrays[datatype] = rng.standard_normal((2, 3)).astype(dtype)
        else:
            arrays[datatype] = rng.integers(0, 100, (2, 3)).astype(dtype)
    return arrays


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(triton, binary: bool) -> None:
    arrays = _every_datatype(np.random.default_rng(3))
    bf16 = arrays.pop("BF16")
    inputs = [tensor(f"in_{t}", a, t, binary) for t, a in arrays.items()]
    outputs = [tc.InferRequestedOutput(f"out_{t}", binary_data=binary) for t in arrays]
    result = triton.infer("identity", inputs, outputs=outputs)
    for datatype, array in arrays.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES":
            got = np.array([v if isinstance(v, bytes) else v.encode() for v in got.flat], dtype=object).reshape(2, 3)
        assert got.dtype == array.dtype, datatype
        np.testing.assert_array_equal(got, array, err_msg=datatype)
    # tritonclient sends BF16 only as binary data
    pair = [tensor("in_BF16", bf16, "BF16", True), tensor("in_FP32", arrays["FP32"], "FP32", binary)]
    got = triton.infer("identity_bf16", pair, outputs=[tc.InferRequestedOutput("out_BF16", binary_data=True)])
    np.testing.assert_array_equal(got.as_numpy("out_BF16"), bf16)


def test_200_concurrent_requests_each_get_their_own_answer(triton) -> None:
    pending = []
    for i in range(200):
        a = np.full((1, 16), i, np.float32)
        b = np.arange(16, dtype=np.float32).reshape(1, 16)
        inputs = [tensor("INPUT0", a, "FP32", i % 2 == 0), tensor("INPUT1", b, "FP32", True)]
        pending.append((a + b, triton.async_infer("add_sub", inputs, request_id=str(i))))
    for expected, call in pending:
        np.testing.assert_array_equal(call.get_result(timeout=60).as_numpy("OUTPUT0"), expected)


BAD = [
    ("unknown model", "nope", "x", np.zeros((1, 4), np.int64), "INT64", 404, "unknown model 'nope'"),
    ("wrong datatype", "int64_triple", "x", np.zeros((1, 4), np.float32), "FP32", 400, "does not match the model's"),
    ("wrong shape", "int64_triple", "x", np.zeros((1, 5), np.int64), "INT64", 400, "shape [1, 5] does not match"),
    ("unknown input", "int64_triple", "z", np.zeros((1, 4), np.int64), "INT64", 400, "input 'z'"),
]


@pytest.mark.parametrize(
    ("case", "model", "name", "array", "datatype", "status", "message"), BAD, ids=[c[0] for c in BAD]
)
def test_bad_requests_get_their_status_and_message(triton, case, model, name, array, datatype, status, message) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, [tensor(name, array, datatype, True)])
    assert str(status) in str(info.value.status()) and message in info.value.message()
    good = triton.infer("int64_triple", [tensor("x", np.ones((1, 4), np.int64), "INT64", True)])
    np.testing.assert_array_equal(good.as_numpy("y"), 3)


def test_nested_json_data_is_taken_as_written(shared_server) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "INT64", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}
    status, _, answer = request(shared_server, "POST", "/v2/models/int64_triple/infer", json.dumps(body).encode())
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["shape"] == [2, 4] and output["datatype"] == "INT64"
    assert np.asarray(output["data"]).ravel().tolist() == [3 * v for v in range(1, 9)]


def _binary_body(header: dict, data: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    length = len(text) if declared is None else declared
    return text + data, {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}


def _malformed() -> list[tuple[str, bytes, dict]]:
    ones = np.ones((1, 4), np.int64).tobytes()
    binary = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "parameters": {"binary_data_size": 32}}]}
    return [
        ("bad json", b'{"inputs": [', {}),
        ("not an object", b"[1, 2]", {}),
        ("header length past the body", *_binary_body(binary, ones, declared=10_000)),
        ("header length cuts the JSON", *_binary_body(binary, ones, declared=20)),
        ("binary size past the data", *_binary_body(binary, ones[:16])),
        ("data left over", *_binary_body(binary, ones + b"\x00" * 8)),
        (
            "shape disagrees with data",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3]}]}).encode(),
            {},
        ),
        (
            "data of the wrong type",
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": ["a", 2, 3, 4]}]}
            ).encode(),
            {},
        ),
        (
            "classification",
            json.dumps(
                {
                    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}],
                    "outputs": [{"name": "y", "parameters": {"classification": 2}}],
                }
            ).encode(),
            {},
        ),
    ]


MALFORMED = _malformed()


@pytest.mark.parametrize(("case", "body", "headers"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_bodies_are_400_with_a_message_and_change_nothing(shared_server, case, body, headers) -> None:
    def successes() -> int:
        _, _, stats = request(shared_server, "GET", "/v2/models/int64_triple/stats")
        return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])

    before = successes()
    status, _, answer = request(shared_server, "POST", "/v2/models/int64_triple/infer", body, headers)
    assert status == 400, (case, answer)
    assert isinstance(answer, dict) and set(answer) == {"error"} and answer["error"], answer
    assert successes() == before
    status, _, answer = request(shared_server, "GET", "/v2/health/ready")
    assert status == 200


def test_unknown_paths_and_methods(shared_server) -> None:
    status, _, answer = request(shared_server, "GET", "/v2/nothing/here")
    assert status in (400, 404) and "error" in answer
    status, _, _ = request(shared_server, "DELETE", "/v2/models/add_sub")
    assert 400 <= status < 500


def test_loading_is_refused_in_control_mode_none(triton) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("add_sub")
    assert "--model-control-mode explicit" in info.value.message()


def test_load_unload_and_index_in_explicit_mode(tmp_path: Path, serve) -> None:
    write_model(tmp_path, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    server = serve(tmp_path, model_control_mode="explicit")
    client = tc.InferenceServerClient(server.http_url)
    try:
        assert not client.is_model_ready("add_sub")
        over_grpc = tc_grpc.InferenceServerClient(server.url).get_model_repository_index(as_json=True)["models"]
        assert client.get_model_repository_index() == over_grpc and over_grpc[0]["name"] == "add_sub"
        assert over_grpc[0].get("state") != "READY"
        client.load_model("add_sub")
        assert client.is_model_ready("add_sub")
        assert client.get_model_repository_index()[0]["state"] == "READY"
        x = np.ones((1, 16), np.float32)
        result = client.infer("add_sub", [tensor("INPUT0", x, "FP32", True), tensor("INPUT1", x, "FP32", False)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + x)
        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        with pytest.raises(InferenceServerException):
            client.load_model("not_there")
    finally:
        client.close()


def _counts(stats: dict) -> dict:
    """The counts of a model's statistics (times differ between any two runs)."""
    inference = stats.get("inference_stats", {})
    batches = stats.get("batch_stats", [])
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        **{key: int(value.get("count", 0)) for key, value in inference.items()},
        "batches": sorted((int(b["batch_size"]), int(b["compute_infer"].get("count", 0))) for b in batches),
    }


def test_http_statistics_equal_grpc_statistics_for_the_same_traffic(repository: Path, serve) -> None:
    """The same traffic to two fresh servers, one over gRPC and one over HTTP, leaves the same counts;
    and each server tells the same statistics on both ports."""
    traffic = [np.ones((3, 4), np.int64), np.ones((1, 4), np.int64), np.ones((2, 5), np.int64)]
    counts = []
    for protocol in ("grpc", "http"):
        server = serve(repository)
        module = tc_grpc if protocol == "grpc" else tc
        client = module.InferenceServerClient(server.url if protocol == "grpc" else server.http_url)
        for array in traffic:
            given = module.InferInput("x", list(array.shape), "INT64")
            given.set_data_from_numpy(array)
            with contextlib.suppress(InferenceServerException):
                client.infer("int64_triple", [given])
        over_grpc = tc_grpc.InferenceServerClient(server.url).get_inference_statistics("int64_triple", as_json=True)
        over_http = tc.InferenceServerClient(server.http_url).get_inference_statistics("int64_triple")
        assert _counts(over_grpc["model_stats"][0]) == _counts(over_http["model_stats"][0])
        counts.append(_counts(over_http["model_stats"][0]))
        client.close()
    assert counts[0] == counts[1]
    assert counts[0]["success"] == 2 and counts[0]["fail"] == 1 and counts[0]["inference_count"] == 4


def test_both_ports_serve_the_same_models_at_once(shared_server, triton, triton_grpc) -> None:
    answers: queue.Queue = queue.Queue()
    x = np.arange(4, dtype=np.int64).reshape(1, 4)
    for i in range(20):
        http_input = tensor("x", x + i, "INT64", True)
        answers.put(triton.async_infer("int64_triple", [http_input]))
        grpc_input = tc_grpc.InferInput("x", [1, 4], "INT64")
        grpc_input.set_data_from_numpy(x + i)
        np.testing.assert_array_equal(triton_grpc.infer("int64_triple", [grpc_input]).as_numpy("y"), (x + i) * 3)
    for i in range(20):
        np.testing.assert_array_equal(answers.get().get_result(timeout=30).as_numpy("y"), (x + i) * 3)


def test_no_http_serves_grpc_alone(repository: Path, serve) -> None:
    server = serve(repository, http_enabled=False)
    assert server.server.http_port == 0
    client = tc_grpc.InferenceServerClient(server.url)
    assert client.is_server_ready()
    client.close()


def test_the_demo_names_its_http_address(tmp_path: Path) -> None:
    from remote import RemoteServer

    remote = RemoteServer("--no-metrics")  # no repository: the built-in demo
    try:
        port = int(remote.wait_for_line(r"HTTP server listening on 127\.0\.0\.1:(\d+)$").group(1))
        remote.wait_for_line(rf"curl http://127\.0\.0\.1:{port}/v2/models/digits")
        status, _, metadata = request_port(port, "GET", "/v2/models/digits")
        assert status == 200 and metadata["name"] == "digits"
    finally:
        assert remote.stop() == 0, remote.log
