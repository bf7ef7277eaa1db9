"""The KServe v2 REST API driven through ``RestApi.handle`` over a real server's model manager, with real
ONNX Runtime models: every endpoint, JSON and binary tensors, errors that change nothing, compression,
model control, and statistics equal to what gRPC reports for the same traffic."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from testmodels import (
    ADD_SUB_CONFIG,
    ALL_DATATYPES,
    add_sub_graph,
    identity_graph,
    strings_graph,
    write_model,
)

from rapidserve import Client, InferenceServerError
from rapidserve.common.datatypes import DATATYPES
from rapidserve.server.rest import RestApi, RestRequest, RestResponse
from rapidserve.server.settings import UploadPolicy

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]

TWIN_CONFIG = """
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
CACHED_CONFIG = TWIN_CONFIG + "response_cache { enable: true }\n"
STRINGS_CONFIG = (
    'max_batch_size: 0\ninput [{ name: "text" data_type: TYPE_STRING dims: [-1] }]\n'
    'output [{ name: "echo" data_type: TYPE_STRING dims: [-1] }]\n'
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("rest-repo")
    write_model(repo, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    write_model(repo, "identity", identity_graph([t for t in ALL_DATATYPES if t != "BF16"]))
    write_model(repo, "identity_bf16", identity_graph(["BF16", "FP32"]))
    write_model(repo, "strings", strings_graph(), STRINGS_CONFIG)
    write_model(repo, "twin_grpc", add_sub_graph(), TWIN_CONFIG)
    write_model(repo, "twin_http", add_sub_graph(), TWIN_CONFIG)
    write_model(repo, "cached", add_sub_graph(), CACHED_CONFIG)
    return repo


class Api:
    """``RestApi.handle`` called on the server's own event loop."""

    def __init__(self, thread: Any) -> None:
        self.thread = thread
        server = thread.server
        self.api = RestApi(server.manager, server.stats, ready=lambda: server.manager.ready, max_message_bytes=2**22)

    def __call__(self, method: str, path: str, body: Any = b"", **headers: str) -> RestResponse:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        names = {key.replace("_", "-").lower(): value for key, value in headers.items()}
        return self.thread.run(self.api.handle(RestRequest(method, path, "", names, body, None)))

    def json(self, method: str, path: str, body: Any = b"", status: int = 200, **headers: str) -> Any:
        response = self(method, path, body, **headers)
        assert response.status == status, response.body
        return json.loads(response.body) if response.body else None


@pytest.fixture(scope="module")
def server(repo: Path) -> Any:
    from conftest import ServerThread

    from rapidserve.server.settings import ServerSettings

    thread = ServerThread(
        ServerSettings(model_repositories=(repo,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    ).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def api(server: Any) -> Api:
    return Api(server)


def pair(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 16)).astype(np.float32), rng.standard_normal((rows, 16)).astype(np.float32)


def add_sub_request(a: np.ndarray, b: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": list(a.shape), "data": a.tolist()},  # nested
            {"name": "INPUT1", "datatype": "FP32", "shape": list(b.shape), "data": b.ravel().tolist()},  # flat
        ],
        **extra,
    }


def binary_body(document: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, str]:
    header = json.dumps(document).encode()
    return header + b"".join(chunks), str(len(header))


def split(response: RestResponse) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header of an inference answer, and each binary output's bytes by name."""
    length = int(response.headers.get("Inference-Header-Content-Length", len(response.body)))
    header = json.loads(response.body[:length])
    binary: dict[str, bytes] = {}
    offset = length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            binary[output["name"]] = response.body[offset : offset + size]
            offset += size
    assert offset == len(response.body)
    return header, binary


def test_health_metadata_and_config(api: Api) -> None:
    assert api("GET", "/v2/health/live").status == 200 and api("GET", "/v2/health/ready").status == 200
    assert api("GET", "/v2/models/add_sub/ready").status == 200
    assert api("GET", "/v2/models/add_sub/versions/1/ready").status == 200
    assert api.json("GET", "/v2/models/add_sub/versions/2/ready", status=400) == {"error": "Model version not ready"}
    assert api("GET", "/v2/models/missing/ready").status == 400
    server = api.json("GET", "/v2")
    assert server["name"] == "rapidserve" and "statistics" in server["extensions"]
    meta = api.json("GET", "/v2/models/add_sub")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert api.json("GET", "/v2/models/add_sub/versions/1") == meta
    config = api.json("GET", "/v2/models/add_sub/config")
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_FP32", [16]),
        ("INPUT1", "TYPE_FP32", [16]),
    ]


def test_routing_errors(api: Api) -> None:
    assert api("GET", "/v2/nothing").status == 404 and api("GET", "/v2/models/a/b/c").status == 404
    assert api("GET", "/v2/models/add_sub/versions/x").status == 404
    wrong = api("GET", "/v2/models/add_sub/infer")
    assert wrong.status == 405 and json.loads(wrong.body) == {"error": "Method Not Allowed"}
    assert api("POST", "/v2/health/ready").status == 405
    assert api("POST", "/v2/repository/elsewhere/index").status == 501
    assert api.json("GET", "/v2/models/missing", status=404)["error"].startswith("unknown model 'missing'")
    assert api.json("GET", "/v2/models/add_sub/versions/7/config", status=404)["error"].startswith("model 'add_sub'")
    assert api.api.api_of("POST", "/v2/models/add_sub/infer") == "inference"
    assert [api.api.api_of("GET", p) for p in ("/v2/health/live", "/v2", "/v2/models/m/stats", "/v2/x")] == [
        "health",
        "metadata",
        "statistics",
        None,
    ]
    assert api.api.api_of("POST", "/v2/repository/models/m/load") == "model-repository"
    assert api.api.api_of("GET", "/v2/models/m/config") == "model-config"


def test_json_inference_nested_and_flat(api: Api) -> None:
    a, b = pair(3, 1)
    response = api("POST", "/v2/models/add_sub/infer", add_sub_request(a, b, id="one"))
    assert response.status == 200 and response.headers["Content-Type"] == "application/json"
    answer = json.loads(response.body)
    assert answer["id"] == "one" and answer["model_name"] == "add_sub" and answer["model_version"] == "1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    for name, expected in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        assert outputs[name]["datatype"] == "FP32" and outputs[name]["shape"] == [3, 16]
        np.testing.assert_array_equal(np.array(outputs[name]["data"], np.float32).reshape(3, 16), expected)


def test_binary_inference_and_output_selection(api: Api) -> None:
    a, b = pair(2, 2)
    document = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "parameters": {"binary_data_size": a.nbytes}},
            {"name": "INPUT1", "datatype": "FP32", "shape": [2, 16], "parameters": {"binary_data_size": b.nbytes}},
        ],
        "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
    }
    body, length = binary_body(document, [a.tobytes(), b.tobytes()])
    response = api("POST", "/v2/models/add_sub/infer", body, inference_header_content_length=length)
    assert response.status == 200 and response.headers["Content-Type"] == "application/octet-stream"
    header, binary = split(response)
    assert [o["name"] for o in header["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(np.frombuffer(binary["OUTPUT1"], "<f4").reshape(2, 16), a - b)


def identity_inputs(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = {}
    for datatype in ALL_DATATYPES:
        if datatype == "BF16":
            continue
        if datatype == "BYTES":
            arrays[datatype] = np.array([[f"s{i}é{j}".encode() for j in range(3)] for i in range(rows)], object)
        elif datatype == "BOOL":
            arrays[datatype] = rng.integers(0, 2, (rows, 3)).astype(bool)
        else:
            dtype = DATATYPES[datatype]
            if dtype.kind in "iu":
                info = np.iinfo(dtype)
                arrays[datatype] = rng.integers(info.min, info.max, (rows, 3), dtype=dtype, endpoint=True)
            else:
                arrays[datatype] = (rng.standard_normal((rows, 3)) * 100).astype(dtype)
    return arrays


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(api: Api, binary: bool) -> None:
    arrays = identity_inputs(2)
    inputs, chunks = [], []
    for datatype, array in arrays.items():
        tensor: dict[str, Any] = {"name": f"in_{datatype}", "datatype": datatype, "shape": [2, 3]}
        if binary:
            raw = (
                b"".join(struct.pack("<I", len(x)) + x for x in array.ravel())
                if datatype == "BYTES"
                else array.astype(array.dtype.newbyteorder("<")).tobytes()
            )
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = [x.decode() for x in array.ravel()] if datatype == "BYTES" else array.tolist()
        inputs.append(tensor)
    document = {"inputs": inputs, "parameters": {"binary_data_output": binary}}
    body, length = binary_body(document, chunks)
    response = api("POST", "/v2/models/identity/infer", body, inference_header_content_length=length)
    assert response.status == 200, response.body
    header, raw_outputs = split(response)
    outputs = {o["name"]: o for o in header["outputs"]}
    for datatype, array in arrays.items():
        output = outputs[f"out_{datatype}"]
        assert output["datatype"] == datatype and output["shape"] == [2, 3]
        if binary:
            data = raw_outputs[f"out_{datatype}"]
            if datatype == "BYTES":
                expected = b"".join(struct.pack("<I", len(x)) + x for x in array.ravel())
                assert data == expected
            else:
                assert data == array.tobytes(), datatype
        elif datatype == "BYTES":
            assert output["data"] == [x.decode() for x in array.ravel()]
        else:
            got = np.array(output["data"], dtype=array.dtype).reshape(2, 3)
            np.testing.assert_array_equal(got, array, err_msg=datatype)


def test_bf16_as_json_numbers_and_binary(api: Api) -> None:
    values = [1.0, -2.5, 0.15625]
    bf16_bytes = b"".join(struct.pack("<f", v)[2:4] for v in values)
    fp32 = np.array([[4.0, 5.0, 6.0]], np.float32)
    document = {
        "inputs": [
            {"name": "in_BF16", "datatype": "BF16", "shape": [1, 3], "data": values},
            {"name": "in_FP32", "datatype": "FP32", "shape": [1, 3], "data": fp32.tolist()},
        ],
        "outputs": [{"name": "out_BF16", "parameters": {"binary_data": True}}, {"name": "out_FP32"}],
    }
    response = api("POST", "/v2/models/identity_bf16/infer", document)
    header, binary = split(response)
    assert binary["out_BF16"] == bf16_bytes
    assert np.frombuffer(binary["out_BF16"], ml_dtypes.bfloat16).astype(np.float32).tolist() == values
    assert header["outputs"][1]["data"] == [4.0, 5.0, 6.0]


def statistics(api: Api, model: str) -> dict[str, Any]:
    (entry,) = api.json("GET", f"/v2/models/{model}/stats")["model_stats"]
    return entry


def test_malformed_requests_are_400_and_change_nothing(api: Api) -> None:
    before = statistics(api, "add_sub")
    a, b = pair(1, 4)
    good = add_sub_request(a, b)
    bad_bodies: list[tuple[bytes, dict[str, str]]] = [
        (b'{"inputs": [', {}),
        (json.dumps({"inputs": [{**good["inputs"][0], "data": [[1.0, 2.0]]}, good["inputs"][1]]}).encode(), {}),
        (json.dumps({"inputs": [{**good["inputs"][0], "shape": [2, 16]}, good["inputs"][1]]}).encode(), {}),
        (
            json.dumps(
                {"inputs": [{**good["inputs"][0], "data": [[1.0] * 16, [2.0] * 15]}, good["inputs"][1]]}
            ).encode(),
            {},
        ),
    ]
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
            ]
        }
    ).encode()
    bad_bodies.append((header + b"\0" * 100, {"inference_header_content_length": str(len(header))}))
    bad_bodies.append((header + b"\0" * 128, {"inference_header_content_length": str(len(header) + 1000)}))
    for body, headers in bad_bodies:
        response = api("POST", "/v2/models/add_sub/infer", body, **headers)
        assert response.status == 400, (body[:80], response.body)
        assert json.loads(response.body)["error"]
    after = statistics(api, "add_sub")
    for field in ("inference_count", "execution_count", "last_inference"):
        assert after[field] == before[field]
    assert after["inference_stats"]["success"] == before["inference_stats"]["success"]
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + len(bad_bodies)
    assert api("POST", "/v2/models/add_sub/infer", good).status == 200  # and the model still answers


def test_classification_and_errors_of_the_batcher(api: Api) -> None:
    a, b = pair(1, 5)
    document = add_sub_request(a, b, outputs=[{"name": "OUTPUT0", "parameters": {"classification": 3}}])
    assert "classification is not supported" in api.json("POST", "/v2/models/add_sub/infer", document, 400)["error"]
    priority = add_sub_request(a, b, parameters={"priority": 9})
    assert "priority 9" in api.json("POST", "/v2/models/add_sub/infer", priority, 400)["error"]
    assert api("POST", "/v2/models/missing/infer", priority).status == 404
    assert api("POST", "/v2/models/add_sub/versions/3/infer", priority).status == 404
    strings = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 7]}]}
    assert "BYTES data must be strings" in api.json("POST", "/v2/models/strings/infer", strings, 400)["error"]


def test_compressed_request_and_response(api: Api) -> None:
    a, b = pair(4, 6)
    body = json.dumps(add_sub_request(a, b)).encode()
    for encoding, pack in (("gzip", gzip.compress), ("deflate", __import__("zlib").compress)):
        response = api(
            "POST", "/v2/models/add_sub/infer", pack(body), content_encoding=encoding, accept_encoding=encoding
        )
        assert response.status == 200 and response.headers["Content-Encoding"] == encoding
        plain = gzip.decompress(response.body) if encoding == "gzip" else __import__("zlib").decompress(response.body)
        data = json.loads(plain)["outputs"][0]["data"]
        np.testing.assert_array_equal(np.array(data, np.float32).reshape(4, 16), a + b)
    unknown = api("POST", "/v2/models/add_sub/infer", body, content_encoding="br")
    assert unknown.status == 501 and unknown.headers["Accept-Encoding"] == "gzip, deflate"
    bomb = gzip.compress(b" " * (8 * 2**20))  # inflates past the 4 MiB message limit
    assert api("POST", "/v2/models/add_sub/infer", bomb, content_encoding="gzip").status == 413


def test_cache_hits_count_over_http(api: Api) -> None:
    a, b = pair(2, 7)
    before = statistics(api, "cached")["inference_stats"]
    for _ in range(2):
        assert api("POST", "/v2/models/cached/infer", add_sub_request(a, b)).status == 200
    after = statistics(api, "cached")["inference_stats"]
    assert after["cache_hit"]["count"] == before["cache_hit"]["count"] + 1
    assert after["cache_miss"]["count"] == before["cache_miss"]["count"] + 1


def test_statistics_equal_grpc_for_the_same_traffic(api: Api, server: Any) -> None:
    """The same requests to twin models, one over gRPC and one over HTTP, count the same; and the
    HTTP statistics of a model are the gRPC ModelStatistics of it, field for field."""
    with Client(server.url, timeout_s=30) as client:
        for rows, seed in ((1, 10), (3, 11), (2, 12)):
            a, b = pair(rows, seed)
            client.infer("twin_grpc", {"INPUT0": a, "INPUT1": b})
            assert api("POST", "/v2/models/twin_http/infer", add_sub_request(a, b)).status == 200
        a, b = pair(1, 13)
        with pytest.raises(InferenceServerError):
            client.infer("twin_grpc", {"INPUT0": a, "INPUT1": b[:, :8]})
        bad = add_sub_request(a, b[:, :8])
        assert api("POST", "/v2/models/twin_http/infer", bad).status == 400
        grpc_twin = client.model_statistics("twin_grpc").model_stats[0]
        grpc_http = client.model_statistics("twin_http").model_stats[0]
        http_twin = statistics(api, "twin_http")
        all_models = api.json("GET", "/v2/models/stats")["model_stats"]
    assert {(s["name"], s["version"]) for s in all_models} >= {("twin_grpc", "1"), ("twin_http", "1")}
    counts = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
    assert http_twin["inference_count"] == grpc_twin.inference_count == 6
    assert http_twin["execution_count"] == grpc_twin.execution_count == 3
    for name in counts:
        assert http_twin["inference_stats"][name]["count"] == getattr(grpc_twin.inference_stats, name).count, name
    assert [b["batch_size"] for b in http_twin["batch_stats"]] == [b.batch_size for b in grpc_twin.batch_stats]
    assert http_twin["inference_stats"]["fail"]["count"] == 1
    # the same model seen through both edges: every number equal
    assert http_twin["last_inference"] == grpc_http.last_inference
    for name in counts:
        got = http_twin["inference_stats"][name]
        want = getattr(grpc_http.inference_stats, name)
        assert (got["count"], got["ns"]) == (want.count, want.ns), name
    for got, want in zip(http_twin["batch_stats"], grpc_http.batch_stats, strict=True):
        assert got["batch_size"] == want.batch_size
        assert got["compute_infer"] == {"count": want.compute_infer.count, "ns": want.compute_infer.ns}


def test_draining_refuses_inference_and_readiness(repo: Path, serve: Any) -> None:
    api = Api(serve(repo))
    api.api.drain()
    a, b = pair(1, 8)
    assert api.json("POST", "/v2/models/add_sub/infer", add_sub_request(a, b), 503)["error"]
    assert api("GET", "/v2/health/ready").status == 400 and api("GET", "/v2/health/live").status == 200


def test_load_and_unload_with_uploaded_files(repo: Path, serve: Any, tmp_path: Path) -> None:
    server = serve(
        repo, model_control_mode="explicit", load_models=("add_sub",), uploads=UploadPolicy(allow_files=True)
    )
    api = Api(server)
    model = (repo / "add_sub" / "1" / "model.onnx").read_bytes()
    config = json.dumps({"max_batch_size": 8, "backend": "onnxruntime"})
    load = {"parameters": {"config": config, "file:1/model.onnx": base64.b64encode(model).decode()}}
    assert api("POST", "/v2/repository/models/uploaded/load", load).status == 200
    index = {e["name"]: e for e in api.json("POST", "/v2/repository/index", {"ready": True})}
    assert index["uploaded"] == {"name": "uploaded", "version": "1", "state": "READY"}
    a, b = pair(1, 9)
    answer = api.json("POST", "/v2/models/uploaded/infer", add_sub_request(a, b))
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 16), a + b)
    assert (
        api("POST", "/v2/repository/models/uploaded/unload", {"parameters": {"unload_dependents": False}}).status == 200
    )
    assert api("GET", "/v2/models/uploaded/ready").status == 400
    assert api("POST", "/v2/models/uploaded/infer", add_sub_request(a, b)).status == 404
    bad = {"parameters": {"config": config, "file:1/model.onnx": "not base64!"}}
    assert "not valid base64" in api.json("POST", "/v2/repository/models/other/load", bad, 400)["error"]
    assert api("POST", "/v2/repository/models/other/load", {"parameters": {"config": 5}}).status == 400
    assert api("POST", "/v2/repository/models/nowhere/load").status == 404
    assert api("POST", "/v2/repository/models/nowhere/unload").status == 404


def test_loads_are_refused_outside_explicit_mode(api: Api) -> None:
    refused = api.json("POST", "/v2/repository/models/add_sub/load", {}, 400)
    assert "model control mode 'none'" in refused["error"]
    assert api("POST", "/v2/repository/models/add_sub/unload").status == 400
    assert api("GET", "/v2/models/add_sub/ready").status == 200


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_bodies(api: Api, binary: bool) -> None:
    """Bodies as tritonclient.http builds them, and its parser reading the answers."""
    import tritonclient.http as th

    arrays = identity_inputs(2)
    inputs = []
    for datatype, array in arrays.items():
        tensor = th.InferInput(f"in_{datatype}", [2, 3], datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [th.InferRequestedOutput(f"out_{datatype}", binary_data=binary) for datatype in arrays]
    body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs, request_id="tc")
    headers = {} if json_size is None else {"inference_header_content_length": str(json_size)}
    response = api("POST", "/v2/models/identity/infer", body, **headers)
    assert response.status == 200, response.body
    length = response.headers.get("Inference-Header-Content-Length")
    result = th.InferenceServerClient.parse_response_body(
        response.body, header_length=None if length is None else int(length)
    )
    assert result.get_response()["id"] == "tc"
    for datatype, array in arrays.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES" and not binary:
            got = np.array([x.encode() if isinstance(x, str) else x for x in got.ravel()], object).reshape(got.shape)
        np.testing.assert_array_equal(got, array, err_msg=datatype)


def test_a_request_past_its_deadline_is_503_and_counted_as_a_failure(api: Api) -> None:
    import time

    a, b = pair(1, 14)
    before = statistics(api, "add_sub")
    body = json.dumps(add_sub_request(a, b)).encode()
    late = RestRequest("POST", "/v2/models/add_sub/infer", "", {}, body, time.monotonic() - 1)
    response = api.thread.run(api.api.handle(late))
    assert response.status == 503 and json.loads(response.body)["error"]
    after = statistics(api, "add_sub")
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert after["execution_count"] == before["execution_count"]


def test_a_compressed_body_inflates_to_at_most_the_endpoints_limit(api: Api) -> None:
    body = gzip.compress(b" " * 300_000)  # under the 4 MiB message limit, over this endpoint's 200 KB
    request = RestRequest(
        "POST", "/v2/models/add_sub/infer", "", {"content-encoding": "gzip"}, body, None, max_body_bytes=200_000
    )
    response = api.thread.run(api.api.handle(request))
    assert response.status == 413, response.body
    assert "200000" in json.loads(response.body)["error"]


def test_an_answer_over_the_message_limit_is_500_and_counted_against_the_model(api: Api) -> None:
    small = RestApi(api.api._manager, api.api.stats, ready=lambda: True, max_message_bytes=4096)
    a, b = pair(8, 15)  # two FP32 [8, 16] outputs: 1 KB raw, over 4 KB as JSON
    before = statistics(api, "add_sub")
    body = json.dumps(add_sub_request(a, b)).encode()  # about 5 KB of JSON: the answer's JSON is larger
    response = api.thread.run(small.handle(RestRequest("POST", "/v2/models/add_sub/infer", "", {}, body)))
    assert response.status == 500, response.body
    message = json.loads(response.body)["error"]
    assert "more than the server sends (4096" in message and "add_sub" in message
    after = statistics(api, "add_sub")
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1


def test_large_bytes_outputs_and_large_compressed_answers_are_encoded_off_the_event_loop(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from rapidserve.server import rest

    threads: list[tuple[str, str]] = []
    for name, module in (("encode", rest.rest_codec), ("compress", rest)):
        original = getattr(module, "encode_infer_response" if name == "encode" else "compress")

        def spy(*args: Any, _original: Any = original, _name: str = name) -> Any:
            threads.append((_name, threading.current_thread().name))
            return _original(*args)

        monkeypatch.setattr(module, "encode_infer_response" if name == "encode" else "compress", spy)
    loop_thread = api.thread.run(_thread_name())
    # ten 10 KB strings: 100 KB of text in ten pointers (nbytes 80)
    texts = ["x" * 10_000 + str(i) for i in range(10)]
    document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [10], "data": texts}]}
    response = api("POST", "/v2/models/strings/infer", document)
    assert response.status == 200 and json.loads(response.body)["outputs"][0]["data"] == texts
    assert threads == [("encode", threads[0][1])] and threads[0][1] != loop_thread
    # 12 KB of control characters (under the bound), 72 KB as JSON escapes, gzipped
    threads.clear()
    texts = ["\x01" * 12] * 1000
    document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1000], "data": texts}]}
    response = api("POST", "/v2/models/strings/infer", document, accept_encoding="gzip")
    assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(response.body))["outputs"][0]["data"] == texts
    assert len(gzip.decompress(response.body)) > rest.OFF_LOOP_BYTES
    assert [name for name, _ in threads] == ["encode", "compress"]
    assert dict(threads)["compress"] != loop_thread


async def _thread_name() -> str:
    import threading

    return threading.current_thread().name


def test_a_json_part_over_max_json_bytes_is_413_asking_for_binary_data(api: Api) -> None:
    from rapidserve.server import rest_codec

    large = RestApi(api.api._manager, api.api.stats, ready=lambda: True, max_message_bytes=2**25)
    body = b"{" + b" " * rest_codec.MAX_JSON_BYTES + b"}"
    for headers, payload in (({}, body), ({"content-encoding": "gzip"}, gzip.compress(body))):
        request = RestRequest("POST", "/v2/models/add_sub/infer", "", headers, payload)
        response = api.thread.run(large.handle(request))
        assert response.status == 413, response.body
        assert "send large tensors as binary data (binary_data_size)" in json.loads(response.body)["error"]


def test_model_names_in_paths_are_decoded_once(api: Api) -> None:
    # the edge has already percent-decoded the path: this names a model called "add%5Fsub", not add_sub
    response = api("GET", "/v2/models/add%5Fsub")
    assert response.status in (400, 404), response.body
    assert "add%5Fsub" in json.loads(response.body)["error"]
