"""The answers both edges give, built once as protobuf messages: the gRPC servicer sends them as they
are, the HTTP edge renders them as JSON (``as_json``), so the two agree by construction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from rapidserve import __version__, protos
from rapidserve.server.errors import InvalidRequest, TooLarge
from rapidserve.server.manager import MAX_UPLOAD_FILES, ModelManager

__all__ = [
    "EXTENSIONS",
    "as_json",
    "load_arguments",
    "model_metadata",
    "server_metadata",
]

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def server_metadata(server_name: str) -> Any:
    return protos.ServerMetadataResponse(name=server_name, version=__version__, extensions=EXTENSIONS)


def model_metadata(manager: ModelManager, name: str, version: str) -> Any:
    """ModelMetadata: every shape has ``-1`` for the batch dimension of a batching model (Triton's)."""
    model = manager.get(name, version)
    spec = model.spec
    versions = [str(v.version) for v in manager.loaded() if v.name == name]
    response = protos.ModelMetadataResponse(name=spec.name, versions=versions, platform=spec.platform)
    for tensors, specs in ((response.inputs, spec.inputs), (response.outputs, spec.outputs)):
        for tensor in specs:
            tensors.add(name=tensor.name, datatype=tensor.datatype, shape=spec.full_shape(tensor))
    return response


def load_arguments(parameters: Iterable[tuple[str, Any]], count: int) -> tuple[str, list[tuple[str, Any]]]:
    """A model load's ``config`` and its ``file:<version>/<name>`` parameters (values still as the wire
    gave them), refusing unknown keys and more parameters than a load takes. Call it after
    ``ModelManager.check_load_allowed``: a caller's parameters are walked only where loads are taken."""
    if count > 1 + MAX_UPLOAD_FILES:
        raise TooLarge(f"the load has {count} parameters; it takes a config and at most {MAX_UPLOAD_FILES} files")
    config: Any = ""
    files: list[tuple[str, Any]] = []
    for key, value in parameters:
        if key == "config":
            config = value
        elif key.startswith("file:"):
            files.append((key.removeprefix("file:"), value))
        else:
            raise InvalidRequest(f"unknown load parameter '{key}'; expected 'config' or 'file:<version>/<name>'")
    return config, files


def as_json(message: Any) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: protobuf's JSON mapping with field names as in the
    .proto, every field present, and 64-bit integers as JSON numbers (protobuf writes them as strings;
    Triton's JSON, which perf_analyzer and tritonclient read, has numbers)."""
    try:
        data = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf before 5.26 names the option differently
        data = json_format.MessageToDict(message, preserving_proto_field_name=True, including_default_value_fields=True)
    _numbers(message.DESCRIPTOR, data)
    return data


def _numbers(descriptor: Any, data: dict[str, Any]) -> None:
    """Turn the 64-bit integers of ``data`` (the JSON form of a message of ``descriptor``) into ints."""
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value_field = message.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _numbers(value_field.message_type, item)
            elif value_field.type in _INT64_TYPES:
                for key in value:
                    value[key] = int(value[key])
        elif message is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(message, item)
        elif field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
