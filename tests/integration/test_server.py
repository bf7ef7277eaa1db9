"""A real rapidserve server on a free port with real ONNX Runtime, called through tritonclient and
through rapidserve's own clients."""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tc
from standard_services import health_check
from tritonclient.utils import InferenceServerException

from rapidserve import AsyncClient, Client, InferenceServerError, protos
from rapidserve.common.datatypes import DATATYPES

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]


@pytest.fixture(scope="module")
def triton(shared_server):
    client = tc.InferenceServerClient(shared_server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(shared_server):
    with Client(shared_server.url, timeout_s=30) as c:
        yield c


def triton_input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("add_sub") and not triton.is_model_ready("missing")
    meta = triton.get_model_metadata("add_sub", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT0", "FP32", ["-1", "16"]),
        ("INPUT1", "FP32", ["-1", "16"]),
    ]
    config = triton.get_model_config("add_sub").config
    assert config.max_batch_size == 8 and config.backend == "onnxruntime"
    assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]
    auto = triton.get_model_config("identity").config  # no config.pbtxt: completed from the model file
    assert auto.max_batch_size == 32 and len(auto.input) == len(DATATYPES) - 1


def test_fp32_multiple_inputs_outputs_and_output_selection(triton) -> None:
    a = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    inputs = [triton_input("INPUT0", a, "FP32"), triton_input("INPUT1", b, "FP32")]
    result = triton.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = triton.infer("add_sub", inputs, outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)


def test_fp16_int64_and_bytes(triton) -> None:
    half = np.arange(8, dtype=np.float16).reshape(2, 4) / 3
    out = triton.infer("fp16_double", [triton_input("x", half, "FP16")]).as_numpy("y")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, half * 2)
    ints = np.array([[2**40, -5, 0, 7]], dtype=np.int64)
    np.testing.assert_array_equal(
        triton.infer("int64_triple", [triton_input("x", ints, "INT64")]).as_numpy("y"), ints * 3
    )
    words = np.array([b"hello", "w\u00f6rld".encode(), b""], dtype=object)
    echoed = triton.infer("strings", [triton_input("text", words, "BYTES")]).as_numpy("echo")
    assert list(echoed) == list(words)
    with pytest.raises(InferenceServerException, match="string tensors hold UTF-8 text"):
        triton.infer("strings", [triton_input("text", np.array([b"\xff"], dtype=object), "BYTES")])


def test_every_datatype_round_trips_through_the_server(client) -> None:
    rng = np.random.default_rng(3)
    inputs = {}
    for datatype, dtype in DATATYPES.items():
        if datatype == "BYTES":
            array = np.array([[b"a", b"bc", b""], [b"\x00", b"e", b"f"]], dtype=object)
        elif datatype == "BOOL":
            array = rng.integers(0, 2, (2, 3)).astype(bool)
        elif dtype.kind == "f" or dtype == ml_dtypes.bfloat16:
            array = rng.standard_normal((2, 3)).astype(dtype)
        else:
            array = rng.integers(0, 100, (2, 3)).astype(dtype)
        inputs[f"in_{datatype}"] = array
    bf16 = {name: inputs.pop(name) for name in ("in_BF16",)}
    outputs = client.infer("identity", inputs)
    outputs |= client.infer("identity_bf16", {**bf16, "in_FP32": inputs["in_FP32"]}, ["out_BF16"])
    inputs |= bf16
    for datatype, dtype in DATATYPES.items():
        got = outputs[f"out_{datatype}"]
        assert got.dtype == dtype, datatype
        np.testing.assert_array_equal(got, inputs[f"in_{datatype}"])


def test_200_concurrent_requests_each_get_their_own_answer(triton) -> None:
    answers: queue.Queue = queue.Queue()
    expected = {}
    for i in range(200):
        a = np.full((1, 16), i, np.float32)
        b = np.arange(16, dtype=np.float32).reshape(1, 16)
        expected[str(i)] = a + b
        triton.async_infer(
            "add_sub",
            [triton_input("INPUT0", a, "FP32"), triton_input("INPUT1", b, "FP32")],
            callback=lambda result, error: answers.put((result, error)),
            request_id=str(i),
        )
    for _ in range(200):
        result, error = answers.get(timeout=60)
        assert error is None
        request_id = result.get_response().id
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected.pop(request_id))
    assert not expected


def test_async_client_multiplexes_200_calls_over_one_stream(shared_server) -> None:
    # grpc.aio objects must share one event loop per process, so the client runs on the server's loop
    async def run() -> None:
        async with AsyncClient(shared_server.url, timeout_s=30) as client:
            values = [np.full((1, 4), i, np.int64) for i in range(200)]
            results = await asyncio.gather(
                *(client.infer("int64_triple", {"x": v}, request_id=f"q{i}") for i, v in enumerate(values))
            )
            for value, result in zip(values, results, strict=True):
                np.testing.assert_array_equal(result["y"], value * 3)
            with pytest.raises(InferenceServerError) as info:
                await client.infer("int64_triple", {"x": np.zeros((1, 5), np.int64)})
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert (await client.infer("int64_triple", {"x": values[1]}))["y"][0, 0] == 3  # the stream survives
            unary = AsyncClient(shared_server.url, streaming=False)
            assert (await unary.infer("int64_triple", {"x": values[2]}))["y"][0, 0] == 6
            await unary.close()

    shared_server.run(run())


def test_tritonclient_streaming_reports_errors_without_closing_the_stream(shared_server) -> None:
    client = tc.InferenceServerClient(shared_server.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    good = np.ones((2, 4), np.int64)
    client.async_stream_infer("int64_triple", [triton_input("x", good, "INT64")], request_id="ok1")
    client.async_stream_infer("int64_triple", [triton_input("x", np.ones((2, 4), np.int32), "INT32")], request_id="bad")
    client.async_stream_infer("int64_triple", [triton_input("x", good * 2, "INT64")], request_id="ok2")
    seen = {}
    for _ in range(3):
        result, error = answers.get(timeout=30)
        if error is not None:
            seen["bad"] = str(error)
        else:
            seen[result.get_response().id] = result.as_numpy("y")
    client.stop_stream()
    client.close()
    np.testing.assert_array_equal(seen["ok1"], good * 3)
    np.testing.assert_array_equal(seen["ok2"], good * 6)
    assert "datatype INT32 does not match the model's INT64" in seen["bad"]


BAD_REQUESTS = [
    ("unknown model", "nope", {"x": np.zeros((1, 4), np.int64)}, (), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    (
        "wrong datatype",
        "int64_triple",
        {"x": np.zeros((1, 4), np.float32)},
        (),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype FP32 does not match the model's INT64",
    ),
    (
        "wrong shape",
        "int64_triple",
        {"x": np.zeros((1, 5), np.int64)},
        (),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"shape [1, 5] does not match the model's [-1, 4]",
    ),
    (
        "batch too large",
        "add_sub",
        {"INPUT0": np.zeros((9, 16), np.float32), "INPUT1": np.zeros((9, 16), np.float32)},
        (),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch size 9 exceeds the model's max_batch_size 8",
    ),
    (
        "missing input",
        "add_sub",
        {"INPUT0": np.zeros((1, 16), np.float32)},
        (),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input 'INPUT1'",
    ),
    (
        "unknown input",
        "int64_triple",
        {"x": np.zeros((1, 4), np.int64), "z": np.zeros(1, np.int64)},
        (),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected input 'z'",
    ),
    (
        "unknown output",
        "int64_triple",
        {"x": np.zeros((1, 4), np.int64)},
        ("w",),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown output 'w'",
    ),
]


@pytest.mark.parametrize(
    ("case", "model", "inputs", "outputs", "code", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_clear_statuses_and_the_server_goes_on(
    client, case, model, inputs, outputs, code, message
) -> None:
    with pytest.raises(InferenceServerError) as info:
        client.infer(model, inputs, outputs)
    assert info.value.code == code
    assert message in info.value.message
    np.testing.assert_array_equal(client.infer("int64_triple", {"x": np.ones((1, 4), np.int64)})["y"], 3)


def test_malformed_wire_requests_through_tritonclient(triton) -> None:
    """Raw bytes that do not match the declared shape, sent by a client that does not check."""
    tensor = tc.InferInput("x", [1, 4], "INT64")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.int64))
    tensor._raw_content = b"\x00" * 12  # tritonclient trusts this; the server must not
    with pytest.raises(InferenceServerException, match="raw data has 12 bytes, expected 32"):
        triton.infer("int64_triple", [tensor])
    assert triton.is_server_ready()


def test_statistics_count_requests(client) -> None:
    before = client.model_statistics("int64_triple").model_stats[0]
    client.infer("int64_triple", {"x": np.ones((3, 4), np.int64)})
    with pytest.raises(InferenceServerError):
        client.infer("int64_triple", {"x": np.ones((3, 5), np.int64)})
    after = client.model_statistics("int64_triple").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    assert any(b.batch_size == 3 for b in after.batch_stats)
    with pytest.raises(InferenceServerError) as info:
        client.model_statistics("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_grpc_health_and_reflection(shared_server) -> None:
    """Read by grpcio-reflection's own client: an implementation independent of ours."""
    reflection_client = pytest.importorskip(
        "grpc_reflection.v1alpha.proto_reflection_descriptor_database", reason="grpcio-reflection is a dev extra"
    )

    with grpc.insecure_channel(shared_server.url) as channel:
        check = health_check(channel)
        assert check(protos.HealthCheckRequest()).status == protos.HealthCheckResponse.SERVING
        reflection_db = reflection_client.ProtoReflectionDescriptorDatabase(channel)
        services = set(reflection_db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        described = reflection_db.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert "ModelStreamInfer" in [m.name for m in described.service[0].method]


def test_server_metadata_and_repository_index(triton) -> None:
    metadata = triton.get_server_metadata()
    assert metadata.name == "rapidserve" and "model_repository" in metadata.extensions
    index = {m.name: m.state for m in triton.get_model_repository_index().models}
    models = ["add_sub", "fp16_double", "identity", "identity_bf16", "int64_triple", "strings"]
    assert index == dict.fromkeys(models, "READY")


def test_loading_is_refused_in_control_mode_none(client) -> None:
    with pytest.raises(InferenceServerError) as info:
        client.load_model("add_sub")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control-mode explicit" in info.value.message


def test_concurrent_clients_from_threads(shared_server) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with Client(shared_server.url) as c:
                for i in range(20):
                    x = np.full((2, 4), seed * 100 + i, np.int64)
                    np.testing.assert_array_equal(c.infer("int64_triple", {"x": x})["y"], x * 3)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _wire_cases():
    from rapidserve import protos

    def request(shape=(1, 4), raw=(b"\x00" * 32,), name="x"):
        msg = protos.ModelInferRequest(model_name="int64_triple")
        msg.inputs.add(name=name, datatype="INT64", shape=shape)
        msg.raw_input_contents.extend(raw)
        return msg

    mixed = protos.ModelInferRequest(model_name="add_sub")
    mixed.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    mixed.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([0.0] * 16)
    mixed.raw_input_contents.extend([b"\x00" * 64, b"\x00" * 64])
    duplicate = request(raw=(b"\x00" * 32, b"\x00" * 32))
    duplicate.inputs.append(duplicate.inputs[0])
    return [
        (
            "raw count",
            request(raw=(b"\x00" * 32, b"")),
            "raw_input_contents has 2 entries but the request has 1 inputs",
        ),
        ("mixed", mixed, "contents must not be set when raw_input_contents is used"),
        ("duplicate", duplicate, "input 'x' appears more than once"),
        ("negative dim", request(shape=(1, -4)), "negative dimension"),
        ("overflowing dims", request(shape=(2**40, 2**40)), "too large"),
        ("short raw", request(raw=(b"\x00" * 31,)), "raw data has 31 bytes, expected 32"),
    ]


WIRE_CASES = _wire_cases()


@pytest.mark.parametrize(("case", "message", "expected"), WIRE_CASES, ids=[c[0] for c in WIRE_CASES])
def test_malformed_protobuf_requests_are_invalid_argument(shared_server, case, message, expected) -> None:
    from rapidserve import protos

    with grpc.insecure_channel(shared_server.url) as channel:
        infer = channel.unary_unary(
            protos.method_path("ModelInfer"),
            request_serializer=protos.ModelInferRequest.SerializeToString,
            response_deserializer=protos.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            infer(message, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in info.value.details()
        good = protos.ModelInferRequest(model_name="int64_triple")
        good.inputs.add(name="x", datatype="INT64", shape=[1, 4])
        good.raw_input_contents.append(np.full((1, 4), 2, np.int64).tobytes())
        assert np.frombuffer(infer(good, timeout=10).raw_output_contents[0], np.int64).tolist() == [6] * 4


def test_a_malformed_stream_message_ends_the_stream_with_invalid_argument(shared_server) -> None:
    from rapidserve import protos

    good = protos.ModelInferRequest(model_name="int64_triple", id="ok")
    good.inputs.add(name="x", datatype="INT64", shape=[1, 4])
    good.raw_input_contents.append(np.ones((1, 4), np.int64).tobytes())
    with grpc.insecure_channel(shared_server.url) as channel:
        stream = channel.stream_stream(
            protos.method_path("ModelStreamInfer"),
            request_serializer=lambda raw: raw,
            response_deserializer=protos.ModelStreamInferResponse.FromString,
        )
        call = stream(iter([good.SerializeToString(), b"\xff\xff\xff"]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            answers = list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bad stream message" in info.value.details()
    answers = []  # the good request may or may not have been answered before the abort
    assert answers == []


def test_async_client_falls_back_to_unary_where_a_server_has_no_streaming() -> None:
    """A v2 server that has ModelInfer but no ModelStreamInfer: AsyncClient's calls still work."""
    from rapidserve import protos

    async def model_infer(raw: bytes, context) -> bytes:
        request = protos.ModelInferRequest.FromString(raw)
        answer = protos.ModelInferResponse(model_name=request.model_name, id=request.id)
        answer.outputs.add(name="y", datatype="INT64", shape=[1])
        answer.raw_output_contents.append(np.array([len(request.inputs)], np.int64).tobytes())
        return answer.SerializeToString()

    async def run() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(model_infer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(protos.SERVICE_NAME, {"ModelInfer": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for timeout_s in (10, None):
                async with AsyncClient(f"127.0.0.1:{port}", timeout_s=timeout_s) as client:
                    for _ in range(2):  # the first call finds UNIMPLEMENTED, the second goes unary at once
                        result = await client.infer("m", {"a": np.zeros(1), "b": np.zeros(1)})
                        assert result["y"].tolist() == [2]
        finally:
            await server.stop(0)

    asyncio.run(run())


def test_a_long_stream_answers_every_request_with_its_own_result(shared_server) -> None:
    from rapidserve.server.streams import STREAM_MAX_IN_FLIGHT

    total = STREAM_MAX_IN_FLIGHT * 3
    client = tc.InferenceServerClient(shared_server.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(total):
        client.async_stream_infer("int64_triple", [triton_input("x", np.full((1, 4), i, np.int64), "INT64")],
                                  request_id=str(i))  # fmt: skip
    seen = {}
    for _ in range(total):
        result, error = answers.get(timeout=60)
        assert error is None
        seen[result.get_response().id] = int(result.as_numpy("y")[0, 0])
    client.stop_stream()
    client.close()
    assert seen == {str(i): 3 * i for i in range(total)}
