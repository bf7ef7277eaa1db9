"""gRPC server reflection (``grpc.reflection.v1alpha`` and ``v1``) from our own descriptors.

Answers list_services, file_by_filename and file_containing_symbol (messages, fields, enums, enum
values, services, methods, nested ones included) with the file and every file it imports. We define
no extensions: file_containing_extension is NOT_FOUND, and all_extension_numbers_of_type is an empty
list for a known message (NOT_FOUND otherwise). Errors about one request go in its error_response;
the stream goes on.

Bounded like the other surfaces: a stream answers at most ``MAX_REQUESTS_PER_STREAM`` requests of at
most ``MAX_REQUEST_BYTES`` each (beyond either the call ends), each admitted against the in-flight
budget; a name longer than ``MAX_NAME_CHARS`` is refused without a lookup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from rapidserve import protos
from rapidserve.server.admission import Admission
from rapidserve.server.status import message_of

__all__ = ["MAX_NAME_CHARS", "MAX_REQUESTS_PER_STREAM", "MAX_REQUEST_BYTES", "Reflection"]

MAX_REQUESTS_PER_STREAM = 1024  # a client describing a service asks a few dozen
MAX_REQUEST_BYTES = 16 * 1024  # a host name and one symbol or file name
MAX_NAME_CHARS = 1024  # a fully-qualified symbol or a file name

_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Reflection:
    """Describes ``files`` and lists ``services``, for every reflection version in ``protos``."""

    def __init__(
        self,
        files: Iterable[descriptor_pb2.FileDescriptorProto],
        services: Sequence[str],
        admission: Admission | None = None,
    ) -> None:
        self._files: dict[str, bytes] = {}
        self._imports: dict[str, tuple[str, ...]] = {}
        self._symbols: dict[str, str] = {}  # fully-qualified symbol -> the file defining it
        self._messages: set[str] = set()
        for file in files:
            self._files[file.name] = file.SerializeToString()
            self._imports[file.name] = tuple(file.dependency)
            self._index(file)
        self._services = tuple(services)
        self._admission = admission

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """One handler per reflection version (their messages are the same on the wire)."""
        method = grpc.stream_stream_rpc_method_handler(
            self.ServerReflectionInfo, response_serializer=protos.ServerReflectionResponse.SerializeToString
        )
        return [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in protos.REFLECTION_SERVICE_NAMES
        ]

    async def ServerReflectionInfo(self, requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Read raw requests one at a time, so that each is bounded before it is parsed."""
        for _ in range(MAX_REQUESTS_PER_STREAM):
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            if len(data) > MAX_REQUEST_BYTES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a reflection request has {len(data)} bytes; at most {MAX_REQUEST_BYTES} are taken",
                )
            admission = self._admission
            if admission is not None and not admission.admit(len(data)):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message_of(admission.refusal()))
            try:
                answer = self.answer(protos.ServerReflectionRequest.FromString(data))
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message_of(f"the request does not parse: {exc}"))
            finally:
                if admission is not None:
                    admission.release(len(data))
            yield answer
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a reflection stream takes at most {MAX_REQUESTS_PER_STREAM} requests; open another",
        )

    def answer(self, request: Any) -> Any:
        response = protos.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        if kind is None:
            return _error(response, _INVALID_ARGUMENT, "the request asks for nothing")
        name = getattr(request, kind)
        if kind == "file_containing_extension":
            name = name.containing_type
        if len(name) > MAX_NAME_CHARS:
            return _error(response, _INVALID_ARGUMENT, f"a name of {len(name)} characters; at most {MAX_NAME_CHARS}")
        if kind == "list_services":
            response.list_services_response.SetInParent()
            for service in self._services:
                response.list_services_response.service.add(name=service)
        elif kind == "file_by_filename" or kind == "file_containing_symbol":
            file = name if kind == "file_by_filename" else self._symbols.get(name)
            if file not in self._files:
                what = "file" if kind == "file_by_filename" else "symbol"
                return _error(response, _NOT_FOUND, message_of(f"no {what} {name!r}"))
            response.file_descriptor_response.file_descriptor_proto.extend(
                self._files[f] for f in self._with_imports(file)
            )
        elif kind == "all_extension_numbers_of_type" and name in self._messages:
            response.all_extension_numbers_response.base_type_name = name  # we define no extensions
        else:  # file_containing_extension, or extension numbers of an unknown type
            return _error(response, _NOT_FOUND, message_of(f"no extensions of {name!r}"))
        return response

    def _with_imports(self, name: str) -> list[str]:
        """``name`` first, then every file it imports, directly or not."""
        order: list[str] = []
        pending = [name]
        while pending:
            file = pending.pop()
            if file in order or file not in self._files:
                continue
            order.append(file)
            pending.extend(reversed(self._imports[file]))
        return order

    def _index(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        """Every symbol ``file`` defines, by protobuf's scoping (an enum value is its enum's sibling)."""
        package = f"{file.package}." if file.package else ""

        def enums(scope: str, types: Iterable[descriptor_pb2.EnumDescriptorProto]) -> None:
            for enum in types:
                self._symbols[scope + enum.name] = file.name
                for value in enum.value:
                    self._symbols[scope + value.name] = file.name

        def messages(scope: str, types: Iterable[descriptor_pb2.DescriptorProto]) -> None:
            for message in types:
                full = scope + message.name
                self._symbols[full] = file.name
                self._messages.add(full)
                for member in (*message.field, *message.oneof_decl, *message.extension):
                    self._symbols[f"{full}.{member.name}"] = file.name
                messages(f"{full}.", message.nested_type)
                enums(f"{full}.", message.enum_type)

        messages(package, file.message_type)
        enums(package, file.enum_type)
        for extension in file.extension:
            self._symbols[package + extension.name] = file.name
        for service in file.service:
            self._symbols[package + service.name] = file.name
            for method in service.method:
                self._symbols[f"{package}{service.name}.{method.name}"] = file.name


def _error(response: Any, code: int, message: str) -> Any:
    response.error_response.error_code = code
    response.error_response.error_message = message
    return response
