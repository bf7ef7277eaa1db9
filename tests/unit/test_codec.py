from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from rapidserve import protos
from rapidserve.server import codec
from rapidserve.server.datatypes import CONTENTS_FIELD, DATATYPES
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
        msg.raw_input_contents.append(codec.tensor_to_raw(array, datatype))
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


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELD))
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
    decoded = codec.decode_response(msg)
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_bf16_raw_bytes_are_the_upper_half_of_float32() -> None:
    values = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    expected = b"".join(v.tobytes()[2:4] for v in values)
    assert codec.tensor_to_raw(values.astype(ml_dtypes.bfloat16), "BF16") == expected


def test_str_elements_of_bytes_outputs_are_sent_as_utf8() -> None:
    raw = codec.serialize_bytes(np.array(["h\u00e9", b"\x01"], dtype=object))
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


def test_typed_element_count_and_range() -> None:
    msg = request_with("INT32", np.zeros((2, 2), np.int32), raw=False)
    msg.inputs[0].shape[:] = [2, 3]
    assert "int_contents has 4 elements, expected 6" in _error(msg)
    msg = protos.ModelInferRequest()
    msg.inputs.add(name="b", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    assert "out of range for INT8" in _error(msg)


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
    msg = codec.encode_request(
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
