"""Tensor codec shared by the clients and the server: numpy <-> KServe v2 tensors, with strict checks.

Raw tensors become zero-copy ``np.frombuffer``-style views of the message bytes; numeric tensors always
go out in the raw contents field (tritonclient reads only that). Every check raises ``InvalidTensor``
with a message saying what was expected and what came. The server's request decoding, which also
checks a request against its model, builds on these parts in ``rapidserve.server.codec``.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import numpy as np

from rapidserve import protos
from rapidserve.common.datatypes import BYTES, CONTENTS_FIELD, DATATYPES, datatype_of
from rapidserve.common.errors import InvalidTensor, shown
from rapidserve.common.types import ParamValue

__all__ = [
    "MAX_DIMS",
    "add_tensors",
    "check_bytes_size",
    "checked_shape",
    "contents_of",
    "convert_contents",
    "decode_parameters",
    "decode_response",
    "deserialize_bytes",
    "encode_request",
    "from_raw",
    "serialize_bytes",
    "tensor_to_raw",
]

MAX_DIMS = 64  # numpy's limit; checked before a shape is even copied out of the message
_MAX_ELEMENTS = 2**40  # far beyond any message gRPC accepts; stops absurd shapes before arithmetic
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
_OBJECT = np.dtype(object)


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
    add_tensors(msg.inputs, msg.raw_input_contents, inputs)
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
            raise InvalidTensor(f"output '{shown(name)}': unknown datatype '{shown(datatype)}'")
        shape, count = checked_shape("output", name, tensor.shape)
        if index >= len(raw):
            values = contents_of(name, tensor, datatype, count, shape, "output")
            outputs[name] = convert_contents(name, datatype, count, shape, values, "output")
        elif datatype == BYTES:
            buffer = raw[index]
            check_bytes_size(name, buffer, count, "output")
            outputs[name] = deserialize_bytes(name, buffer, count, "output").reshape(shape)
        else:
            outputs[name] = from_raw(name, datatype, dtype, shape, count, raw[index], "output")
    return outputs


def decode_parameters(params: Any) -> dict[str, ParamValue]:
    decoded: dict[str, ParamValue] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(param, choice)
    return decoded


def add_tensors(tensors: Any, raw: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    """Append ``arrays`` to a message's tensor list, their data to its raw contents, in order."""
    for name, array in arrays.items():
        datatype = datatype_of(array.dtype)
        tensor = tensors.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        raw.append(tensor_to_raw(array, datatype))


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
    check_bytes_size(name, buffer, count, kind)
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


def check_bytes_size(name: str, buffer: bytes, count: int, kind: str = "input") -> None:
    """Refuse a BYTES buffer too short for ``count`` length prefixes, before anything is allocated."""
    if count * 4 > len(buffer):  # a tiny request must not claim 2**32 elements
        raise InvalidTensor(
            f"{kind} '{shown(name)}': {len(buffer)} bytes cannot hold {count} BYTES elements "
            "(4-byte length prefix each)"
        )


def checked_shape(kind: str, name: str, dims: Any) -> tuple[list[int], int]:
    """A tensor's shape and element count, refusing shapes numpy cannot hold: negative dimensions,
    more than ``MAX_DIMS`` of them, or non-zero dimensions whose product passes ``_MAX_ELEMENTS``
    (``[2**62, 2**62, 0]`` holds no element, yet no array has that shape)."""
    if len(dims) > MAX_DIMS:
        raise InvalidTensor(
            f"{kind} '{shown(name)}': shape has {len(dims)} dimensions; at most {MAX_DIMS} are supported"
        )
    shape: list[int] = dims[:]
    count = math.prod(shape)
    if 0 < count <= _MAX_ELEMENTS and min(shape, default=1) > 0:
        return shape, count
    if min(shape) < 0:
        raise InvalidTensor(f"{kind} '{shown(name)}': shape {shape} has a negative dimension")
    if math.prod(dim for dim in shape if dim) > _MAX_ELEMENTS:
        raise InvalidTensor(
            f"{kind} '{shown(name)}': shape {shape} is too large: its non-zero dimensions multiply to more than "
            f"{_MAX_ELEMENTS} elements"
        )
    return shape, count


def from_raw(
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
        raise InvalidTensor(
            f"{kind} '{shown(name)}': raw data has {len(buffer)} bytes, expected {expected} for {datatype} "
            f"with shape {shape}"
        )
    return np.ndarray(shape, dtype, buffer)


def contents_of(name: str, tensor: Any, datatype: str, count: int, shape: list[int], kind: str = "input") -> Any:
    """The typed values of a tensor, checked to be as many as its shape says (not yet converted)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidTensor(f"{kind} '{shown(name)}': {datatype} data can only be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidTensor(
            f"{kind} '{shown(name)}': {field} has {len(values)} elements, expected {count} for shape {shape}"
        )
    return values


def convert_contents(
    name: str, datatype: str, count: int, shape: list[int], values: Any, kind: str = "input"
) -> np.ndarray[Any, Any]:
    """Typed values (as checked by ``contents_of``) as an array: one Python object at a time, a chunk
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


def _explain_bytes(name: str, buffer: bytes, count: int, kind: str) -> NoReturn:
    """Raise what is wrong with a BYTES tensor the fast split could not use."""
    size = len(buffer)
    pos = 0
    for index in range(count):
        if pos + 4 > size:
            raise InvalidTensor(
                f"{kind} '{shown(name)}': BYTES data ends after {index} of {count} elements; "
                "each element needs a 4-byte little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += 4
        if pos + length > size:
            raise InvalidTensor(
                f"{kind} '{shown(name)}': BYTES element {index} claims {length} bytes but only {size - pos} remain"
            )
        pos += length
    raise InvalidTensor(f"{kind} '{shown(name)}': {size - pos} bytes left over after {count} BYTES elements")


def _check_range(kind: str, name: str, datatype: str, values: np.ndarray[Any, Any]) -> None:
    info = np.iinfo(DATATYPES[datatype])
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise InvalidTensor(f"{kind} '{shown(name)}': a value is out of range for {datatype}")


def _set_parameter(param: Any, value: ParamValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
