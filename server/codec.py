"""Tensor codec: ModelInferRequest/Response protobufs <-> numpy, with strict checks.

Raw inputs become zero-copy ``np.frombuffer`` views of the request bytes; numeric outputs always go
out in ``raw_output_contents`` (tritonclient reads only that). Every check raises ``InvalidRequest``
with a message saying what was expected and what came.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from rapidserve import protos
from rapidserve.server.datatypes import BYTES, CONTENTS_FIELD, DATATYPES, datatype_of
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.types import InferRequest, InferResponse, ParamValue

__all__ = [
    "decode_parameters",
    "decode_request",
    "decode_response",
    "deserialize_bytes",
    "encode_request",
    "encode_response",
    "serialize_bytes",
    "tensor_to_raw",
]

_MAX_ELEMENTS = 2**40  # far beyond any message gRPC accepts; stops absurd shapes before arithmetic
_LENGTH = struct.Struct("<I")
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


def decode_request(msg: Any, deadline: float | None = None) -> InferRequest:
    """Decode a ``ModelInferRequest`` into numpy arrays, checking it is well formed.

    Checks against the model itself (names, datatypes, shapes) happen in ``ModelSpec.validate``.
    """
    raw = msg.raw_input_contents
    tensors = msg.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries but the request has {len(tensors)} inputs; "
            "expected one raw entry per input, in input order"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
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
        shape = _checked_shape(name, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(
                    f"input '{name}': contents must not be set when raw_input_contents is used "
                    "(send every input raw, or every input typed)"
                )
            inputs[name] = _from_raw(name, datatype, dtype, shape, raw[index])
        else:
            inputs[name] = _from_contents(name, tensor, dtype, shape)
    outputs: tuple[str, ...] = ()
    if msg.outputs:
        outputs = tuple(requested.name for requested in msg.outputs)
        if len(set(outputs)) != len(outputs):
            raise InvalidRequest(f"an output is requested more than once: {list(outputs)}")
        for requested in msg.outputs:
            if requested.parameters:
                _check_tensor_parameters(f"output '{requested.name}'", requested.parameters)
    return InferRequest(
        msg.model_name,
        msg.model_version,
        inputs,
        outputs,
        msg.id,
        decode_parameters(msg.parameters) if msg.parameters else {},
        deadline,
    )


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
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidRequest(f"output '{tensor.name}': unknown datatype '{tensor.datatype}'")
        shape = _checked_shape(tensor.name, tensor.shape)
        if index < len(raw):
            outputs[tensor.name] = _from_raw(tensor.name, tensor.datatype, dtype, shape, raw[index])
        else:
            outputs[tensor.name] = _from_contents(tensor.name, tensor, dtype, shape)
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


def deserialize_bytes(name: str, buffer: bytes, count: int) -> np.ndarray[Any, Any]:
    """Split a serialized BYTES tensor into an object array of ``count`` bytes elements."""
    if count * 4 > len(buffer):  # checked before allocating: a tiny request must not claim 2**32 elements
        raise InvalidRequest(
            f"input '{name}': {len(buffer)} bytes cannot hold {count} BYTES elements (4-byte length prefix each)"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(buffer)
    size = len(buffer)
    pos = 0
    for index in range(count):
        if pos + 4 > size:
            raise InvalidRequest(
                f"input '{name}': BYTES data ends after {index} of {count} elements; "
                "each element needs a 4-byte little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += 4
        if pos + length > size:
            raise InvalidRequest(
                f"input '{name}': BYTES element {index} claims {length} bytes but only {size - pos} remain"
            )
        out[index] = bytes(view[pos : pos + length])
        pos += length
    if pos != size:
        raise InvalidRequest(f"input '{name}': {size - pos} bytes left over after {count} BYTES elements")
    return out


def _checked_shape(name: str, dims: Iterable[int]) -> tuple[int, ...]:
    shape = tuple(dims)
    if shape and (min(shape) < 0 or math.prod(shape) > _MAX_ELEMENTS):
        problem = "has a negative dimension" if min(shape) < 0 else "is too large"
        raise InvalidRequest(f"input '{name}': shape {list(shape)} {problem}")
    return shape


def _from_raw(
    name: str, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], buffer: bytes
) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    if datatype == BYTES:
        return deserialize_bytes(name, buffer, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidRequest(
            f"input '{name}': raw data has {len(buffer)} bytes, expected {expected} "
            f"for {datatype} with shape {list(shape)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _from_contents(name: str, tensor: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    datatype = tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"input '{name}': {datatype} data can only be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidRequest(
            f"input '{name}': {field} has {len(values)} elements, expected {count} for shape {list(shape)}"
        )
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.fromiter(values, dtype=_CONTAINER_DTYPES[field], count=count)
    if dtype.kind in "iu" and wide.size and dtype.itemsize < wide.dtype.itemsize:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequest(f"input '{name}': a value is out of range for {datatype}")
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
