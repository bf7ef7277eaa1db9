"""The server's side of the tensor codec: ``ModelInferRequest`` -> ``InferRequest``, checked (against the
model's spec when given), and ``InferResponse`` -> ``ModelInferResponse``.

The tensor-level parts (shapes, raw and typed data, BYTES) are shared with the clients in
``rapidserve.common.codec``; their ``InvalidTensor`` becomes ``InvalidRequest`` here. Every check says
what was expected and what came.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from rapidserve import protos
from rapidserve.common.codec import (
    MAX_DIMS,
    add_tensors,
    check_bytes_size,
    checked_shape,
    contents_of,
    convert_contents,
    decode_parameters,
    deserialize_bytes,
    from_raw,
)
from rapidserve.common.datatypes import BYTES, CONTENTS_FIELD, DATATYPES
from rapidserve.common.errors import InvalidTensor, shown
from rapidserve.server.errors import InvalidRequest
from rapidserve.server.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from rapidserve.server.config import ModelSpec

__all__ = ["decode_request", "encode_response", "heavy"]

_MAX_TENSORS = 4096  # inputs, and requested outputs, of a request decoded without the model's spec
_MAX_PARAMETERS = 4096
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
    try:
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
                    f"input '{shown(name)}': unknown datatype '{shown(datatype)}'; "
                    f"expected one of {', '.join(DATATYPES)}"
                )
            shape, count = checked_shape("input", name, tensor.shape)
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
                    inputs[name] = from_raw(name, datatype, dtype, shape, count, buffer)
                    continue
                check_bytes_size(name, buffer, count)
                pending.append((name, datatype, count, shape, buffer))
            else:
                pending.append((name, datatype, count, shape, contents_of(name, tensor, datatype, count, shape)))
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
                inputs[name] = convert_contents(name, datatype, count, shape, data)
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
    except InvalidTensor as error:  # the tensor-level checks shared with the clients
        raise InvalidRequest(str(error)) from None


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
        if len(dims) > MAX_DIMS:
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
    add_tensors(msg.outputs, msg.raw_output_contents, response.outputs)
    return msg
