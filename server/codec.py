"""Tensor codec: ModelInferRequest/Response protobufs <-> numpy, with strict checks.

Raw inputs become zero-copy ``np.frombuffer`` views of the request bytes; numeric outputs always go
out in ``raw_output_contents`` (tritonclient reads only that). Every check raises ``InvalidRequest``
with a message saying what was expected and what came.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from rapidserve import protos
from rapidserve.server.datatypes import BYTES, CONTENTS_FIELD, DATATYPES, datatype_of
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.paths import shown
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
_MAX_TENSORS = 4096  # inputs, and requested outputs, of a request decoded without the model's spec
_MAX_PARAMETERS = 4096
# Elements converted by one C call (which holds the GIL) in a large tensor: ~2-4 ms of work, after which
# a worker thread lets the event loop have the GIL.
_CHUNK = 2**16
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
    "bytes_contents": np.dtype(object),
}
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_ITEMSIZE = {datatype: dtype.itemsize for datatype, dtype in DATATYPES.items()}
_OBJECT = np.dtype(object)
_PENDING: np.ndarray[Any, Any] = np.empty(0)  # holds an input's place (and order) until it is converted

# What heavy() weighs: decoding costs in nanoseconds, measured on one x86-64 core (3 GHz class) and
# doubled for slower machines. Raw numeric tensors become views, but reading a raw entry out of the
# message copies it; BYTES elements and typed values are converted one Python object at a time.
_NS_PER_BYTE = 1.0  # copying fresh memory: ~0.5 ns/byte
_NS_PER_BYTES_ELEMENT = 350  # the general split; equal lengths take ~45 ns
_NS_PER_TYPED_BYTES = 130
_NS_PER_TYPED_VALUE = 60  # np.fromiter over a repeated field: ~30 ns a value
_HEAVY_NS = 20_000_000
_HEAVY_ENTRIES = 64  # more inputs, outputs and parameters than this are decoded off the loop: never walked on it
_SMALL_BYTES = 64 * 1024  # no request this small takes ~20 ms to decode: under ~3 ms by the costs above


def decode_request(msg: Any, deadline: float | None = None, spec: ModelSpec | None = None) -> InferRequest:
    """Decode a ``ModelInferRequest`` into numpy arrays, checking it is well formed.

    Every input's header (name, datatype, shape) and data length is checked before any tensor is
    converted element by element (BYTES, typed ``contents``): with ``spec``, against the model
    too, so a request the model would refuse costs no decoding. Without ``spec`` the checks
    against the model are left to ``ModelSpec.validate``. The numbers of inputs, outputs and
    parameters are checked first, so no loop runs longer than the model (or a cap) allows.
    """
    raw = msg.raw_input_contents
    tensors = msg.inputs
    requested = msg.outputs
    parameters = msg.parameters
    if spec is None or len(tensors) > len(spec.inputs) or len(requested) > len(spec.outputs) or parameters:
        _check_counts(tensors, requested, len(parameters), spec)
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
            raise InvalidRequest(f"input '{shown(name)}' appears more than once in the request")
        if tensor.parameters:
            _check_tensor_parameters(f"input '{shown(name)}'", tensor.parameters)
        datatype = tensor.datatype
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidRequest(
                f"input '{shown(name)}': unknown datatype '{shown(datatype)}'; expected one of {', '.join(DATATYPES)}"
            )
        shape, count = _checked_shape("input", name, tensor.shape)
        if raw and tensor.HasField("contents"):
            raise InvalidRequest(
                f"input '{shown(name)}': contents must not be set when raw_input_contents is used "
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
    if requested:
        outputs = _requested_outputs(requested)
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
        decode_parameters(parameters) if parameters else {},
        deadline,
        checked=spec is not None,
    )


def heavy(msg: Any, wire_bytes: int | None = None) -> bool:
    """Whether decoding ``msg`` could keep a thread busy for more than ~20 ms, so that the caller
    runs it off the event loop. A request with more than ``_HEAVY_ENTRIES`` inputs, outputs and
    parameters is heavy before any of them is looked at (even refusing it must not walk them on the
    loop); others are judged from their tensors' shapes and list lengths, never from the data.
    ``wire_bytes``, the serialized request's length when the caller knows it, makes a small request
    cheap to judge and a large one heavy whatever its shapes claim."""
    if len(msg.inputs) + len(msg.outputs) + len(msg.parameters) > _HEAVY_ENTRIES:
        return True
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


def _check_counts(tensors: Any, requested: Any, parameters: int, spec: ModelSpec | None) -> None:
    """Refuse more inputs or outputs than the model has (without ``spec``: than the caps allow), and
    more parameters than the cap, before reading more of them than the model has."""
    inputs, outputs = len(tensors), len(requested)
    if spec is not None:
        if inputs > len(spec.inputs) or outputs > len(spec.outputs):
            first_inputs = [tensor.name for tensor in tensors[: len(spec.inputs) + 1]]
            first_outputs = [output.name for output in requested[: len(spec.outputs) + 1]]
            spec.check_counts(inputs, outputs, first_inputs, first_outputs)
    elif inputs > _MAX_TENSORS:
        raise InvalidRequest(f"the request has {inputs} inputs; at most {_MAX_TENSORS} are accepted")
    elif outputs > _MAX_TENSORS:
        raise InvalidRequest(f"the request asks for {outputs} outputs; at most {_MAX_TENSORS} are accepted")
    if parameters > _MAX_PARAMETERS:
        raise InvalidRequest(f"the request has {parameters} parameters; at most {_MAX_PARAMETERS} are accepted")


def _requested_outputs(requested: Any) -> tuple[str, ...]:
    names = []
    for output in requested:
        names.append(output.name)
        if output.parameters:
            _check_tensor_parameters(f"output '{shown(output.name)}'", output.parameters)
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InvalidRequest(f"output '{shown(name)}' is requested more than once")
            seen.add(name)
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
            raise InvalidRequest(f"output '{shown(name)}': unknown datatype '{shown(datatype)}'")
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
    exactly: anything else is explained by the strict element-by-element walk. Both work a chunk
    at a time (see ``_in_chunks``)."""
    _check_bytes_size(name, buffer, count, kind)
    size = len(buffer)
    if count >= _UNIFORM_MIN:
        (first,) = _LENGTH.unpack_from(buffer, 0)
        step = first + 4
        if step * count == size and _all_equal(np.ndarray((count,), "<u4", buffer, 0, (step,)), first):
            if first == 0:
                if count <= _CHUNK:
                    return np.full(count, b"", dtype=object)
                return _in_chunks(count, _OBJECT, lambda start, stop: b"")
            elements = np.ndarray((count,), f"V{first}", buffer, 4, (step,))
            if count <= _CHUNK:
                return elements.astype(object)
            return _in_chunks(count, _OBJECT, lambda start, stop: elements[start:stop])  # void -> bytes
    if not isinstance(buffer, bytes):
        buffer = bytes(buffer)  # a view of the request (a large one's raw entries are): slices must be bytes
    unpack = _LENGTH.unpack_from
    pos = 0

    def split(begin: int, end: int) -> np.ndarray[Any, Any]:
        nonlocal pos
        at = pos
        items: list[bytes] = [b""] * (end - begin)
        for index in range(end - begin):
            start = at + 4
            at = start + unpack(buffer, at)[0]
            items[index] = buffer[start:at]
        pos = at
        return np.fromiter(items, object, end - begin)  # faster than assigning the list

    try:
        out = split(0, count) if count <= _CHUNK else _in_chunks(count, _OBJECT, split)
    except struct.error:
        pos = -1
    if pos != size:
        _explain_bytes(name, buffer, count, kind)
    return out


def _in_chunks(count: int, dtype: np.dtype[Any], convert: Callable[[int, int], Any]) -> np.ndarray[Any, Any]:
    """The array of ``count`` elements of ``dtype`` that ``convert(start, stop)`` gives piece by piece
    (an array, or one value for all of them), at most ``_CHUNK`` elements a call (see ``_chunks``).
    Callers convert a tensor of at most ``_CHUNK`` elements in one call, without it."""
    out = np.empty(count, dtype)
    for start, stop in _chunks(count):
        out[start:stop] = convert(start, stop)
    return out


def _chunks(count: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` spans of at most ``_CHUNK`` elements covering ``count``, each converted by one C
    call that holds the GIL. Off the event loop, the thread pauses between spans (``time.sleep(0)``)
    so that the loop takes the GIL: numpy lets go of it for a moment inside many calls, and each such
    release restarts the wait of a thread asking for it, so without a pause the loop could wait for
    the whole conversion."""
    pause = asyncio._get_running_loop() is None
    for start in range(0, count, _CHUNK):
        yield start, min(start + _CHUNK, count)
        if pause:
            time.sleep(0)


def _all_equal(values: np.ndarray[Any, Any], value: int) -> bool:
    if len(values) <= _CHUNK:
        return bool((values == value).all())
    return all((values[start:stop] == value).all() for start, stop in _chunks(len(values)))


def _check_bytes_size(name: str, buffer: bytes, count: int, kind: str = "input") -> None:
    if count * 4 > len(buffer):  # checked before allocating: a tiny request must not claim 2**32 elements
        raise InvalidRequest(
            f"{kind} '{shown(name)}': {len(buffer)} bytes cannot hold {count} BYTES elements "
            "(4-byte length prefix each)"
        )


def _explain_bytes(name: str, buffer: bytes, count: int, kind: str) -> NoReturn:
    """Raise what is wrong with a BYTES tensor the fast split could not use."""
    size = len(buffer)
    pos = 0
    for index in range(count):
        if pos + 4 > size:
            raise InvalidRequest(
                f"{kind} '{shown(name)}': BYTES data ends after {index} of {count} elements; "
                "each element needs a 4-byte little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += 4
        if pos + length > size:
            raise InvalidRequest(
                f"{kind} '{shown(name)}': BYTES element {index} claims {length} bytes but only {size - pos} remain"
            )
        pos += length
    raise InvalidRequest(f"{kind} '{shown(name)}': {size - pos} bytes left over after {count} BYTES elements")


def _checked_shape(kind: str, name: str, dims: Any) -> tuple[list[int], int]:
    """A tensor's shape and element count, refusing shapes numpy cannot hold: negative dimensions,
    more than ``_MAX_DIMS`` of them, or non-zero dimensions whose product passes ``_MAX_ELEMENTS``
    (``[2**62, 2**62, 0]`` holds no element, yet no array has that shape)."""
    if len(dims) > _MAX_DIMS:
        raise InvalidRequest(
            f"{kind} '{shown(name)}': shape has {len(dims)} dimensions; at most {_MAX_DIMS} are supported"
        )
    shape: list[int] = dims[:]
    count = math.prod(shape)
    if 0 < count <= _MAX_ELEMENTS and min(shape, default=1) > 0:
        return shape, count
    if min(shape) < 0:
        raise InvalidRequest(f"{kind} '{shown(name)}': shape {shape} has a negative dimension")
    if math.prod(dim for dim in shape if dim) > _MAX_ELEMENTS:
        raise InvalidRequest(
            f"{kind} '{shown(name)}': shape {shape} is too large: its non-zero dimensions multiply to more than "
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
            f"{kind} '{shown(name)}': raw data has {len(buffer)} bytes, expected {expected} for {datatype} "
            f"with shape {shape}"
        )
    return np.ndarray(shape, dtype, buffer)


def _contents_of(name: str, tensor: Any, datatype: str, count: int, shape: list[int], kind: str = "input") -> Any:
    """The typed values of a tensor, checked to be as many as its shape says (not yet converted)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"{kind} '{shown(name)}': {datatype} data can only be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(
            f"{kind} '{shown(name)}': {field} has {len(values)} elements, expected {count} for shape {shape}"
        )
    return values


def _convert_contents(
    name: str, datatype: str, count: int, shape: list[int], values: Any, kind: str = "input"
) -> np.ndarray[Any, Any]:
    """Typed values (as checked by ``_contents_of``) as an array: one Python object at a time, a chunk
    at a time (see ``_in_chunks``)."""
    dtype = DATATYPES[datatype]
    wide = _CONTAINER_DTYPES[CONTENTS_FIELD[datatype]]
    narrow = dtype.kind in "iu" and dtype.itemsize < wide.itemsize
    items = iter(values)

    def convert(start: int, stop: int) -> np.ndarray[Any, Any]:
        chunk = np.fromiter(items, wide, stop - start)  # takes exactly that many: the next chunk goes on from there
        if narrow:
            _check_range(kind, name, datatype, chunk)
        return chunk.astype(dtype, copy=False)

    return (convert(0, count) if count <= _CHUNK else _in_chunks(count, dtype, convert)).reshape(shape)


def _check_range(kind: str, name: str, datatype: str, values: np.ndarray[Any, Any]) -> None:
    info = np.iinfo(DATATYPES[datatype])
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise InvalidRequest(f"{kind} '{shown(name)}': a value is out of range for {datatype}")


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
