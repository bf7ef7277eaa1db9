"""Property-based fuzzing of the request codec: any ModelInferRequest, and any bytes on the wire,
end in a decoded request or InvalidRequest (INVALID_ARGUMENT), never in another exception."""

from __future__ import annotations

import struct
from typing import Any
from unittest import mock

import grpc
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from testmodels import ALL_DATATYPES, build_repository

from rapidserve import protos
from rapidserve.common import codec as tensor_codec
from rapidserve.common.datatypes import CONTENTS_FIELD, DATATYPES
from rapidserve.common.errors import InvalidTensor
from rapidserve.common.types import TensorSpec
from rapidserve.server import codec
from rapidserve.server.config import ModelSpec
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.wire import Undecodable
from rapidserve.server.wire import parser as deserializer

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SPEC = ModelSpec(
    "m",
    "onnxruntime_onnx",
    8,
    (TensorSpec("x", "FP32", (3,)), TensorSpec("s", "BYTES", ()), TensorSpec("i", "INT8", (2, -1))),
    (TensorSpec("y", "FP32", (3,)), TensorSpec("z", "BYTES", ())),
)
NAMES = ["x", "s", "i", "y", "z", ""]
DATATYPE_NAMES = [*DATATYPES, "FP8", "fp32", "", "STRING", "BYTES\x00"]
# caller strings a message must not echo whole: long, or full of control characters
long_text = st.one_of(st.text(min_size=100, max_size=3000), st.just("\x1b[2J\r\n" * 200))
MAX_MESSAGE = 2000  # the longest a message may grow: shapes of up to 64 dimensions, cut caller strings
CONTENT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=12),
}

dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([-1, -(2**63), 2**31, 2**32 + 1, 2**40, 2**40 + 1, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
shapes = st.one_of(
    st.lists(dims, max_size=4),
    st.integers(60, 70).map(lambda n: [1] * (n - 1) + [0]),  # around numpy's 64-dimension limit
    st.lists(st.sampled_from([0, 2**62]), min_size=2, max_size=4),  # no element, yet no array can have it
)
parameter_keys = st.sampled_from(
    ["priority", "timeout", "classification", "shared_memory_region", "shared_memory_byte_size", "binary_data", "k"]
)
parameter_values = st.one_of(
    st.none(),  # an InferParameter with no choice set
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(2**63, 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
)


def _set_parameters(target: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        param = target[key]
        if value is None:
            param.SetInParent()
        elif isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if value >= 2**63:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value


def _rarely(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` draws. A middle value of the range: hypothesis favours its ends."""
    return bool(draw(st.integers(0, n - 1)) == n // 2)


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(shapes)
    datatype = draw(long_text) if _rarely(draw, 12) else draw(st.sampled_from(DATATYPE_NAMES))
    tensor: dict[str, Any] = {
        "name": draw(long_text) if _rarely(draw, 10) else draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=6))),
        "datatype": datatype,
        "shape": shape,
        "parameters": draw(st.dictionaries(parameter_keys, parameter_values, max_size=2)),
    }
    count = int(np.prod([abs(d) for d in shape[:8]] or [1], dtype=object)) if len(shape) <= 8 else 0
    itemsize = DATATYPES[datatype].itemsize if datatype in DATATYPES else 4
    raw = draw(
        st.one_of(
            st.binary(max_size=64),
            st.just(b"\x00" * (count * itemsize)) if count * itemsize <= 4096 else st.just(b""),
            st.lists(st.binary(max_size=40), max_size=40).map(_bytes_tensor),
            st.lists(st.just(b"ab\x00d"), min_size=30, max_size=40).map(_bytes_tensor),  # the equal-lengths path
        )
    )
    tensor["raw"] = raw
    field = draw(st.one_of(st.none(), st.sampled_from(list(CONTENT_VALUES)), st.just(CONTENTS_FIELD.get(datatype))))
    if field is not None:
        size = count if count <= 64 and draw(st.booleans()) else draw(st.integers(0, 8))
        tensor["contents"] = (field, draw(st.lists(CONTENT_VALUES[field], min_size=size, max_size=size)))
    return tensor


@st.composite
def requests(draw: st.DrawFn) -> Any:
    msg = protos.ModelInferRequest(
        model_name=draw(st.text(max_size=6)), model_version=draw(st.text(max_size=4)), id=draw(st.text(max_size=6))
    )
    _set_parameters(msg.parameters, draw(st.dictionaries(parameter_keys, parameter_values, max_size=3)))
    drawn = draw(st.lists(tensors(), max_size=4))
    raw_mode = draw(st.sampled_from(["raw", "typed", "mixed", "wrong count"]))
    for tensor in drawn:
        added = msg.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        _set_parameters(added.parameters, tensor["parameters"])
        if "contents" in tensor and raw_mode in ("typed", "mixed"):
            field, values = tensor["contents"]
            getattr(added.contents, field).extend(values)
        if raw_mode in ("raw", "mixed"):
            msg.raw_input_contents.append(tensor["raw"])
    if raw_mode == "wrong count":
        msg.raw_input_contents.extend([t["raw"] for t in drawn[1:]] or [b""])
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3)):
        name = draw(long_text) if _rarely(draw, 10) else name
        output = msg.outputs.add(name=name)
        _set_parameters(output.parameters, draw(st.dictionaries(parameter_keys, parameter_values, max_size=2)))
    return msg


@st.composite
def spec_requests(draw: st.DrawFn) -> Any:
    """Requests shaped for ``SPEC`` (right names, datatypes, shapes and data), each then changed in
    one or two places: so that both the accepted and the refused paths are exercised."""
    msg = protos.ModelInferRequest(model_name="m")
    batch = draw(st.integers(0, 9))  # the spec's max_batch_size is 8
    typed = _rarely(draw, 4)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for spec in SPEC.inputs:
        if _rarely(draw, 21):
            continue
        shape = [batch, *(d if d >= 0 else draw(st.integers(0, 3)) for d in spec.shape)]
        if _rarely(draw, 9):
            shape = draw(st.one_of(shapes, st.just([shape[0] + 1, *shape[1:]]), st.just(shape[1:])))
        datatype = draw(st.sampled_from(DATATYPE_NAMES)) if _rarely(draw, 16) else spec.datatype
        name = draw(st.one_of(st.sampled_from(NAMES), long_text)) if _rarely(draw, 16) else spec.name
        count = int(np.prod(shape)) if len(shape) < 8 and all(0 <= d < 64 for d in shape) else 0
        tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "BYTES":
            items = [bytes(rng.integers(0, 256, rng.integers(0, 6), dtype=np.uint8)) for _ in range(count)]
            if typed:
                tensor.contents.bytes_contents.extend(items)
            else:
                msg.raw_input_contents.append(_bytes_tensor(items))
        elif datatype in DATATYPES:
            array = rng.integers(-100, 100, count).astype(DATATYPES[datatype])
            if typed and datatype in CONTENTS_FIELD:
                getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.tolist())
            else:
                msg.raw_input_contents.append(array.tobytes())
        else:
            msg.raw_input_contents.append(b"")
        if _rarely(draw, 13) and msg.raw_input_contents:
            msg.raw_input_contents[-1] = msg.raw_input_contents[-1][: draw(st.integers(0, 8))]
    if len(msg.raw_input_contents) not in (0, len(msg.inputs)):
        msg.raw_input_contents.extend([b""] * (len(msg.inputs) - len(msg.raw_input_contents)))
    for name in draw(st.lists(st.sampled_from(["y", "y", "z", "x", "nope"]), max_size=2, unique=True)):
        msg.outputs.add(name=name)
    return msg


def _outcome(call: Any) -> Any:
    """The call's result, or the InvalidRequest it raised (anything else fails the test)."""
    try:
        return call()
    except InvalidRequest as exc:
        assert str(exc) and len(str(exc)) <= MAX_MESSAGE, str(exc)[:3000]
        return exc


def _same(a: Any, b: Any) -> None:
    """Two outcomes of decoding one request: the same error, or the same arrays."""
    if isinstance(a, InvalidRequest) or isinstance(b, InvalidRequest):
        assert str(a) == str(b)
        return
    assert a.inputs.keys() == b.inputs.keys()
    for name, array in a.inputs.items():
        assert b.inputs[name].dtype == array.dtype and b.inputs[name].shape == array.shape
        np.testing.assert_array_equal(b.inputs[name], array)


@FUZZ
@given(st.one_of(requests(), spec_requests()))
def test_any_request_decodes_or_is_invalid_and_the_spec_agrees_with_validate(msg: Any) -> None:
    codec.heavy(msg)
    codec.heavy(msg, msg.ByteSize())
    plain = _outcome(lambda: codec.decode_request(msg, 1.0))
    checked = _outcome(lambda: codec.decode_request(msg, 1.0, SPEC))
    with mock.patch.object(tensor_codec, "_CHUNK", 2):  # every tensor of more than two elements goes in chunks
        _same(plain, _outcome(lambda: codec.decode_request(msg, 1.0)))
        _same(checked, _outcome(lambda: codec.decode_request(msg, 1.0, SPEC)))
    event(f"decoded: {not isinstance(plain, InvalidRequest)}, with the spec: {not isinstance(checked, InvalidRequest)}")
    if isinstance(plain, InvalidRequest):
        assert isinstance(checked, InvalidRequest)  # nothing a malformed request says passes with a spec
        return
    validated = _outcome(lambda: SPEC.validate(plain))
    assert isinstance(checked, InvalidRequest) == isinstance(validated, InvalidRequest)
    if not isinstance(checked, InvalidRequest):
        assert checked.inputs.keys() == plain.inputs.keys()
        for name, array in plain.inputs.items():
            assert checked.inputs[name].dtype == array.dtype
            np.testing.assert_array_equal(checked.inputs[name], array)


COUNTS = st.one_of(st.integers(0, 4), st.sampled_from([63, 64, 65, 4095, 4096, 4097, 50_000]))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(COUNTS, COUNTS, COUNTS, st.booleans())
def test_inputs_outputs_and_parameters_in_any_number_are_refused_by_their_count(
    inputs: int, outputs: int, parameters: int, raw: bool
) -> None:
    """However many entries a request has, the codec answers from their number first: a request over
    the model's counts or the caps is refused with that number, and heavy() sends anything with more
    than a few dozen entries off the event loop."""
    msg = protos.ModelInferRequest()
    for index in range(min(inputs, 5)):
        msg.inputs.add(name=f"in{index}", datatype="UINT8", shape=[1])
    msg.inputs.extend([protos.ModelInferRequest.InferInputTensor(datatype="UINT8")] * max(inputs - 5, 0))
    if raw:
        msg.raw_input_contents.extend([b"\x00"] * inputs)
    for index in range(min(outputs, 5)):
        msg.outputs.add(name=f"out{index}")
    msg.outputs.extend([protos.ModelInferRequest.InferRequestedOutputTensor()] * max(outputs - 5, 0))
    for index in range(parameters):
        msg.parameters[f"p{index}"].bool_param = True
    if inputs + outputs + parameters > 64:
        assert codec.heavy(msg) and codec.heavy(msg, msg.ByteSize())
    else:
        codec.heavy(msg)
    plain = _outcome(lambda: codec.decode_request(msg))
    if inputs > 4096:
        assert str(plain) == f"the request has {inputs} inputs; at most 4096 are accepted"
    elif outputs > 4096:
        assert str(plain) == f"the request asks for {outputs} outputs; at most 4096 are accepted"
    elif parameters > 4096:
        assert str(plain) == f"the request has {parameters} parameters; at most 4096 are accepted"
    else:
        # past five named entries, the unnamed ones repeat a name; typed inputs lack their contents
        assert isinstance(plain, InvalidRequest) == (inputs > 6 or outputs > 6 or (inputs > 0 and not raw))
    checked = _outcome(lambda: codec.decode_request(msg, None, SPEC))
    if inputs > len(SPEC.inputs):
        assert str(checked).startswith(f"the request has {inputs} inputs but model 'm' takes 3: ")
    elif outputs > len(SPEC.outputs):
        assert str(checked).startswith(f"the request asks for {outputs} outputs but model 'm' has 2: ")
    elif parameters > 4096:
        assert str(checked) == f"the request has {parameters} parameters; at most 4096 are accepted"
    else:
        assert isinstance(checked, InvalidRequest)  # names the model does not have


def _large(msg: Any) -> bytes:
    """A request past the size from which the deserializer splits raw entries out as views."""
    items = [bytes([i % 251]) * (i % 600) for i in range(4500)]  # 1.35 MB of BYTES elements
    msg.raw_input_contents.insert(0, _bytes_tensor(items))
    return bytes(msg.SerializeToString())


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=256),
        requests().map(lambda msg: msg.SerializeToString()),
        spec_requests().map(lambda msg: msg.SerializeToString()),
        st.one_of(requests(), spec_requests()).map(_large),
    ),
    st.data(),
)
def test_any_bytes_through_the_request_deserializer(data: bytes, draw: st.DataObject) -> None:
    if data and draw.draw(st.booleans()):  # corrupt a message in a few places to get past its first bytes
        for _ in range(draw.draw(st.integers(1, 3))):
            position = draw.draw(st.one_of(st.integers(0, min(len(data), 64) - 1), st.integers(0, len(data) - 1)))
            data = data[:position] + draw.draw(st.binary(min_size=1, max_size=4)) + data[position + 1 :]
    msg = deserializer(protos.ModelInferRequest)(data)
    if isinstance(msg, Undecodable):
        assert msg.reason.startswith("the request is not a valid inference.ModelInferRequest")
        return
    event(type(msg).__name__)  # large ones come split: their raw entries are views of ``data``
    codec.heavy(msg, len(data))
    _outcome(lambda: codec.decode_request(msg, None, SPEC))
    _outcome(lambda: codec.decode_request(msg))


@st.composite
def responses(draw: st.DrawFn) -> Any:
    msg = protos.ModelInferResponse(model_name="m", model_version="1")
    for tensor in draw(st.lists(tensors(), max_size=3)):
        added = msg.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        if "contents" in tensor and draw(st.booleans()):
            field, values = tensor["contents"]
            getattr(added.contents, field).extend(values)
        else:
            msg.raw_output_contents.append(tensor["raw"])
    return msg


@FUZZ
@given(responses())
def test_any_response_decodes_or_is_invalid_on_the_client(msg: Any) -> None:
    try:
        tensor_codec.decode_response(msg)
    except InvalidTensor as exc:  # the client's error for a malformed response
        assert str(exc) and len(str(exc)) <= MAX_MESSAGE, str(exc)[:3000]


# --- a real server receiving generated request bytes -------------------------------------------

IDENTITY_TYPES = [t for t in ALL_DATATYPES if t != "BF16"]
# model -> (inputs: name -> (datatype, dims after the batch dimension), outputs)
SERVER_MODELS: dict[str, tuple[dict[str, tuple[str, list[int]]], list[str]]] = {
    "add_sub": ({"INPUT0": ("FP32", [16]), "INPUT1": ("FP32", [16])}, ["OUTPUT0", "OUTPUT1"]),
    "identity": ({f"in_{t}": (t, [3]) for t in IDENTITY_TYPES}, [f"out_{t}" for t in IDENTITY_TYPES]),
    "identity_bf16": ({"in_BF16": ("BF16", [3]), "in_FP32": ("FP32", [3])}, ["out_BF16", "out_FP32"]),
    "fp16_double": ({"x": ("FP16", [4])}, ["y"]),
    "int64_triple": ({"x": ("INT64", [4])}, ["y"]),
    "strings": ({"text": ("BYTES", [])}, ["echo"]),  # no batching: its one dimension is any size
}


@st.composite
def server_requests(draw: st.DrawFn) -> bytes:
    """Requests aimed at the standard test repository's models: mostly well formed (right names,
    datatypes and sizes, a batch dimension), each part drawn to be wrong now and then."""
    if _rarely(draw, 10):
        return draw(st.one_of(requests(), spec_requests())).SerializeToString()  # anything at all
    model = "missing" if _rarely(draw, 16) else draw(st.sampled_from(list(SERVER_MODELS)))
    version = draw(st.sampled_from(["1", "2", "x", "\u00b2", "9" * 400])) if _rarely(draw, 8) else ""
    msg = protos.ModelInferRequest(model_name=model, model_version=version, id=draw(st.text(max_size=4)))
    inputs, outputs = SERVER_MODELS.get(model, ({"a": ("FP32", [1])}, ["b"]))
    leading = [draw(st.integers(0, 3))]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for name, (datatype, dims) in inputs.items():
        if _rarely(draw, 20):
            continue  # a missing input
        datatype = draw(st.sampled_from(DATATYPE_NAMES)) if _rarely(draw, 20) else datatype
        shape = draw(shapes) if _rarely(draw, 10) else leading + dims
        name = draw(st.sampled_from(NAMES)) if _rarely(draw, 20) else name
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        count = int(np.prod(shape)) if len(shape) < 6 and all(0 <= d < 64 for d in shape) else 1
        if datatype == "BYTES":
            data = _bytes_tensor(
                [bytes(rng.integers(32, 127, rng.integers(0, 8), dtype=np.uint8)) for _ in range(count)]
            )
        elif datatype in DATATYPES:
            data = rng.integers(0, 256, count * DATATYPES[datatype].itemsize, dtype=np.uint8).tobytes()
        else:
            data = b""
        if _rarely(draw, 10):
            data = draw(st.binary(max_size=32))
        msg.raw_input_contents.append(data)
    for name in draw(st.lists(st.sampled_from([*outputs, "nope"]), max_size=2, unique=True)):
        msg.outputs.add(name=name)
    if _rarely(draw, 8):
        _set_parameters(msg.parameters, draw(st.dictionaries(parameter_keys, parameter_values, max_size=2)))
    data = msg.SerializeToString()
    if _rarely(draw, 10):
        data = data[: draw(st.integers(0, len(data)))]  # cut short
    return data


# every request here is the client's mistake or fine: INTERNAL would be a server bug (an engine
# reached with input it cannot take, an unexpected exception), UNKNOWN or a timeout worse
ANSWERED = {code for code in grpc.StatusCode} - {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
}


def test_a_real_server_answers_every_generated_request_and_stays_live(serve: Any, tmp_path: Any) -> None:
    """Generated request bytes over a raw channel (no client-side serializer to tidy them up): each
    gets a status the client caused or OK within the timeout, no message carries a traceback or a
    host path, and the server answers ServerLive between batches."""
    server = serve(build_repository(tmp_path))
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=protos.ServerLiveRequest.SerializeToString,
            response_deserializer=protos.ServerLiveResponse.FromString,
        )
        codes: dict[grpc.StatusCode, int] = {}
        sent = 0

        @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(server_requests())
        def answered(data: bytes) -> None:
            nonlocal sent
            try:
                answer = infer(data, timeout=10)
                protos.ModelInferResponse.FromString(answer)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code in ANSWERED, (code, exc.details())
                details = exc.details() or ""
                assert "Traceback" not in details and str(tmp_path) not in details
            codes[code] = codes.get(code, 0) + 1
            sent += 1
            if sent % 25 == 0:
                assert live(protos.ServerLiveRequest(), timeout=5).live

        answered()
        assert live(protos.ServerLiveRequest(), timeout=5).live
    assert sent >= 150, sent
    assert codes.get(grpc.StatusCode.OK, 0) > 0 and codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0, codes
