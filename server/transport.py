"""How gRPC calls reach the servicers: the handler table, with every unary request read through the
in-flight byte budget and parsed off the event loop when large.

A method that takes one request message is served as if it took a stream of them (identical on the
wire), so that the server, not gRPC, decides when the message is read: only once ``Admission`` has
room for it. The message arrives as bytes and is parsed here, in a worker thread from
``SPLIT_FROM_BYTES`` up, so no request holds the event loop while it is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from rapidserve import protos
from rapidserve.server.access import protocol_of
from rapidserve.server.admission import Admission
from rapidserve.server.errors import InvalidRequest, RapidServeError
from rapidserve.server.health import MAX_REQUEST_BYTES, HealthService
from rapidserve.server.servicer import InferenceServicer, deadline_of
from rapidserve.server.status import message_of, status_of
from rapidserve.server.wire import SPLIT_FROM_BYTES, parser

__all__ = ["HEALTH_RPCS", "admitted", "endpoint_of", "health_handler", "inference_handler", "recorded", "serialize"]


def serialize(message: Any) -> bytes:
    """Response serializer that also passes ready-made bytes through (cache hits)."""
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[no-any-return]


# The KServe health RPCs: their requests are read from a budget of their own, so that probes keep
# answering while inference requests fill the main one.
HEALTH_RPCS = ("ServerLive", "ServerReady", "ModelReady")
# The most a health or control request may hold once read (they name a model, a version, a service);
# a larger one is refused before it is parsed.
CONTROL_REQUEST_BYTES = 64 * 1024


def inference_handler(
    servicer: InferenceServicer, admission: Admission | None, health: Admission | None, load_request_bytes: int
) -> grpc.GenericRpcHandler:
    """``load_request_bytes``: the most a RepositoryModelLoad request may hold (its config, and its
    files where uploads are allowed)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    servicer.stats.expect_calls("grpc", "inference")
    for method in protos.SERVICE.methods:
        response = protos.message_class(method.output_type)
        serializer = serialize if method.name in ("ModelInfer", "ModelStreamInfer") else response.SerializeToString
        behavior = getattr(servicer, method.name)
        if method.client_streaming:  # ModelStreamInfer parses its own messages
            handler = grpc.stream_stream_rpc_method_handler(behavior, response_serializer=serializer)
            handlers[method.name] = recorded(handler, servicer.stats.record_call, endpoint_of(method.name))
            continue
        plain = grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=parser(protos.message_class(method.input_type)),
            response_serializer=serializer,
        )
        name = method.name
        if name == "ModelInfer":
            handlers[name] = admitted(plain, admission, servicer.stats.failed)
        elif name in HEALTH_RPCS:
            handlers[name] = admitted(plain, health, max_bytes=CONTROL_REQUEST_BYTES)
        else:
            limit = load_request_bytes if name == "RepositoryModelLoad" else CONTROL_REQUEST_BYTES
            handlers[name] = admitted(plain, admission, max_bytes=limit)
        handlers[name] = recorded(handlers[name], servicer.stats.record_call, endpoint_of(name))
    return grpc.method_handlers_generic_handler(protos.SERVICE_NAME, handlers)


def endpoint_of(rpc: str) -> str:
    """The ``endpoint`` label of an RPC of the inference service: Triton's API group, as HTTP's
    (``inference``, ``health``, ...); a stream is ``inference-stream``, its duration the stream's life."""
    if rpc == "ModelStreamInfer":
        return "inference-stream"
    return protocol_of(f"/{protos.SERVICE_NAME}/{rpc}") or "other"


Record = Callable[[str, str, bool, float], None]  # (protocol, endpoint, ok, seconds)


def recorded(handler: grpc.RpcMethodHandler, record: Record, endpoint: str) -> grpc.RpcMethodHandler:
    """``handler`` with each call reported as ``record("grpc", endpoint, ok, seconds)`` before its
    status is sent (a client holding its answer finds it counted): ok unless it ended with an error
    status, was cancelled or raised."""
    clock = time.perf_counter
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    response_streaming = handler.unary_stream is not None or handler.stream_stream is not None
    behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    assert behavior is not None

    if not response_streaming:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Recorded(context, record, endpoint, clock())
            try:
                answer = behavior(request, call)
                del request  # the method lets go of its request once decoded
                result = await answer
                call.count(ok=True)
                return result
            finally:
                call.count(ok=False)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary, **options)
        return grpc.stream_unary_rpc_method_handler(unary, **options)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Recorded(context, record, endpoint, clock())
        try:
            async with contextlib.aclosing(behavior(request, call)) as answers:
                async for answer in answers:
                    yield answer
            call.count(ok=True)
        finally:
            call.count(ok=False)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **options)
    return grpc.stream_stream_rpc_method_handler(streaming, **options)


class _Recorded:
    """A call's context, counted once: by ``abort`` before it sends the error status (gRPC sends it
    before the handler resumes), else when the handler ends. Everything else is the context's own."""

    __slots__ = ("_context", "_counted", "_endpoint", "_record", "_start")

    def __init__(self, context: grpc.aio.ServicerContext, record: Record, endpoint: str, start: float) -> None:
        self._context, self._record, self._endpoint, self._start = context, record, endpoint, start
        self._counted = False

    def count(self, ok: bool) -> None:
        if not self._counted:
            self._counted = True
            self._record("grpc", self._endpoint, ok, time.perf_counter() - self._start)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self.count(ok=False)
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("abort returned")  # (it raises)

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def health_handler(servicer: HealthService, admission: Admission | None) -> grpc.GenericRpcHandler:
    """The standard gRPC health service, its requests bounded (by the health budget)."""
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=protos.HealthCheckRequest.FromString,
        response_serializer=protos.HealthCheckResponse.SerializeToString,
    )
    watch = grpc.unary_stream_rpc_method_handler(
        servicer.Watch,
        request_deserializer=protos.HealthCheckRequest.FromString,
        response_serializer=protos.HealthCheckResponse.SerializeToString,
    )
    handlers = {
        "Check": admitted(check, admission, max_bytes=MAX_REQUEST_BYTES),
        "Watch": admitted(watch, admission, max_bytes=MAX_REQUEST_BYTES),
    }
    return grpc.method_handlers_generic_handler(protos.HEALTH_SERVICE_NAME, handlers)


def admitted(
    handler: grpc.RpcMethodHandler,
    admission: Admission | None,
    refused: Callable[[str], None] | None = None,
    max_bytes: int | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` (a unary-request method) served so that its request is read through ``admission``
    and parsed off the event loop when large; ``refused(reason)`` hears of requests refused before
    they reached the method; a request over ``max_bytes`` is refused unparsed. Without an admission
    (``--max-inflight-bytes 0``) it is served as it is:
    gRPC reads the request as soon as it comes, a little cheaper per call, with no bound on memory."""
    if admission is None:
        return handler
    parse = handler.request_deserializer or (lambda data: data)
    behavior = handler.unary_unary or handler.unary_stream
    assert behavior is not None, "stream-request methods read their own messages"

    async def receive(context: grpc.aio.ServicerContext) -> tuple[Any, int]:
        try:
            data, held = await admission.read(context.read, _length, deadline_of(context))
            if data is grpc.aio.EOF:
                raise InvalidRequest("the call ended without a request message")
            if max_bytes is not None and len(data) > max_bytes:
                admission.release(held)
                raise InvalidRequest(f"the request has {len(data)} bytes; this method takes at most {max_bytes}")
        except RapidServeError as exc:
            if refused is not None:
                refused(exc.reason)
            await context.abort(status_of(exc), message_of(exc))
        try:
            message = parse(data) if len(data) < SPLIT_FROM_BYTES else await asyncio.to_thread(parse, data)
        except DecodeError as exc:  # (our own parsers answer Undecodable instead)
            admission.release(held)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message_of(f"the request does not parse: {exc}"))
        except BaseException:
            admission.release(held)
            raise
        return message, held

    options = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:

        async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            message, held = await receive(context)
            try:
                answer = behavior(message, context)
                del message  # the method lets go of it once it is done with it
                return await answer
            finally:
                admission.release(held)

        return grpc.stream_unary_rpc_method_handler(unary, **options)

    if inspect.isasyncgenfunction(behavior):

        async def generator(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            # a response stream may stay open for long (health Watch): its small request, parsed, gives
            # its bytes back at once rather than holding the budget for the stream's life
            message, held = await receive(context)
            admission.release(held)
            async for item in behavior(message, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(generator, **options)

    async def writer(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        message, held = await receive(context)
        try:
            return await behavior(message, context)
        finally:
            admission.release(held)

    return grpc.stream_stream_rpc_method_handler(writer, **options)


def _length(data: Any) -> int:
    return 0 if data is grpc.aio.EOF else len(data)
