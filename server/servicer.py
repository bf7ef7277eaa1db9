"""The gRPC edge: KServe v2 RPCs as thin translations between protobuf and the model manager.

Errors raised below are transport-neutral; ``STATUS_OF`` is the one table that maps them to gRPC
status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from rapidserve import __version__, protos
from rapidserve.server import codec
from rapidserve.server.cache import CacheEntry, cache_key
from rapidserve.server.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NotAllowed,
    Overloaded,
    RapidServeError,
    TooLarge,
    Unavailable,
)
from rapidserve.server.manager import ModelManager
from rapidserve.server.model import ModelVersion
from rapidserve.server.stats import Duration, ServerStats
from rapidserve.server.types import InferResponse

__all__ = ["STATUS_OF", "InferenceServicer", "Undecodable", "deserializer", "serialize", "status_of"]

log = logging.getLogger(__name__)

STATUS_OF: dict[type[RapidServeError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EngineError: grpc.StatusCode.INTERNAL,
    NotAllowed: grpc.StatusCode.FAILED_PRECONDITION,
}

STREAM_MAX_IN_FLIGHT = 1024
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def status_of(exc: RapidServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class Undecodable:
    """What the request deserializer gives for bytes that are not the RPC's message, so that the
    call ends INVALID_ARGUMENT with the parser's reason (grpcio would answer UNKNOWN)."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.reason = f"the request is not a valid {message_type}: {error}"


def deserializer(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising."""
    parse, name = message_class.FromString, message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(name, exc)

    return deserialize


def _rpc(handler: Handler) -> Handler:
    """Turn rapidserve errors into gRPC statuses; anything unexpected is logged and INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                if handler.__name__ == "ModelInfer":
                    self.stats.failed(InvalidRequest.reason)
                raise InvalidRequest(request.reason)
            return await handler(self, request, context)
        except RapidServeError as exc:
            await context.abort(status_of(exc), str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


class InferenceServicer:
    """Implements ``inference.GRPCInferenceService``; one method per RPC."""

    def __init__(
        self, manager: ModelManager, *, stats: ServerStats | None = None, server_name: str = "rapidserve"
    ) -> None:
        self._manager = manager
        self.stats = stats or ServerStats()  # inference requests that named no loaded model
        self._server_name = server_name

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return protos.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return protos.ServerReadyResponse(ready=self._manager.ready)

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return protos.ModelReadyResponse(ready=self._manager.is_ready(request.name, request.version))

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return protos.ServerMetadataResponse(name=self._server_name, version=__version__, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = self._manager.get(request.name, request.version)
        spec = model.spec
        versions = [str(v.version) for v in self._manager.loaded() if v.name == request.name]
        response = protos.ModelMetadataResponse(name=spec.name, versions=versions, platform=spec.platform)
        for tensors, specs in ((response.inputs, spec.inputs), (response.outputs, spec.outputs)):
            for tensor in specs:
                tensors.add(name=tensor.name, datatype=tensor.datatype, shape=spec.full_shape(tensor))
        return response

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return protos.ModelConfigResponse(config=self._manager.get(request.name, request.version).config)

    @_rpc
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._infer(request, _deadline(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Answer each request as it completes; an error answers that request, not the stream.

        At most ``STREAM_MAX_IN_FLIGHT`` requests of one stream run at once: past that the server stops
        reading the stream, so a client that never reads its answers cannot grow the server's memory.
        A request's ``timeout`` parameter (microseconds) is its deadline, as a unary call's would be.
        """
        stream = _StreamAnswers(self)
        reader = asyncio.create_task(stream.read(requests))
        try:
            while (item := await stream.next()) is not None:
                yield item
        finally:
            reader.cancel()
            stream.cancel_pending()
        if stream.broken:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad stream message: {stream.broken[0]}")

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            versions = (
                [self._manager.get(request.name, request.version)]
                if request.version
                else [v for v in self._manager.loaded() if v.name == request.name]
            )
            if not versions:
                raise ModelNotFound(f"unknown model '{request.name}'")
        else:
            versions = self._manager.loaded()
        return protos.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        response = protos.RepositoryIndexResponse()
        for entry in self._manager.index(ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        config_json = ""
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            if key == "config":
                config_json = param.string_param
            elif key.startswith("file:"):
                files[key.removeprefix("file:")] = param.bytes_param
            else:
                raise InvalidRequest(f"unknown load parameter '{key}'; expected 'config' or 'file:<version>/<name>'")
        await self._manager.load(request.model_name, config_json=config_json, files=files)
        return protos.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._manager.unload(request.model_name)
        return protos.RepositoryModelUnloadResponse()

    async def _infer(self, request: Any, deadline: float | None) -> Any:
        """A ``ModelInferResponse``, or for a cache hit its serialized bytes, ready-made."""
        model = self._model_for(request)
        key = _wire_cache_key(request, model) if model.caches else None
        if key is not None:
            entry = model.cache_lookup(key)
            if entry is not None:  # a hit skips decoding, validation, the queue and encoding
                return _with_id(_encoded(model, entry), request.id)
        return codec.encode_response(await model.infer(_decode(model, request, deadline), key))

    def _model_for(self, request: Any) -> ModelVersion:
        """The version an inference request names; failures count without a model label."""
        try:
            return self._manager.get(request.model_name, request.model_version)
        except RapidServeError as exc:
            self.stats.failed(exc.reason)
            raise


class _StreamAnswers:
    """The answers of one ModelStreamInfer call, in completion order.

    Requests to models without the cache are queued with ``ModelVersion.start`` and answered from the
    batcher's completion callback: no task per message. Cached models, whose misses are
    single-flight coroutines, get a task each.
    """

    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer
        self._ready: deque[Any] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._slot_free: asyncio.Future[None] | None = None
        self._started: set[asyncio.Future[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done_reading = False
        self.broken: list[BaseException] = []

    async def read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise ValueError(request.reason)
                while self._in_flight >= STREAM_MAX_IN_FLIGHT:  # stop reading: backpressure
                    self._slot_free = asyncio.get_running_loop().create_future()
                    await self._slot_free
                self._in_flight += 1
                self._begin(request)
        except Exception as exc:  # a message that does not parse, or the stream broke
            self.broken.append(exc)
        self._done_reading = True
        self._wake()

    async def next(self) -> Any:
        """The next serialized answer, or None once the requests ended and all are answered."""
        while not self._ready:
            if self._done_reading and not self._in_flight:
                return None  # (answers still in _ready count as in flight)
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        # the slot frees only once the answer is handed to gRPC to write: a client that stops
        # reading stops the server from reading, and answers cannot pile up
        self._release_slot()
        return self._ready.popleft()

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._slot_free is not None and not self._slot_free.done():
            self._slot_free.set_result(None)

    def cancel_pending(self) -> None:
        for future in (*self._started, *self._tasks):
            future.cancel()

    def _begin(self, request: Any) -> None:
        servicer = self._servicer
        try:
            model = servicer._model_for(request)
            if model.caches:
                task = asyncio.create_task(self._answer_async(request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            started = model.start(_decode(model, request, _stream_deadline(request)))
        except Exception as exc:
            self._emit(request, exc)
            return
        self._started.add(started.future)
        started.future.add_done_callback(lambda future: self._finish(request, model, started))

    def _finish(self, request: Any, model: ModelVersion, started: Any) -> None:
        self._started.discard(started.future)
        try:
            self._emit(request, codec.encode_response(model.finish(started)).SerializeToString())
        except asyncio.CancelledError:  # the stream ended: nobody to answer
            self._release_slot()
            self._wake()
        except Exception as exc:
            self._emit(request, exc)

    async def _answer_async(self, request: Any) -> None:
        try:
            answer = await self._servicer._infer(request, _stream_deadline(request))
            self._emit(request, answer if isinstance(answer, bytes) else answer.SerializeToString())
        except Exception as exc:
            self._emit(request, exc)

    def _emit(self, request: Any, answer: bytes | Exception) -> None:
        """Queue one answer (a serialized response, or the error to report) and free its slot."""
        if isinstance(answer, RapidServeError):
            result = _stream_error(request, status_of(answer), str(answer))
        elif isinstance(answer, Exception):
            log.error("unexpected error in ModelStreamInfer", exc_info=answer)
            result = _stream_error(request, grpc.StatusCode.INTERNAL, f"internal error: {answer}")
        else:
            result = _stream_ok(answer)  # wrapping bytes is cheaper than copying the message
        self._ready.append(result)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


def _decode(model: ModelVersion, request: Any, deadline: float | None) -> Any:
    try:
        return codec.decode_request(request, deadline)
    except RapidServeError as exc:
        model.rejected(exc)
        raise


def _wire_cache_key(request: Any, model: ModelVersion) -> bytes | None:
    """The prediction-cache key straight from a raw request's bytes (what ``PredictionCache.key``
    computes from the decoded arrays); None where the request needs the full path."""
    raw = request.raw_input_contents
    tensors = request.inputs
    if not raw or len(raw) != len(tensors) or request.parameters or any(t.parameters for t in tensors):
        return None  # requests with parameters take the full path, which checks them
    if any(o.parameters for o in request.outputs):
        return None
    parts = [(t.name, t.datatype, tuple(t.shape), raw[i]) for i, t in enumerate(tensors)]
    outputs = tuple(o.name for o in request.outputs) or model.output_names
    return cache_key(model.name, model.version, parts, outputs)


def _encoded(model: ModelVersion, entry: CacheEntry) -> bytes:
    data = entry.memo.get("grpc")
    if data is None:
        response = InferResponse(model.name, str(model.version), entry.arrays)
        data = codec.encode_response(response).SerializeToString()
        model.remember(entry, "grpc", data)
    return data


def _with_id(response: bytes, request_id: str) -> bytes:
    """Set ``id`` (field 3) on a serialized response: a field appended later wins when parsed."""
    if not request_id:
        return response
    encoded = request_id.encode()
    return response + b"\x1a" + protos.varint(len(encoded)) + encoded


def _stream_ok(response: bytes) -> bytes:
    """A serialized ``ModelStreamInferResponse`` wrapping a serialized response (field 2)."""
    return b"\x12" + protos.varint(len(response)) + response


def serialize(message: Any) -> bytes:
    """Response serializer that also passes ready-made bytes through (cache hits)."""
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[no-any-return]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _stream_deadline(request: Any) -> float | None:
    if "timeout" not in request.parameters:
        return None
    param = request.parameters["timeout"]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param") or getattr(param, choice) <= 0:
        return None
    return time.monotonic() + getattr(param, choice) / 1e6


def _stream_error(request: Any, code: grpc.StatusCode, message: str) -> bytes:
    response = protos.ModelStreamInferResponse(error_message=message)
    inner = response.infer_response
    inner.id, inner.model_name, inner.model_version = request.id, request.model_name, request.model_version
    inner.parameters["grpc_code"].int64_param = code.value[0]
    return response.SerializeToString()  # type: ignore[no-any-return]


def _duration(target: Any, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(version: ModelVersion) -> Any:
    stats = version.stats
    message = protos.ModelStatistics(
        name=version.name,
        version=str(version.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    inference = message.inference_stats
    for name in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _duration(getattr(inference, name), getattr(stats, name))
    for size, batch in sorted(stats.batches.items()):
        entry = message.batch_stats.add(batch_size=size)
        for name in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(entry, name), getattr(batch, name))
    return message
