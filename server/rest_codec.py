"""The HTTP side of the tensor codec: KServe v2 JSON inference requests, with Triton's binary tensor data
extension, -> ``InferRequest``; ``InferResponse`` -> JSON header and binary data.

Bounded like ``rapidserve.server.codec``: the numbers of inputs, outputs and parameters are checked
before any is walked, every input's header (name, datatype, shape) and data length before any tensor
is converted, and shapes through the shared ``checked_shape``. Binary inputs are read from the bytes
after the JSON header, in input order (``binary_data_size`` each), as views of the body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve.common.codec import check_bytes_size, checked_shape, deserialize_bytes, from_raw, tensor_to_raw
from rapidserve.common.datatypes import BYTES, DATATYPES, datatype_of
from rapidserve.common.errors import InvalidTensor, shown
from rapidserve.common.types import ParamValue
from rapidserve.server.config import ModelSpec
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.types import InferRequest, InferResponse

__all__ = [
    "HEADER_LENGTH",
    "EncodedResponse",
    "OutputChoice",
    "decode_infer_request",
    "encode_infer_response",
    "parse_json",
    "split_body",
]

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary tensor data extension
MAX_JSON_BYTES = 8 * 2**20  # the JSON part of an inference body, decompressed; larger tensors travel as binary data
JSON_EXPANSION = 16  # parsed JSON holds up to this many times its bytes in Python objects (budget reservation)
_MAX_PARAMETERS = 4096  # like the gRPC codec's cap
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_INTEGERS = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})
# the JSON value types each datatype's data may hold (a JSON number without a fraction is an int)
_JSON_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    BYTES: frozenset({str}),
    **{datatype: frozenset({int}) for datatype in _INTEGERS},
    **{datatype: frozenset({int, float}) for datatype in _FLOATS},
}
_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
_JSON_NAMES = {bool: "true/false", str: "strings", int: "integers", float: "numbers"}


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """How each output goes back: binary (after the JSON header) or as JSON ``data``."""

    default_binary: bool = False  # the request parameter ``binary_data_output``
    binary: tuple[tuple[str, bool], ...] = ()  # per requested output, its ``binary_data`` parameter

    def is_binary(self, name: str) -> bool:
        for output, binary in self.binary:
            if output == name:
                return binary
        return self.default_binary


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    body: bytes
    content_type: str
    header_length: int | None  # the JSON header's length when binary data follows it


def split_body(body: bytes | memoryview, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary data after it, as views: ``header_length`` is the request's
    ``Inference-Header-Content-Length`` (absent: the whole body is JSON)."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise InvalidRequest(f"Inference-Header-Content-Length must be a whole number of bytes, got '{shown(text)}'")
    length = int(text)
    if length > len(view):
        raise InvalidRequest(f"Inference-Header-Content-Length is {length} but the body has only {len(view)} bytes")
    if length == 0:
        raise InvalidRequest(
            "Inference-Header-Content-Length 0 (a body that is one raw input, with no JSON header) is not "
            "supported; send the JSON header with binary_data_size for each binary input"
        )
    return view[:length], view[length:]


def parse_json(data: bytes | memoryview, what: str = "request") -> Any:
    """A body parsed as JSON (UTF-8); a malformed or too deeply nested one is ``InvalidRequest``."""
    try:
        return json.loads(str(data, "utf-8-sig"))  # decoded straight from the view: no copy of the bytes
    except RecursionError:
        raise InvalidRequest(f"the {what} JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the {what} body is not valid JSON: {exc}") from None


def decode_infer_request(
    header: Any,
    binary: memoryview,
    spec: ModelSpec,
    model_name: str,
    model_version: str,
    deadline: float | None = None,
) -> tuple[InferRequest, OutputChoice]:
    """A parsed inference request (its JSON header and the binary data after it) checked against the
    model's spec and decoded; how its outputs are to be sent back."""
    try:
        return _decode(header, binary, spec, model_name, model_version, deadline)
    except InvalidTensor as error:  # the tensor-level checks shared with the gRPC codec
        raise InvalidRequest(str(error)) from None


def _decode(
    header: Any, binary: memoryview, spec: ModelSpec, model_name: str, model_version: str, deadline: float | None
) -> tuple[InferRequest, OutputChoice]:
    if not isinstance(header, dict):
        raise InvalidRequest(f"the inference request must be a JSON object, got {_kind(header)}")
    tensors = _field(header, "inputs", list, "a list", required=True)
    requested = _field(header, "outputs", list, "a list") or []
    request_id = _field(header, "id", str, "a string") or ""
    parameters = _parameters(_field(header, "parameters", dict, "an object"), "the request")
    if len(tensors) > len(spec.inputs) or len(requested) > len(spec.outputs):
        spec.check_counts(
            len(tensors),
            len(requested),
            [_name_of(t) for t in tensors[: len(spec.inputs) + 1]],
            [_name_of(o) for o in requested[: len(spec.outputs) + 1]],
        )
    default_binary = parameters.pop("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequest(f"the 'binary_data_output' parameter must be true or false, got {default_binary!r}")
    inputs: dict[str, Any] = {}
    pending: list[tuple[str, str, int, list[int], Any, bool]] = []
    batch: int | None = None
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict):
            raise InvalidRequest(f"each input must be a JSON object, got {_kind(tensor)}")
        name = _field(tensor, "name", str, "a string", required=True)
        if name in inputs:
            raise InvalidRequest(f"input '{shown(name)}' appears more than once in the request")
        what = f"input '{shown(name)}'"
        datatype = _field(tensor, "datatype", str, "a string", required=True, what=what)
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidRequest(
                f"{what}: unknown datatype '{shown(datatype)}'; expected one of {', '.join(DATATYPES)}"
            )
        dims = _field(tensor, "shape", list, "a list", required=True, what=what)
        if any(type(d) is not int for d in dims[:65]):
            raise InvalidRequest(f"{what}: shape must be a list of whole numbers")
        shape, count = checked_shape("input", name, dims)
        batch = spec.check_input(name, datatype, shape, batch)
        size = _binary_size(what, _tensor_parameters(what, tensor))
        if size is None:
            if "data" not in tensor:
                raise InvalidRequest(f"{what}: no 'data', and no 'binary_data_size' parameter for binary data")
            pending.append((name, datatype, count, shape, tensor["data"], False))
        else:
            if "data" in tensor:
                raise InvalidRequest(f"{what}: has both 'data' and a 'binary_data_size' parameter; send one")
            if offset + size > len(binary):
                raise InvalidRequest(
                    f"{what}: binary_data_size is {size} but only {len(binary) - offset} bytes of binary data remain"
                )
            buffer = binary[offset : offset + size]
            offset += size
            if datatype == BYTES:
                check_bytes_size(name, buffer, count)
                pending.append((name, datatype, count, shape, buffer, True))
            else:
                inputs[name] = from_raw(name, datatype, dtype, shape, count, buffer)
                continue
        inputs[name] = None
    if offset != len(binary):
        raise InvalidRequest(
            f"the request has {len(binary) - offset} bytes of binary data after its inputs' binary_data_size "
            "total; the sizes must add up to the data after the JSON header"
        )
    outputs, choice = _outputs(requested, default_binary)
    spec.check_names(inputs, outputs)
    for name, datatype, count, shape, data, is_binary in pending:
        if is_binary:
            inputs[name] = deserialize_bytes(name, data, count).reshape(shape)
        else:
            inputs[name] = _from_json(name, datatype, count, shape, data)
    request = InferRequest(model_name, model_version, inputs, outputs, request_id, parameters, deadline, checked=True)
    return request, choice


def _outputs(requested: list[Any], default_binary: bool) -> tuple[tuple[str, ...], OutputChoice]:
    names: list[str] = []
    binary: list[tuple[str, bool]] = []
    for output in requested:
        if not isinstance(output, dict):
            raise InvalidRequest(f"each requested output must be a JSON object, got {_kind(output)}")
        name = _field(output, "name", str, "a string", required=True, what="requested output")
        what = f"output '{shown(name)}'"
        if name in names:
            raise InvalidRequest(f"{what} is requested more than once")
        names.append(name)
        params = _tensor_parameters(what, output)
        if "binary_data" in params:
            flag = params["binary_data"]
            if not isinstance(flag, bool):
                raise InvalidRequest(f"{what}: the 'binary_data' parameter must be true or false, got {flag!r}")
            binary.append((name, flag))
    return tuple(names), OutputChoice(default_binary, tuple(binary))


def _from_json(name: str, datatype: str, count: int, shape: list[int], data: Any) -> np.ndarray[Any, Any]:
    """A tensor's JSON ``data`` (flat, or nested as its shape says) as an array of its datatype."""
    flat = _flatten(name, count, shape, data)
    what = f"input '{shown(name)}'"
    allowed = _JSON_TYPES[datatype]
    found = set(map(type, flat))
    if not found <= allowed:
        odd = next(t for t in found if t not in allowed)
        raise InvalidRequest(
            f"{what}: {datatype} data must be {' or '.join(sorted(_JSON_NAMES[t] for t in allowed))}, "
            f"got {_JSON_NAMES.get(odd, odd.__name__)}"
        )
    dtype = DATATYPES[datatype]
    if datatype == BYTES:
        out = np.empty(count, object)
        try:
            out[:] = [item.encode("utf-8") for item in flat]
        except UnicodeEncodeError:
            raise InvalidRequest(f"{what}: a string holds a lone surrogate, which is not UTF-8") from None
        return out.reshape(shape)
    if datatype == "BOOL":
        return np.array(flat, dtype=dtype).reshape(shape)
    if datatype in _INTEGERS:
        wide = np.uint64 if datatype == "UINT64" else np.int64
        try:
            values = np.array(flat, dtype=wide)
        except OverflowError:
            raise InvalidRequest(f"{what}: a value is out of range for {datatype}") from None
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise InvalidRequest(f"{what}: a value is out of range for {datatype}")
        return values.astype(dtype).reshape(shape)
    try:
        values = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        raise InvalidRequest(f"{what}: a value is out of range for {datatype}") from None
    with np.errstate(over="ignore"):  # as a C cast would: beyond the type's range is infinity
        return values.astype(dtype).reshape(shape)


def _flatten(name: str, count: int, shape: list[int], data: Any) -> list[Any]:
    """``data``'s elements in row-major order: a flat list of ``count`` elements, or lists nested as
    deep as the shape with each level as long as its dimension (a lone value for a one-element tensor)."""
    if not isinstance(data, list):
        if count == 1:
            return [data]
        raise InvalidRequest(f"input '{shown(name)}': data must be a list, got {_kind(data)}")
    if len(data) == count and (not data or not isinstance(data[0], list)):
        return data
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                got = f"a list of {len(item)}" if isinstance(item, list) else _kind(item)
                raise InvalidRequest(
                    f"input '{shown(name)}': data does not match shape {shape}: at depth {depth} expected a list "
                    f"of {dim}, got {got} (send {count} values flat, or nested exactly as the shape)"
                )
            below.extend(item)
        level = below
    return level


def _field(obj: dict[str, Any], key: str, kind: type, described: str, *, required: bool = False, what: str = "") -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"{what + ': ' if what else ''}'{key}' is missing")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{what + ': ' if what else ''}'{key}' must be {described}, got {_kind(value)}")
    return value


def _parameters(params: dict[str, Any] | None, what: str) -> dict[str, ParamValue]:
    if not params:
        return {}
    if len(params) > _MAX_PARAMETERS:
        raise InvalidRequest(f"{what} has {len(params)} parameters; at most {_MAX_PARAMETERS} are accepted")
    for key, value in params.items():
        if not isinstance(value, (bool, int, float, str)):
            raise InvalidRequest(
                f"{what}: parameter '{shown(key)}' must be a boolean, number or string, got {_kind(value)}"
            )
    return dict(params)


def _tensor_parameters(what: str, tensor: dict[str, Any]) -> dict[str, ParamValue]:
    params = _parameters(_field(tensor, "parameters", dict, "an object", what=what), what)
    if "classification" in params:
        raise InvalidRequest(f"{what}: classification is not supported (the classification extension)")
    for key in _SHARED_MEMORY_PARAMS:
        if key in params:
            raise InvalidRequest(f"{what}: shared memory is not supported; send the data inline")
    return params


def _binary_size(what: str, params: dict[str, ParamValue]) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"{what}: binary_data_size must be a non-negative whole number, got {size!r}")
    return size


def _name_of(tensor: Any) -> str:
    name = tensor.get("name") if isinstance(tensor, dict) else None
    return name if isinstance(name, str) else ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return _KINDS.get(type(value), type(value).__name__)


def encode_infer_response(response: InferResponse, choice: OutputChoice) -> EncodedResponse:
    """The JSON header (outputs with ``data``, or with ``binary_data_size`` for binary ones) and the
    binary outputs after it, in output order."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in response.outputs.items():
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if choice.is_binary(name):
            raw = tensor_to_raw(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json(name, datatype, array)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return EncodedResponse(header, "application/json", None)
    return EncodedResponse(b"".join([header, *chunks]), "application/octet-stream", len(header))


def _to_json(name: str, datatype: str, array: np.ndarray[Any, Any]) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == BYTES:
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"output '{shown(name)}' holds bytes that are not UTF-8, which JSON cannot carry; "
                "ask for it with the 'binary_data' parameter true"
            ) from None
    if datatype in ("FP16", "BF16"):
        flat = flat.astype(np.float32)
    return flat.tolist()  # type: ignore[no-any-return]
