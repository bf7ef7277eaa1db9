from __future__ import annotations

import asyncio
import itertools
import struct
import time
import types

import ml_dtypes
import numpy as np
import pytest

from rapidserve import protos
from rapidserve.common import codec as shared
from rapidserve.common.datatypes import CONTENTS_FIELD, DATATYPES
from rapidserve.common.errors import InvalidTensor
from rapidserve.common.types import TensorSpec
from rapidserve.server import codec
from rapidserve.server.config import ModelSpec
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.types import InferResponse


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(1)
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        values = [b"", b"a", "\u00e9t\u00e9".encode(), b"\x00\xff", b"x" * 300, b"z"]
        return np.array(values[: int(np.prod(shape))], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f" or datatype == "BF16":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def request_with(datatype: str, array: np.ndarray, raw: bool = True):
    msg = protos.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=array.shape)
    if raw:
        msg.raw_input_contents.append(shared.tensor_to_raw(array, datatype))
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return msg


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    decoded = codec.decode_request(request_with(datatype, array)).inputs["x"]
    assert decoded.dtype == DATATYPES[datatype]
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.fixture(params=[None, 3], ids=["default chunks", "chunks of 3"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are converted a chunk at a time: with chunks of 3 the small tensors here take
    that path too, and must give the same arrays and the same errors."""
    if request.param is not None:
        monkeypatch.setattr(shared, "_CHUNK", request.param)


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELD))
@pytest.mark.usefixtures("chunk")
def test_typed_contents_every_datatype_that_has_a_field(datatype: str) -> None:
    array = sample(datatype)
    decoded = codec.decode_request(request_with(datatype, array, raw=False)).inputs["x"]
    assert decoded.dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(decoded, array)


def test_raw_numeric_input_is_a_zero_copy_view() -> None:
    msg = request_with("FP32", np.arange(6, dtype=np.float32).reshape(2, 3))
    decoded = codec.decode_request(msg).inputs["x"]
    assert not decoded.flags.owndata  # a view over the message's bytes, not a copy


def test_response_outputs_are_always_raw_and_round_trip() -> None:
    outputs = {t: sample(t) for t in DATATYPES}
    msg = codec.encode_response(InferResponse("m", "1", outputs, id="abc"))
    assert len(msg.raw_output_contents) == len(outputs)
    assert all(not out.HasField("contents") for out in msg.outputs)
    assert [o.datatype for o in msg.outputs] == list(outputs)
    decoded = shared.decode_response(msg)
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_bf16_raw_bytes_are_the_upper_half_of_float32() -> None:
    values = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    expected = b"".join(v.tobytes()[2:4] for v in values)
    assert shared.tensor_to_raw(values.astype(ml_dtypes.bfloat16), "BF16") == expected


def test_str_elements_of_bytes_outputs_are_sent_as_utf8() -> None:
    raw = shared.serialize_bytes(np.array(["h\u00e9", b"\x01"], dtype=object))
    assert raw == b"\x03\x00\x00\x00h\xc3\xa9\x01\x00\x00\x00\x01"


def _error(msg) -> str:
    with pytest.raises(InvalidRequest) as info:
        codec.decode_request(msg)
    return str(info.value)


def test_raw_length_must_match_shape_and_datatype() -> None:
    msg = request_with("FP32", np.zeros((2, 3), np.float32))
    msg.inputs[0].shape[:] = [2, 4]
    assert "raw data has 24 bytes, expected 32 for FP32 with shape [2, 4]" in _error(msg)


def test_negative_and_overflowing_dims() -> None:
    msg = request_with("FP32", np.zeros((2, 3), np.float32))
    msg.inputs[0].shape[:] = [2, -3]
    assert "negative dimension" in _error(msg)
    msg.inputs[0].shape[:] = [2**40, 2**40]
    assert "too large" in _error(msg)


def test_raw_entries_must_match_inputs() -> None:
    msg = request_with("FP32", np.zeros((2, 3), np.float32))
    msg.raw_input_contents.append(b"")
    assert "raw_input_contents has 2 entries but the request has 1 inputs" in _error(msg)


def test_raw_mixed_with_typed_is_rejected() -> None:
    msg = request_with("FP32", np.zeros((1, 1), np.float32))
    msg.inputs.add(name="y", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    msg.raw_input_contents.append(b"\x00" * 4)
    assert "contents must not be set when raw_input_contents is used" in _error(msg)


def test_duplicate_inputs_and_outputs() -> None:
    msg = request_with("FP32", np.zeros((1,), np.float32))
    msg.inputs.append(msg.inputs[0])
    msg.raw_input_contents.append(msg.raw_input_contents[0])
    assert "appears more than once" in _error(msg)
    msg = request_with("FP32", np.zeros((1,), np.float32))
    msg.outputs.add(name="y")
    msg.outputs.add(name="y")
    assert "requested more than once" in _error(msg)


def test_unknown_datatype_and_fp16_typed() -> None:
    msg = request_with("FP32", np.zeros((1,), np.float32))
    msg.inputs[0].datatype = "FLOAT32"
    assert "unknown datatype 'FLOAT32'" in _error(msg)
    typed = protos.ModelInferRequest()
    typed.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    assert "FP16 data can only be sent in raw_input_contents" in _error(typed)


@pytest.mark.usefixtures("chunk")
def test_typed_element_count_and_range() -> None:
    msg = request_with("INT32", np.zeros((2, 2), np.int32), raw=False)
    msg.inputs[0].shape[:] = [2, 3]
    assert "int_contents has 4 elements, expected 6" in _error(msg)
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="b", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    assert "out of range for INT8" in _error(msg)
    msg.inputs[0].shape[:] = [8]
    msg.inputs[0].contents.int_contents[:] = [1, 2, 3, 4, 5, 6, 7, -129]  # in the last chunk of 3
    assert _error(msg) == "input 'b': a value is out of range for INT8"


@pytest.mark.usefixtures("chunk")
def test_malformed_bytes_tensors() -> None:
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="s", datatype="BYTES", shape=[2])
    msg.raw_input_contents.append(b"\x01\x00\x00\x00a\x05\x00\x00\x00ab")
    assert "BYTES element 1 claims 5 bytes but only 2 remain" in _error(msg)
    msg.raw_input_contents[0] = b"\x01\x00\x00\x00a\x01\x00\x00\x00bEXTRA"
    assert "5 bytes left over" in _error(msg)
    msg.raw_input_contents[0] = b"\x05\x00\x00\x00abcde\x00\x00\x00"
    assert "ends after 1 of 2 elements" in _error(msg)
    msg.raw_input_contents[0] = b"\x01\x00\x00\x00a\x01\x00"
    assert "7 bytes cannot hold 2 BYTES elements" in _error(msg)


def test_a_tiny_request_cannot_claim_billions_of_bytes_elements() -> None:
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="s", datatype="BYTES", shape=[2**32])
    msg.raw_input_contents.append(b"")
    assert "0 bytes cannot hold 4294967296 BYTES elements" in _error(msg)  # refused before allocating


def test_shared_memory_and_classification_are_refused_clearly() -> None:
    msg = request_with("FP32", np.zeros((1,), np.float32))
    msg.inputs[0].parameters["shared_memory_region"].string_param = "r"
    assert "shared memory is not supported" in _error(msg)
    msg = request_with("FP32", np.zeros((1,), np.float32))
    msg.outputs.add(name="y").parameters["classification"].int64_param = 3
    assert "classification extension is not supported" in _error(msg)


def test_parameters_and_request_fields_are_decoded() -> None:
    msg = shared.encode_request(
        "m",
        {"x": np.zeros(2, np.float32)},
        ["y"],
        model_version="3",
        request_id="r1",
        parameters={"priority": 2, "flag": True, "note": "hi", "ratio": 0.5},
    )
    request = codec.decode_request(msg, deadline=12.5)
    assert (request.model_name, request.model_version, request.id, request.outputs) == ("m", "3", "r1", ("y",))
    assert request.parameters == {"priority": 2, "flag": True, "note": "hi", "ratio": 0.5}
    assert request.deadline == 12.5


# --- checks against the model before any decoding ----------------------------------------------

SPEC = ModelSpec(
    "m",
    "onnxruntime_onnx",
    4,
    (TensorSpec("x", "FP32", (3,)), TensorSpec("s", "BYTES", ())),
    (TensorSpec("y", "FP32", (3,)),),
)


def _spec_request(**overrides: tuple[str, list[int], bytes]) -> protos.ModelInferRequest:
    tensors = {"x": ("FP32", [2, 3], b"\x00" * 24), "s": ("BYTES", [2], shared.serialize_bytes(np.array([b"a", b""])))}
    tensors.update(overrides)
    msg = protos.ModelInferRequest(model_name="m")
    for name, entry in tensors.items():
        if entry is None:
            continue
        datatype, shape, raw = entry
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(raw)
    return msg


@pytest.mark.parametrize(
    ("overrides", "outputs", "message"),
    [
        ({"s": None, "z": ("FP32", [2, 3], b"\x00" * 24)}, (), "unexpected input 'z' for model 'm'; it takes: x, s"),
        ({"s": None}, (), "missing input 's' for model 'm'"),
        ({"x": ("FP64", [2, 3], b"\x00" * 48)}, (), "input 'x': datatype FP64 does not match the model's FP32"),
        (
            {"x": ("FP32", [2, 4], b"\x00" * 32)},
            (),
            "input 'x': shape [2, 4] does not match the model's [-1, 3] (-1 = any size)",
        ),
        (
            {"x": ("FP32", [6], b"\x00" * 24)},
            (),
            "input 'x': shape [6] does not match the model's [-1, 3] (-1 = any size)",
        ),
        ({"x": ("FP32", [5, 3], b"\x00" * 60)}, (), "input 'x': batch size 5 exceeds the model's max_batch_size 4"),
        ({"s": ("BYTES", [3], b"\x00" * 12)}, (), "input 's': batch size 3 differs from the other inputs' 2"),
        ({}, ("nope",), "unknown output 'nope' requested from model 'm'; it has: y"),
    ],
)
def test_the_spec_is_checked_with_validates_words(overrides: dict, outputs: tuple[str, ...], message: str) -> None:
    msg = _spec_request(**overrides)
    for name in outputs:
        msg.outputs.add(name=name)
    with pytest.raises(InvalidRequest) as early:
        codec.decode_request(msg, None, SPEC)
    with pytest.raises(InvalidRequest) as late:
        SPEC.validate(codec.decode_request(msg))
    assert str(early.value) == str(late.value) == message


def test_a_request_that_fits_the_spec_decodes_as_without_it() -> None:
    msg = _spec_request()
    msg.outputs.add(name="y")
    checked, plain = codec.decode_request(msg, 3.0, SPEC), codec.decode_request(msg, 3.0)
    assert list(checked.inputs) == list(plain.inputs) == ["x", "s"]
    for name, array in plain.inputs.items():
        assert checked.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(checked.inputs[name], array)
    assert checked.outputs == ("y",) and checked.deadline == 3.0
    SPEC.validate(checked)


def test_a_huge_bytes_tensor_for_an_fp32_input_is_refused_before_any_element_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count = 10_000_000  # 40 MB of empty elements: seconds of work element by element
    msg = _spec_request(x=("BYTES", [count], b"\x00" * (4 * count)))
    calls = {"deserialize": 0, "unpack": 0}
    real_deserialize = codec.deserialize_bytes

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls["deserialize"] += 1
        return real_deserialize(*args, **kwargs)

    monkeypatch.setattr(codec, "deserialize_bytes", counting)
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match="input 'x': datatype BYTES does not match the model's FP32"):
        codec.decode_request(msg, None, SPEC)
    assert time.perf_counter() - started < 1.0  # generous: the check itself is microseconds
    assert calls["deserialize"] == 0
    msg = _spec_request(s=("BYTES", [count], b"\x00" * (4 * count)))  # right datatype, batch over the limit
    with pytest.raises(InvalidRequest, match="batch size 10000000 exceeds the model's max_batch_size 4"):
        codec.decode_request(msg, None, SPEC)
    assert calls["deserialize"] == 0


def test_a_later_input_is_checked_before_an_earlier_one_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="s", datatype="BYTES", shape=[2])
    msg.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    msg.inputs[1].contents.fp32_contents.extend([1.0] * 5)  # one short
    msg.inputs[0].contents.bytes_contents.extend([b"a", b"b"])
    converted = []
    monkeypatch.setattr(codec, "convert_contents", lambda *args: converted.append(args))
    with pytest.raises(InvalidRequest, match="fp32_contents has 5 elements, expected 6"):
        codec.decode_request(msg)
    assert converted == []


# --- shapes numpy cannot hold -------------------------------------------------------------------

ABSURD_SHAPES = [
    ([2**62, 2**62, 0], "is too large"),  # no element, yet no array has this shape
    ([2**40, 2**40, 0], "is too large"),
    ([0, 2**41], "is too large"),
    ([2**41], "is too large"),
    ([2**63 - 1, 2**63 - 1], "is too large"),
    ([3, -1], "has a negative dimension"),
    ([-2, -3], "has a negative dimension"),  # a positive product
    ([1] * 65, "shape has 65 dimensions; at most 64 are supported"),
    ([0] * 100, "shape has 100 dimensions"),
]


@pytest.mark.parametrize(("shape", "message"), ABSURD_SHAPES)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "INT8"])
@pytest.mark.parametrize("raw", [True, False])
def test_absurd_shapes_are_invalid_requests(shape: list[int], message: str, datatype: str, raw: bool) -> None:
    msg = protos.ModelInferRequest()
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw:
        msg.raw_input_contents.append(b"")
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend([])
    assert message in _error(msg)
    response = protos.ModelInferResponse()
    response.outputs.add(name="y", datatype=datatype, shape=shape)
    if raw:
        response.raw_output_contents.append(b"")
    with pytest.raises(InvalidTensor, match=f"output 'y': .*{message.split(';')[0][:20]}"):
        shared.decode_response(response)


def test_shapes_with_zero_and_large_dims_within_the_limit_still_decode() -> None:
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="x", datatype="FP32", shape=[2**20, 0, 2**20])
    msg.raw_input_contents.append(b"")
    assert codec.decode_request(msg).inputs["x"].shape == (2**20, 0, 2**20)
    msg.inputs[0].shape[:] = [1] * 64
    msg.raw_input_contents[0] = b"\x00" * 4
    assert codec.decode_request(msg).inputs["x"].ndim == 64


# --- BYTES decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items",
    [
        [b"abcd"] * 40,  # one length: the vectorized split
        [b""] * 40,
        [b"\x00\x00ab\x00"] * 33,  # trailing NULs survive
        [bytes([i % 7]) * (i % 5) for i in range(100)],  # mixed lengths
        [b"ab"] * 10 + [b"abc"] + [b"ab"] * 30,  # one odd element among equal ones
        [b"x" * 300],
        [],
    ],
)
@pytest.mark.usefixtures("chunk")
def test_bytes_tensors_split_exactly(items: list[bytes]) -> None:
    buffer = b"".join(struct.pack("<I", len(item)) + item for item in items)
    decoded = shared.deserialize_bytes("s", buffer, len(items))
    assert decoded.dtype == object and decoded.shape == (len(items),)
    assert [type(item) for item in decoded] == [bytes] * len(items)
    assert decoded.tolist() == items


@pytest.mark.parametrize("items", [[b"ab\x00"] * 40, [b"a" * (i % 4) for i in range(40)], [b"x", b""]])
@pytest.mark.usefixtures("chunk")
def test_bytes_elements_are_bytes_when_the_data_is_a_view(items: list[bytes]) -> None:
    data = b"".join(struct.pack("<I", len(item)) + item for item in items)
    decoded = shared.deserialize_bytes("s", memoryview(data), len(items))  # large requests' raw entries are views
    assert [type(item) for item in decoded] == [bytes] * len(items) and decoded.tolist() == items


def test_equal_lengths_in_total_but_not_each_take_the_strict_path() -> None:
    items = [b"ab"] * 20 + [b"a", b"abc"] + [b"ab"] * 20  # sums to what 42 two-byte elements need
    buffer = b"".join(struct.pack("<I", len(item)) + item for item in items)
    assert shared.deserialize_bytes("s", buffer, len(items)).tolist() == items


@pytest.mark.parametrize(
    ("buffer", "message"),
    [
        (b"\x02\x00\x00\x00ab" * 39 + b"\x09\x00\x00\x00ab", "BYTES element 39 claims 9 bytes but only 2 remain"),
        (b"\x02\x00\x00\x00ab" * 40 + b"\x00", "1 bytes left over after 40 BYTES elements"),
        (b"\x02\x00\x00\x00ab" * 20 + b"\x28\x00\x00\x00" + b"z" * 40 + b"\x00\x00", "ends after 21 of 40 elements"),
        (b"\x02\x00\x00\x00ab" * 39 + b"\x02\x00\x00\x00a", "BYTES element 39 claims 2 bytes but only 1 remain"),
    ],
)
@pytest.mark.usefixtures("chunk")
def test_malformed_bytes_tensors_with_many_elements(buffer: bytes, message: str) -> None:
    with pytest.raises(InvalidTensor, match=message):
        shared.deserialize_bytes("s", buffer, 40)


# --- heavy() ------------------------------------------------------------------------------------


class _UnreadableRaw(list):
    """Raw entries whose data must not be read (doing so copies it out of the message)."""

    def __getitem__(self, index: object) -> bytes:
        raise AssertionError("heavy() read a raw entry")

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("heavy() read the raw entries")


class _Request:
    def __init__(self, msg: protos.ModelInferRequest) -> None:
        self.inputs = msg.inputs
        self.outputs = msg.outputs
        self.parameters = msg.parameters
        self.raw_input_contents = _UnreadableRaw([None] * len(msg.raw_input_contents))


def test_heavy_flags_costly_decodes_from_shapes_and_counts_alone() -> None:
    digits = shared.encode_request("digits", {"pixels": np.zeros((1, 64), np.float32)})
    assert not codec.heavy(_Request(digits))
    assert not codec.heavy(digits, digits.ByteSize())
    many = protos.ModelInferRequest()
    many.inputs.add(name="s", datatype="BYTES", shape=[1_000_000])
    many.raw_input_contents.append(b"")
    assert codec.heavy(_Request(many))
    big = protos.ModelInferRequest()
    big.inputs.add(name="x", datatype="FP32", shape=[64, 1024, 1024])  # 256 MiB claimed: a slow copy
    big.raw_input_contents.append(b"")
    assert codec.heavy(_Request(big))
    typed = protos.ModelInferRequest()
    typed.inputs.add(name="x", datatype="FP32", shape=[1_000_000]).contents.fp32_contents.extend([0.0] * 1_000_000)
    assert codec.heavy(typed)
    assert not codec.heavy(typed, 1000)  # the caller knows the message is small
    assert codec.heavy(digits, 200 * 2**20)  # or that it is large, whatever the shapes say
    odd = protos.ModelInferRequest()
    odd.inputs.add(name="x", datatype="FP32", shape=[1] * 100)
    odd.inputs.add(name="y", datatype="NOPE", shape=[-(2**63), 2**63 - 1])
    odd.raw_input_contents.extend([b"", b""])
    codec.heavy(_Request(odd))  # whatever it answers, it does not raise


# --- work bounded by counts checked first -------------------------------------------------------


class _Countable:
    """A repeated field of a hostile size that may be measured, and its first few entries read (as
    many as a model may have), but not walked."""

    def __init__(self, size: int, prefix: str = "") -> None:
        self.size = size
        self.prefix = prefix

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("walked a caller-sized field before checking its length")

    def __getitem__(self, index: object) -> object:
        if isinstance(index, slice) and index.start is None and index.stop is not None and index.stop <= 8:
            return [types.SimpleNamespace(name=f"{self.prefix}{i}") for i in range(min(index.stop, self.size))]
        raise AssertionError("walked a caller-sized field before checking its length")

    def __contains__(self, key: object) -> bool:
        raise AssertionError("looked into a caller-sized field before checking its length")


class _Counts:
    """A request whose inputs, outputs and parameters can only be counted."""

    def __init__(self, inputs: int = 0, outputs: int = 0, parameters: int = 0, raw: bool = True) -> None:
        self.model_name, self.model_version, self.id = "m", "", ""
        self.inputs = _Countable(inputs, "in")
        self.outputs = _Countable(outputs, "out")
        self.parameters = _Countable(parameters)
        self.raw_input_contents = _Countable(inputs if raw else 0)


@pytest.mark.parametrize(
    "counts",
    [{"inputs": 524_288}, {"outputs": 100}, {"parameters": 100}, {"inputs": 30, "outputs": 20, "parameters": 20}],
)
def test_heavy_sends_many_tensors_or_parameters_off_the_loop_without_walking_them(counts: dict[str, int]) -> None:
    msg = _Counts(**counts)
    assert codec.heavy(msg)
    assert codec.heavy(msg, 1000)  # small on the wire: empty entries cost two bytes each
    assert codec.heavy(msg, 2**20)


def test_heavy_on_a_real_request_of_a_million_empty_inputs() -> None:
    msg = protos.ModelInferRequest(model_name="digits")
    msg.inputs.extend([protos.ModelInferRequest.InferInputTensor()] * 2**19)
    data = msg.SerializeToString()
    assert len(data) == 2**20 + len(b"\x0a\x06digits")
    assert codec.heavy(protos.ModelInferRequest.FromString(data), len(data))


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"inputs": 3}, "the request has 3 inputs but model 'm' takes 2: x, s (unexpected input 'in0')"),
        (
            {"inputs": 524_288, "raw": False},
            "the request has 524288 inputs but model 'm' takes 2: x, s (unexpected input 'in0')",
        ),
        ({"inputs": 2, "outputs": 2}, "the request asks for 2 outputs but model 'm' has 1: y (unknown output 'out0')"),
        (
            {"inputs": 2, "outputs": 100_000},
            "the request asks for 100000 outputs but model 'm' has 1: y (unknown output 'out0')",
        ),
        (
            {"inputs": 2, "parameters": 4097},
            "the request has 4097 parameters; at most 4096 are accepted",
        ),
    ],
)
def test_with_a_spec_more_tensors_than_the_model_has_are_refused_before_any_is_read(
    counts: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        codec.decode_request(_Counts(**counts), None, SPEC)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"inputs": 4097}, "the request has 4097 inputs; at most 4096 are accepted"),
        ({"inputs": 524_288, "raw": False}, "the request has 524288 inputs; at most 4096 are accepted"),
        ({"outputs": 4097}, "the request asks for 4097 outputs; at most 4096 are accepted"),
        ({"parameters": 4097}, "the request has 4097 parameters; at most 4096 are accepted"),
    ],
)
def test_without_a_spec_tensor_and_parameter_counts_are_capped_before_any_is_read(
    counts: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        codec.decode_request(_Counts(**counts))
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (["x", "s", "z"], [], "the request has 3 inputs but model 'm' takes 2: x, s (unexpected input 'z')"),
        (
            ["x", "x", "s"],
            [],
            "the request has 3 inputs but model 'm' takes 2: x, s (input 'x' appears more than once)",
        ),
        (["x", "s"], ["y", "nope"], "the request asks for 2 outputs but model 'm' has 1: y (unknown output 'nope')"),
        (
            ["x", "s"],
            ["y", "y"],
            "the request asks for 2 outputs but model 'm' has 1: y (output 'y' is requested more than once)",
        ),
    ],
)
def test_too_many_tensors_are_refused_naming_the_first_one_too_many(
    inputs: list[str], outputs: list[str], message: str
) -> None:
    msg = protos.ModelInferRequest(model_name="m")
    for name in inputs:
        msg.inputs.add(name=name, datatype="FP32", shape=[2, 3])
    for name in outputs:
        msg.outputs.add(name=name)
    with pytest.raises(InvalidRequest) as info:
        codec.decode_request(msg, None, SPEC)
    assert str(info.value) == message


def test_the_caps_admit_as_many_as_they_name() -> None:
    msg = shared.encode_request(
        "m", {f"x{i}": np.zeros(1, np.uint8) for i in range(4096)}, [str(i) for i in range(4096)]
    )
    for i in range(4096):
        msg.parameters[f"p{i}"].int64_param = i
    request = codec.decode_request(msg)
    assert len(request.inputs) == len(request.outputs) == len(request.parameters) == 4096
    msg.outputs.add(name="one more")
    assert "asks for 4097 outputs" in _error(msg)


# --- caller strings are quoted with a bound -----------------------------------------------------

LONG = "n" * 10_000


def _quoted(message: str) -> str:
    assert LONG not in message and len(message) < 400, message[:500]
    return message


def _long_name_requests() -> list[protos.ModelInferRequest]:
    unknown = request_with("FP32", np.zeros(1, np.float32))
    unknown.inputs[0].name = LONG
    unknown.inputs[0].datatype = LONG
    twice = request_with("FP32", np.zeros(1, np.float32))
    twice.inputs[0].name = LONG
    twice.inputs.append(twice.inputs[0])
    twice.raw_input_contents.append(twice.raw_input_contents[0])
    short = request_with("FP32", np.zeros(2, np.float32))
    short.inputs[0].name = LONG
    short.raw_input_contents[0] = b"\x00"
    outputs = request_with("FP32", np.zeros(1, np.float32))
    outputs.outputs.add(name=LONG)
    outputs.outputs.add(name=LONG)
    bytes_short = protos.ModelInferRequest()
    bytes_short.inputs.add(name=LONG, datatype="BYTES", shape=[2])
    bytes_short.raw_input_contents.append(b"\x01\x00\x00\x00a\x05\x00\x00\x00ab")
    typed = protos.ModelInferRequest()
    typed.inputs.add(name=LONG, datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    return [unknown, twice, short, outputs, bytes_short, typed]


@pytest.mark.parametrize("index", range(6))
def test_long_caller_strings_are_cut_in_messages(index: int) -> None:
    assert "n" * 80 + "..." in _quoted(_error(_long_name_requests()[index]))


def test_long_names_against_the_spec_are_cut_in_messages() -> None:
    unexpected = _spec_request(s=None, **{LONG: ("FP32", [2, 3], b"\x00" * 24)})
    output = _spec_request()
    output.outputs.add(name=LONG)
    for msg in (unexpected, output):
        with pytest.raises(InvalidRequest) as early:
            codec.decode_request(msg, None, SPEC)
        with pytest.raises(InvalidRequest) as late:
            SPEC.validate(codec.decode_request(msg))
        assert _quoted(str(early.value)) == _quoted(str(late.value))


def test_control_characters_in_names_are_escaped() -> None:
    msg = request_with("FP32", np.zeros(1, np.float32))
    msg.inputs[0].name = "a\nb\x1b[2J"
    msg.inputs[0].datatype = "FP\r32"
    assert _error(msg) == "input 'a\\nb\\x1b[2J': unknown datatype 'FP\\r32'; expected one of " + ", ".join(DATATYPES)


# --- large tensors are converted in chunks (a worker thread lets go of the GIL between them) ----


def _recorded_chunks(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int]]]:
    """The spans of every chunked conversion, one list per tensor."""
    calls: list[list[tuple[int, int]]] = []
    real = shared._chunks

    def spy(count: int):  # type: ignore[no-untyped-def]
        spans: list[tuple[int, int]] = []
        calls.append(spans)
        for span in real(count):
            spans.append(span)
            yield span

    monkeypatch.setattr(shared, "_chunks", spy)
    return calls


def _check_chunked(calls: list[list[tuple[int, int]]], count: int) -> None:
    assert calls
    for spans in calls:
        assert len(spans) > 1
        assert spans[0][0] == 0 and spans[-1][1] == count
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert max(stop - start for start, stop in spans) <= 2**18


LARGE = 3 * 2**16 + 5


@pytest.mark.parametrize(
    ("datatype", "values"), [("FP32", np.arange(LARGE) / 8), ("INT8", np.arange(LARGE) % 256 - 128)]
)
def test_large_typed_contents_are_converted_in_chunks(
    datatype: str, values: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = values.astype(DATATYPES[datatype])
    msg = request_with(datatype, expected, raw=False)
    calls = _recorded_chunks(monkeypatch)
    sizes: list[int] = []
    real_fromiter = np.fromiter

    def fromiter(iterable: object, dtype: object, count: int = -1) -> np.ndarray:
        sizes.append(count)
        return real_fromiter(iterable, dtype, count)

    monkeypatch.setattr(np, "fromiter", fromiter)
    decoded = codec.decode_request(msg).inputs["x"]
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)
    assert len(sizes) > 1 and sum(sizes) == LARGE and max(sizes) <= 2**18
    _check_chunked(calls, LARGE)
    if datatype == "INT8":
        msg.inputs[0].contents.int_contents[-1] = 128  # in the last chunk
        assert _error(msg) == "input 'x': a value is out of range for INT8"


@pytest.mark.parametrize(
    "items",
    [
        [b"abc"] * LARGE,  # equal lengths
        [b""] * LARGE,
        [b"ab"[: i % 3] for i in range(LARGE)],  # mixed lengths
    ],
    ids=["equal lengths", "empty", "mixed lengths"],
)
@pytest.mark.parametrize("raw", [True, False])
def test_large_bytes_tensors_are_converted_in_chunks(
    items: list[bytes], raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = protos.ModelInferRequest()
    tensor = msg.inputs.add(name="s", datatype="BYTES", shape=[LARGE])
    if raw:
        msg.raw_input_contents.append(b"".join(struct.pack("<I", len(item)) + item for item in items))
    else:
        tensor.contents.bytes_contents.extend(items)
    calls = _recorded_chunks(monkeypatch)
    decoded = codec.decode_request(msg).inputs["s"]
    assert decoded.dtype == object and decoded.tolist() == items
    _check_chunked(calls, LARGE)


def test_off_the_event_loop_the_conversion_pauses_between_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread hands the GIL over between chunks (numpy's own brief releases would keep a
    waiting event loop waiting); on the loop itself there is nobody to hand it to."""
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    msg = request_with("FP32", np.arange(LARGE, dtype=np.float32), raw=False)
    codec.decode_request(msg)  # no running loop: as in a worker thread
    assert set(pauses) == {0} and len(pauses) >= LARGE // 2**16

    async def on_the_loop() -> None:
        codec.decode_request(msg)

    pauses.clear()
    asyncio.run(on_the_loop())
    assert pauses == []
