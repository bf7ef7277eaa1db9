"""The HTTP tensor codec: JSON tensors (flat and nested, every datatype), Triton's binary tensor data
extension both ways, compression, and the refusals of malformed or hostile bodies. Expected values
are written out by hand and packed with ``struct``, not computed the way the codec computes them."""

from __future__ import annotations

import gzip
import json
import struct
import tracemalloc
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from rapidserve.common.types import TensorSpec
from rapidserve.server.compression import Unsupported, compress, decompress, response_encoding
from rapidserve.server.config import ModelSpec
from rapidserve.server.errors import InvalidRequest, TooLarge
from rapidserve.server.rest_codec import (
    OutputChoice,
    decode_infer_request,
    encode_infer_response,
    parse_json,
    split_body,
)
from rapidserve.server.types import InferResponse

# datatype -> (JSON values for shape [2, 3], struct format of one element, numpy dtype)
CASES: dict[str, tuple[list[Any], str, Any]] = {
    "BOOL": ([True, False, True, True, False, False], "?", np.bool_),
    "UINT8": ([0, 1, 2, 127, 128, 255], "B", np.uint8),
    "UINT16": ([0, 1, 300, 32768, 65534, 65535], "H", np.uint16),
    "UINT32": ([0, 1, 70000, 2**31, 2**32 - 2, 2**32 - 1], "I", np.uint32),
    "UINT64": ([0, 1, 2**40, 2**63, 2**64 - 2, 2**64 - 1], "Q", np.uint64),
    "INT8": ([-128, -1, 0, 1, 2, 127], "b", np.int8),
    "INT16": ([-32768, -300, 0, 1, 300, 32767], "h", np.int16),
    "INT32": ([-(2**31), -70000, 0, 1, 70000, 2**31 - 1], "i", np.int32),
    "INT64": ([-(2**63), -(2**40), 0, 1, 2**40, 2**63 - 1], "q", np.int64),
    "FP16": ([0.5, -1.25, 0, 2, 65504.0, -0.0009765625], "e", np.float16),
    "FP32": ([0.1, -1.5, 0, 3, 1e-30, 3.0e38], "f", np.float32),
    "FP64": ([0.1, -1.5, 0, 3, 1e-300, 1.7e308], "d", np.float64),
}
BF16_VALUES = [1.0, -2.5, 0.15625, 0, 3, -0.5]  # exactly representable in bfloat16


def spec_of(*inputs: tuple[str, str, tuple[int, ...]], outputs: tuple[str, ...] = ("out",)) -> ModelSpec:
    return ModelSpec(
        "m",
        "onnxruntime_onnx",
        0,
        tuple(TensorSpec(*i) for i in inputs),
        tuple(TensorSpec(o, "FP32", (-1,)) for o in outputs),
    )


def decode(document: Any, spec: ModelSpec, binary: bytes = b"") -> Any:
    return decode_infer_request(document, memoryview(binary), spec, "m", "1")


def expected_of(datatype: str) -> np.ndarray:
    values, fmt, dtype = CASES[datatype]
    return np.frombuffer(struct.pack(f"<6{fmt}", *values), dtype=dtype).reshape(2, 3)


def bf16_expected() -> np.ndarray:
    upper = b"".join(struct.pack("<f", v)[2:4] for v in BF16_VALUES)  # bfloat16 = the upper half of a float32
    return np.frombuffer(upper, dtype=ml_dtypes.bfloat16).reshape(2, 3)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("datatype", list(CASES))
def test_json_data_of_every_numeric_datatype(datatype: str, nested: bool) -> None:
    values = CASES[datatype][0]
    data = [values[:3], values[3:]] if nested else values
    spec = spec_of(("x", datatype, (2, 3)))
    request, _ = decode({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": data}]}, spec)
    got = request.inputs["x"]
    expected = expected_of(datatype)
    assert got.dtype == expected.dtype and got.shape == (2, 3)
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_bf16_and_bytes(nested: bool) -> None:
    texts = ["", "a", "héllo", "日本", "x" * 300, "\u0000"]
    arrange = (lambda v: [v[:3], v[3:]]) if nested else (lambda v: v)
    spec = spec_of(("b", "BF16", (2, 3)), ("s", "BYTES", (2, 3)))
    request, _ = decode(
        {
            "inputs": [
                {"name": "b", "datatype": "BF16", "shape": [2, 3], "data": arrange(BF16_VALUES)},
                {"name": "s", "datatype": "BYTES", "shape": [2, 3], "data": arrange(texts)},
            ]
        },
        spec,
    )
    assert request.inputs["b"].tobytes() == bf16_expected().tobytes()
    assert request.inputs["s"].tolist() == [
        [b"", b"a", b"h\xc3\xa9llo"],
        [b"\xe6\x97\xa5\xe6\x9c\xac", b"x" * 300, b"\0"],
    ]


def test_binary_inputs_are_read_in_order_after_the_header() -> None:
    spec = spec_of(("a", "INT32", (2,)), ("s", "BYTES", (2,)), ("h", "FP16", (1,)))
    a = struct.pack("<2i", -7, 9)
    s = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 3) + b"\xff\x00\x01"  # BYTES: any bytes in binary
    h = struct.pack("<e", 1.5)
    document = {
        "inputs": [
            {"name": "a", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": len(a)}},
            {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(s)}},
            {"name": "h", "datatype": "FP16", "shape": [1], "parameters": {"binary_data_size": len(h)}},
        ]
    }
    header = json.dumps(document).encode()
    body = header + a + s + h
    head, binary = split_body(body, str(len(header)))
    request, _ = decode_infer_request(parse_json(head), binary, spec, "m", "1")
    assert request.inputs["a"].tolist() == [-7, 9]
    assert request.inputs["s"].tolist() == [b"hi", b"\xff\x00\x01"]
    assert request.inputs["h"].tolist() == [1.5]


def test_outputs_binary_by_request_or_per_output() -> None:
    response = InferResponse(
        "m", "1", {"f": np.array([[1.5, -2.0]], np.float32), "s": np.array([b"ok", b"\xff"], object)}, "req-7"
    )
    encoded = encode_infer_response(response, OutputChoice(False, (("s", True),)))
    assert encoded.content_type == "application/octet-stream"
    header = json.loads(encoded.body[: encoded.header_length])
    assert header["id"] == "req-7" and header["model_name"] == "m" and header["model_version"] == "1"
    f, s = header["outputs"]
    assert f == {"name": "f", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}
    raw = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 1) + b"\xff"
    assert s == {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
    assert encoded.body[encoded.header_length :] == raw

    everything = encode_infer_response(response, OutputChoice(True, (("f", False),)))
    tail = everything.body[everything.header_length :]
    assert tail == raw and json.loads(everything.body[: everything.header_length])["outputs"][0]["data"] == [1.5, -2.0]


def test_json_outputs_of_every_datatype() -> None:
    arrays = {datatype: expected_of(datatype) for datatype in CASES}
    arrays["BF16"] = bf16_expected()
    arrays["BYTES"] = np.array([["é", "b", ""], ["c", "d", "e"]], object)
    encoded = encode_infer_response(InferResponse("m", "1", arrays), OutputChoice())
    assert encoded.content_type == "application/json" and encoded.header_length is None
    outputs = {o["name"]: o for o in json.loads(encoded.body)["outputs"]}
    for datatype, (values, _, _) in CASES.items():
        expected = values if datatype not in ("FP16", "FP32") else [float(v) for v in expected_of(datatype).ravel()]
        assert outputs[datatype]["data"] == expected, datatype
        assert outputs[datatype]["shape"] == [2, 3] and outputs[datatype]["datatype"] == datatype
    assert outputs["BF16"]["data"] == BF16_VALUES
    assert outputs["BYTES"]["data"] == ["é", "b", "", "c", "d", "e"]


def test_non_utf8_bytes_in_a_json_output_ask_for_binary() -> None:
    response = InferResponse("m", "1", {"s": np.array([b"\xff"], object)})
    with pytest.raises(InvalidRequest, match=r"not UTF-8.*binary_data"):
        encode_infer_response(response, OutputChoice())


def test_request_parameters_reach_the_request_and_binary_data_output_the_choice() -> None:
    spec = spec_of(("x", "FP32", (1,)))
    document = {
        "id": "abc",
        "parameters": {"timeout": 1500, "priority": 1, "binary_data_output": True},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
        "outputs": [{"name": "out", "parameters": {"binary_data": False}}],
    }
    request, choice = decode(document, spec)
    assert request.parameters == {"timeout": 1500, "priority": 1} and request.id == "abc"
    assert request.outputs == ("out",) and choice.default_binary and not choice.is_binary("out")


BAD_DOCUMENTS = [
    ([], "must be a JSON object"),
    ({"inputs": {}}, "'inputs' must be a list"),
    ({}, "'inputs' is missing"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3]}]}, "does not match shape"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5]]}]}, "a list of 2"),
    (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], 4]}]},
        "at depth 1 expected a list of 3, got a number",
    ),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, [6]]]}]}, "got list"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": ["a"] * 6}]}, "numbers, got strings"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [True] * 6}]}, "got true/false"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [10**400] * 6}]}, "out of range"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]}, "no 'data'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**40], "data": [1]}]}, "shape"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**62, 2**62], "data": [1]}]}, "too large"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3], "data": [1]}]}, "negative"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2.0, 3], "data": [1]}]}, "whole numbers"),
    ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [2, 3], "data": [1]}]}, "FP32"),
    ({"inputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [1]}]}, "unexpected input 'y'"),
    (
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6, "parameters": {"classification": 2}}
            ]
        },
        "classification is not supported",
    ),
    (
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}],
            "outputs": [{"name": "out", "parameters": {"classification": 1}}],
        },
        "classification is not supported",
    ),
    (
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}],
            "outputs": [{"name": "nope"}],
        },
        "unknown output 'nope'",
    ),
    (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}], "parameters": {"p": [1]}},
        "boolean, number or string",
    ),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}] * 3}, "the request has 3 inputs"),
]


@pytest.mark.parametrize(("document", "message"), BAD_DOCUMENTS)
def test_malformed_requests_say_what_is_wrong(document: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode(document, spec_of(("x", "FP32", (2, 3))))


@pytest.mark.parametrize(
    ("data", "message"), [([1, "a"], "strings"), ([1, 2.5], "numbers"), ([1, None], "null"), ([2**64], "out of range")]
)
def test_wrong_json_types_for_integers_and_bytes(data: list[Any], message: str) -> None:
    spec = spec_of(("i", "UINT64", (-1,)))
    with pytest.raises(InvalidRequest, match="UINT64 data must be integers" if message != "out of range" else message):
        decode({"inputs": [{"name": "i", "datatype": "UINT64", "shape": [len(data)], "data": data}]}, spec)
    spec = spec_of(("s", "BYTES", (-1,)))
    with pytest.raises(InvalidRequest, match="BYTES data must be strings"):
        decode({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]}, spec)
    with pytest.raises(InvalidRequest, match="out of range for INT8"):
        decode(
            {"inputs": [{"name": "i", "datatype": "INT8", "shape": [1], "data": [128]}]}, spec_of(("i", "INT8", (1,)))
        )


@pytest.mark.parametrize(
    ("sizes", "binary", "message"),
    [
        ([8, 8], b"\0" * 12, "only 4 bytes of binary data remain"),
        ([8, 8], b"\0" * 20, "4 bytes of binary data after"),
        ([4, 8], b"\0" * 12, "raw data has 4 bytes, expected 8"),
        ([-1, 8], b"\0" * 16, "non-negative"),
    ],
)
def test_binary_sizes_that_do_not_add_up(sizes: list[int], binary: bytes, message: str) -> None:
    spec = spec_of(("a", "INT32", (2,)), ("b", "INT32", (2,)))
    document = {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": s}}
            for n, s in zip("ab", sizes, strict=True)
        ]
    }
    with pytest.raises(InvalidRequest, match=message):
        decode(document, spec, binary)


def test_binary_bytes_elements_that_claim_too_much() -> None:
    spec = spec_of(("s", "BYTES", (2,)))
    data = struct.pack("<I", 100) + b"ab" + struct.pack("<I", 0)
    document = {
        "inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(data)}}]
    }
    with pytest.raises(InvalidRequest, match="claims 100 bytes"):
        decode(document, spec, data)
    huge = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2**30], "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(InvalidRequest):  # the shape's elements cannot fit: refused before any allocation
        decode(huge, spec_of(("s", "BYTES", (-1,))), b"\0" * 8)


@pytest.mark.parametrize(
    ("length", "message"),
    [("x", "whole number"), ("-1", "whole number"), ("999", "only 10 bytes"), ("0", "not supported")],
)
def test_bad_header_lengths(length: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        split_body(b"0123456789", length)


def test_json_is_parsed_from_a_view_of_the_body_and_may_start_with_a_bom() -> None:
    head, binary = split_body(b'{"id": "\xc3\xa9"}\x00\x01', "12")
    assert parse_json(head) == {"id": "\u00e9"} and bytes(binary) == b"\x00\x01"
    assert parse_json(b'\xef\xbb\xbf{"id": "x"}') == {"id": "x"}


def test_bad_json_and_deep_nesting_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(b'{"inputs": [')
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(b'{"id": "\xff"}')
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_json(b"[" * 200_000 + b"]" * 200_000)
    deep = json.loads("[" * 70 + "1" + "]" * 70)
    with pytest.raises(InvalidRequest):
        decode(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 70, "data": deep}]},
            spec_of(("x", "FP32", (2, 3))),
        )


def test_compression_round_trips_and_weights() -> None:
    data = b"tensor data " * 1000
    assert decompress(gzip.compress(data), "gzip", len(data)) == data
    assert decompress(zlib.compress(data), "deflate", len(data)) == data
    assert gzip.decompress(compress(data, "gzip")) == data and zlib.decompress(compress(data, "deflate")) == data
    assert decompress(data, "identity", 1) is data
    with pytest.raises(Unsupported):
        decompress(data, "br", len(data))
    with pytest.raises(InvalidRequest, match="does not decompress"):
        decompress(b"not gzip at all", "gzip", 100)
    with pytest.raises(InvalidRequest, match="ends before"):
        decompress(gzip.compress(data)[:50], "gzip", len(data))
    assert response_encoding("gzip") == "gzip" and response_encoding("deflate, gzip") == "deflate"
    assert response_encoding("gzip;q=0.5, deflate;q=0.8") == "deflate" and response_encoding("br") == "identity"
    assert response_encoding("identity;q=1, gzip;q=0.9") == "identity" and response_encoding("") == "identity"


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (256 * 2**20))  # 256 MiB of zeros in ~250 KiB
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="inflates to more than"):
            decompress(bomb, "gzip", 4 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
