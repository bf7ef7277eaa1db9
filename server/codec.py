"""Tensor codec: ModelInferRequest/Response protobufs <-> numpy, with strict checks.

Raw inputs become zero-copy ``np.frombuffer`` views of the request bytes; numeric outputs always go
out in ``raw_output_contents`` (tritonclient reads only that). Every check raises ``InvalidRequest``
with a message saying what was expected and what came.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from rapidserve import protos
from rapidserve.server.datatypes import BYTES, CONTENTS_FIELD, DATATYPES, datatype_of
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.types import InferRequest, InferResponse, ParamValue

if TYPE_CHECKING:
    from rapidserve.server.config import ModelSpec

__all__ = [
    "decode_parameters",
    "decode_request",
    "decode_response",
    "deserialize_bytes",
    "encode_request",
    "encode_response",
    "heavy",
    "serialize_bytes",
    "tensor_to_raw",
]

_MAX_ELEMENTS = 2**40  # far beyond any message gRPC accepts; stops absurd shapes before arithmetic
_MAX_DIMS = 64  # numpy's limit; checked before a shape is even copied out of the message
_LENGTH = struct.Struct("<I")
_UNIFORM_MIN = 32  # from this many BYTES elements on, first try the vectorized equal-lengths split
# the element type of each InferTensorContents field, so values convert exactly (no float detour)
_CONTAINER_DTYPES = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_ITEMSIZE = {datatype: dtype.itemsize for datatype, dtype in DATATYPES.items()}
_PENDING: np.ndarray[Any, Any] = np.empty(0)  # holds an input's place (and order) until it is converted

# What heavy() weighs: decoding costs in nanoseconds, measured on one x86-64 core (3 GHz class) and
# doubled for slower machines. Raw numeric tensors become views, but reading a raw entry out of the
# message copies it; BYTES elements and typed values are converted one Python object at a time.
_NS_PER_BYTE = 1.0  # copying fresh memory: ~0.5 ns/byte
_NS_PER_BYTES_ELEMENT = 350  # the general split; equal lengths take ~45 ns
_NS_PER_TYPED_BYTES = 130
_NS_PER_TYPED_VALUE = 60  # np.fromiter over a repeated field: ~30 ns a value
_HEAVY_NS = 20_000_000
_SMALL_BYTES = 64 * 1024  # no request this small takes ~20 ms to decode: under ~3 ms by the costs above


def decode_request(msg: Any, deadline: float | None = None, spec: ModelSpec | None = None) -> InferRequest:
    """Decode a ``ModelInferRequest`` into numpy arrays, checking it is well formed.

    Every input's header (name, datatype, shape) and data length is checked before any tensor is
    converted element by element (BYTES, typed ``contents``): with ``spec``, against the model
    too, so a request the model would refuse costs no decoding. Without ``spec`` the checks
    against the model are left to ``ModelSpec.validate``.
    """
    raw = msg.raw_input_contents
    tensors = msg.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries but the request has {len(tensors)} inputs; "
            "expected one raw entry per input, in input order"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    pending: list[tuple[str, str, int, list[int], Any]] = []  # converted once every input passed its checks
    batch: int | None = None
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in inputs:
            raise InvalidRequest(f"input '{name}' appears more than once in the request")
        if tensor.parameters:
            _check_tensor_parameters(f"input '{name}'", tensor.parameters)
        datatype = tensor.datatype
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidRequest(
                f"input '{name}': unknown datatype '{datatype}'; expected one of {', '.join(DATATYPES)}"
            )
        shape, count = _checked_shape("input", name, tensor.shape)
        if raw and tensor.HasField("contents"):
            raise InvalidRequest(
                f"input '{name}': contents must not be set when raw_input_contents is used "
                "(send every input raw, or every input typed)"
            )
        if spec is not None:
            batch = spec.check_input(name, datatype, shape, batch)
        if raw:
            buffer = raw[index]
            if datatype != BYTES:
                inputs[name] = _from_raw(name, datatype, dtype, shape, count, buffer)
                continue
            _check_bytes_size(name, buffer, count)
            pending.append((name, datatype, count, shape, buffer))
        else:
            pending.append((name, datatype, count, shape, _contents_of(name, tensor, datatype, count, shape)))
        inputs[name] = _PENDING
    outputs: tuple[str, ...] = ()
    if msg.outputs:
        outputs = _requested_outputs(msg.outputs)
    if spec is not None:
        spec.check_names(inputs, outputs)
    for name, datatype, count, shape, data in pending:
        if raw:
            inputs[name] = deserialize_bytes(name, data, count).reshape(shape)
        else:
            inputs[name] = _convert_contents(name, datatype, count, shape, data)
    return InferRequest(
        msg.model_name,
        msg.model_version,
        inputs,
        outputs,
        msg.id,
        decode_parameters(msg.parameters) if msg.parameters else {},
        deadline,
    )


def heavy(msg: Any, wire_bytes: int | None = None) -> bool:
    """Whether decoding ``msg`` could keep a thread busy for more than ~20 ms, so that the caller
    runs it off the event loop. O(number of tensors): judged from shapes and list lengths, never
    from the data. ``wire_bytes``, the serialized request's length when the caller knows it, makes
    a small request cheap to judge and a large one heavy whatever its shapes claim."""
    if wire_bytes is not None:
        if wire_bytes < _SMALL_BYTES:
            return False
        if wire_bytes * _NS_PER_BYTE > _HEAVY_NS:
            return True
    raw = bool(msg.raw_input_contents)
    cost = 0
    for tensor in msg.inputs:
        dims = tensor.shape
        if len(dims) > _MAX_DIMS:
            continue  # refused before any decoding
        count = abs(math.prod(dims[:]))  # a slice is cheaper to walk than the repeated field
        datatype = tensor.datatype
        if raw:
            if datatype == BYTES:
                cost += count * _NS_PER_BYTES_ELEMENT
            else:
                cost += count * _ITEMSIZE.get(datatype, 1) * _NS_PER_BYTE
        elif tensor.HasField("contents"):
            field = CONTENTS_FIELD.get(datatype)
            if field is not None:
                per_value = _NS_PER_TYPED_BYTES if datatype == BYTES else _NS_PER_TYPED_VALUE
                cost += len(getattr(tensor.contents, field)) * per_value
    return cost > _HEAVY_NS


def _requested_outputs(requested: Any) -> tuple[str, ...]:
    names = []
    for output in requested:
        names.append(output.name)
        if output.parameters:
            _check_tensor_parameters(f"output '{output.name}'", output.parameters)
    if len(set(names)) != len(names):
        raise InvalidRequest(f"an output is requested more than once: {names}")
    return tuple(names)


def _check_tensor_parameters(what: str, params: Any) -> None:
    if "classification" in params:
        raise InvalidRequest(f"{what}: the classification extension is not supported")
    for key in _SHARED_MEMORY_PARAMS:
        if key in params:
            raise InvalidRequest(f"{what}: shared memory is not supported; send the data inline")


def encode_response(response: InferResponse) -> Any:
    """Build a ``ModelInferResponse``; every output travels in ``raw_output_contents``."""
    msg = protos.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    _add_tensors(msg.outputs, msg.raw_output_contents, response.outputs)
    return msg


def encode_request(
    model_name: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    outputs: Iterable[str] = (),
    *,
    model_version: str = "",
    request_id: str = "",
    parameters: dict[str, ParamValue] | None = None,
) -> Any:
    """Build a ``ModelInferRequest`` with raw inputs (the client side of the codec)."""
    msg = protos.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    _add_tensors(msg.inputs, msg.raw_input_contents, inputs)
    for name in outputs:
        msg.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        _set_parameter(msg.parameters[key], value)
    return msg


def decode_response(msg: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Numpy outputs of a ``ModelInferResponse`` (raw or typed contents), in response order."""
    raw = msg.raw_output_contents
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(msg.outputs):
        name, datatype = tensor.name, tensor.datatype
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidRequest(f"output '{name}': unknown datatype '{datatype}'")
        shape, count = _checked_shape("output", name, tensor.shape)
        if index >= len(raw):
            values = _contents_of(name, tensor, datatype, count, shape, "output")
            outputs[name] = _convert_contents(name, datatype, count, shape, values, "output")
        elif datatype == BYTES:
            buffer = raw[index]
            _check_bytes_size(name, buffer, count, "output")
            outputs[name] = deserialize_bytes(name, buffer, count, "output").reshape(shape)
        else:
            outputs[name] = _from_raw(name, datatype, dtype, shape, count, raw[index], "output")
    return outputs


def decode_parameters(params: Any) -> dict[str, ParamValue]:
    decoded: dict[str, ParamValue] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(param, choice)
    return decoded


def tensor_to_raw(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    """Flattened row-major little-endian bytes of a tensor (one copy, made by ``tobytes``)."""
    if datatype == BYTES:
        return serialize_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


def serialize_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """BYTES elements as 4-byte little-endian length + data, concatenated (str is sent as UTF-8)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(name: str, buffer: bytes, count: int, kind: str = "input") -> np.ndarray[Any, Any]:
    """Split a serialized BYTES tensor into an object array of ``count`` bytes elements.

    Elements of one length (checked on every prefix through a strided view) are split by numpy;
    others by a tight loop that checks nothing, whose result is kept only when it used the buffer
    exactly: anything else is explained by the strict element-by-element walk."""
    _check_bytes_size(name, buffer, count, kind)
    size = len(buffer)
    if count >= _UNIFORM_MIN:
        (first,) = _LENGTH.unpack_from(buffer, 0)
        step = first + 4
        if step * count == size and (np.ndarray((count,), "<u4", buffer, 0, (step,)) == first).all():
            if first == 0:
                return np.full(count, b"", dtype=object)
            return np.ndarray((count,), f"V{first}", buffer, 4, (step,)).astype(object)
    if not isinstance(buffer, bytes):
        buffer = bytes(buffer)  # a view of the request (a large one's raw entries are): slices must be bytes
    items: list[bytes] = [b""] * count
    unpack = _LENGTH.unpack_from
    pos = 0
    try:
        for index in range(count):
            start = pos + 4
            pos = start + unpack(buffer, pos)[0]
            items[index] = buffer[start:pos]
    except struct.error:
        pos = -1
    if pos != size:
        _explain_bytes(name, buffer, count, kind)
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _check_bytes_size(name: str, buffer: bytes, count: int, kind: str = "input") -> None:
    if count * 4 > len(buffer):  # checked before allocating: a tiny request must not claim 2**32 elements
        raise InvalidRequest(
            f"{kind} '{name}': {len(buffer)} bytes cannot hold {count} BYTES elements (4-byte length prefix each)"
        )


def _explain_bytes(name: str, buffer: bytes, count: int, kind: str) -> None:
    """Raise what is wrong with a BYTES tensor the fast split could not use."""
    size = len(buffer)
    pos = 0
    for index in range(count):
        if pos + 4 > size:
            raise InvalidRequest(
                f"{kind} '{name}': BYTES data ends after {index} of {count} elements; "
                "each element needs a 4-byte little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += 4
        if pos + length > size:
            raise InvalidRequest(
                f"{kind} '{name}': BYTES element {index} claims {length} bytes but only {size - pos} remain"
            )
        pos += length
    raise InvalidRequest(f"{kind} '{name}': {size - pos} bytes left over after {count} BYTES elements")


def _checked_shape(kind: str, name: str, dims: Any) -> tuple[list[int], int]:
    """A tensor's shape and element count, refusing shapes numpy cannot hold: negative dimensions,
    more than ``_MAX_DIMS`` of them, or non-zero dimensions whose product passes ``_MAX_ELEMENTS``
    (``[2**62, 2**62, 0]`` holds no element, yet no array has that shape)."""
    if len(dims) > _MAX_DIMS:
        raise InvalidRequest(f"{kind} '{name}': shape has {len(dims)} dimensions; at most {_MAX_DIMS} are supported")
    shape: list[int] = dims[:]
    count = math.prod(shape)
    if 0 < count <= _MAX_ELEMENTS and min(shape, default=1) > 0:
        return shape, count
    if min(shape) < 0:
        raise InvalidRequest(f"{kind} '{name}': shape {shape} has a negative dimension")
    if math.prod(dim for dim in shape if dim) > _MAX_ELEMENTS:
        raise InvalidRequest(
            f"{kind} '{name}': shape {shape} is too large: its non-zero dimensions multiply to more than "
            f"{_MAX_ELEMENTS} elements"
        )
    return shape, count


def _from_raw(
    name: str,
    datatype: str,
    dtype: np.dtype[Any],
    shape: list[int],
    count: int,
    buffer: bytes,
    kind: str = "input",
) -> np.ndarray[Any, Any]:
    """A read-only view of a numeric tensor's raw bytes."""
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidRequest(
            f"{kind} '{name}': raw data has {len(buffer)} bytes, expected {expected} for {datatype} with shape {shape}"
        )
    return np.ndarray(shape, dtype, buffer)


def _contents_of(name: str, tensor: Any, datatype: str, count: int, shape: list[int], kind: str = "input") -> Any:
    """The typed values of a tensor, checked to be as many as its shape says (not yet converted)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"{kind} '{name}': {datatype} data can only be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(f"{kind} '{name}': {field} has {len(values)} elements, expected {count} for shape {shape}")
    return values


def _convert_contents(
    name: str, datatype: str, count: int, shape: list[int], values: Any, kind: str = "input"
) -> np.ndarray[Any, Any]:
    """Typed values (as checked by ``_contents_of``) as an array: one Python object at a time."""
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    wide = np.fromiter(values, dtype=_CONTAINER_DTYPES[CONTENTS_FIELD[datatype]], count=count)
    if dtype.kind in "iu" and wide.size and dtype.itemsize < wide.dtype.itemsize:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequest(f"{kind} '{name}': a value is out of range for {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


def _add_tensors(tensors: Any, raw: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    for name, array in arrays.items():
        datatype = datatype_of(array.dtype)
        tensor = tensors.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        raw.append(tensor_to_raw(array, datatype))


def _set_parameter(param: Any, value: ParamValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
