"""The gRPC edge: KServe v2 RPCs as thin translations between protobuf and the model manager.

Errors raised below are transport-neutral; ``STATUS_OF`` is the one table that maps them to gRPC
status codes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from rapidserve import __version__, protos
from rapidserve.server import codec
from rapidserve.server.admission import Admission
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
from rapidserve.server.wire import parse_infer_request

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
# a stream stops reading while its requests in flight and its answers not yet written hold this much
STREAM_MAX_PENDING_BYTES = 64 * 2**20
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
    """A request deserializer that returns ``Undecodable`` instead of raising. Inference requests
    keep large tensor data as views of the received bytes (``rapidserve.server.wire``)."""
    name = message_class.DESCRIPTOR.full_name
    parse = parse_infer_request if name == "inference.ModelInferRequest" else message_class.FromString

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
            await context.abort(grpc.StatusCode.INTERNAL, _unexpected(handler.__name__, exc))

    return wrapper  # type: ignore[return-value]


_error_ids = itertools.count(1)


def _unexpected(where: str, exc: BaseException) -> str:
    """Log an unexpected exception with its traceback; the caller gets only a reference to it."""
    error_id = f"E{next(_error_ids)}"
    log.error("unexpected error %s in %s", error_id, where, exc_info=exc)
    return f"internal error in {where} (reference {error_id} in the server log)"


class InferenceServicer:
    """Implements ``inference.GRPCInferenceService``; one method per RPC."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        stats: ServerStats | None = None,
        server_name: str = "rapidserve",
        admission: Admission | None = None,
        max_response_bytes: int = 2**31 - 1,
    ) -> None:
        self._manager = manager
        self.stats = stats or ServerStats()  # inference requests that named no loaded model
        self._server_name = server_name
        self._admission = admission or Admission(2**62, 2**31, read_timeout_s=3600.0)
        self._max_response_bytes = max_response_bytes
        self._streams: set[_StreamAnswers] = set()
        self.draining = False

    def drain(self) -> None:
        """Shutting down: new inference requests (unary, or on open streams) get UNAVAILABLE; streams
        end once the requests they had accepted are answered."""
        self.draining = True
        for stream in list(self._streams):
            stream.wake()

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return protos.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return protos.ServerReadyResponse(ready=self._manager.ready and not self.draining)

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
    async def ModelInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """Served as a stream-unary method (the same on the wire as unary), so that the server decides
        when the request's message is read: only once the in-flight byte budget has room for it."""
        if self.draining:
            self.stats.failed(Unavailable.reason)
            raise Unavailable("the server is shutting down; retry on another replica")
        deadline = _deadline(context)
        try:
            message, held = await self._admission.read(context.read, _message_size, deadline)
        except RapidServeError as exc:
            self.stats.failed(exc.reason)
            raise
        try:
            if message is grpc.aio.EOF:
                self.stats.failed(InvalidRequest.reason)
                raise InvalidRequest("the call ended without a ModelInferRequest message")
            if isinstance(message, Undecodable):
                self.stats.failed(InvalidRequest.reason)
                raise InvalidRequest(message.reason)
            answer = self._infer(message, deadline, held)
            del message  # _infer lets go of the message once it is decoded
            return await answer
        finally:
            self._admission.release(held)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Answer each request as it completes; an error answers that request, not the stream.

        At most ``STREAM_MAX_IN_FLIGHT`` requests of one stream run at once: past that the server stops
        reading the stream, so a client that never reads its answers cannot grow the server's memory.
        A request's ``timeout`` parameter (microseconds) is its deadline, as a unary call's would be.
        """
        stream = _StreamAnswers(self)
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(context))
        try:
            while (item := await stream.next()) is not None:
                yield item
        finally:
            reader.cancel()
            stream.cancel_pending()
            self._streams.discard(stream)
        if stream.broken:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad stream message: {stream.broken[0]}")
        if self.draining and not stream.done_reading:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")

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

    async def _infer(self, request: Any, deadline: float | None, size: int) -> Any:
        """A ``ModelInferResponse``, or for a cache hit its serialized bytes, ready-made. The message is
        let go once decoded: the caller must not keep a reference (its bytes would be held twice)."""
        model = self._model_for(request)
        key = _wire_cache_key(request, model) if model.caches else None
        if key is not None:
            entry = model.cache_lookup(key)
            if entry is not None:  # a hit skips decoding, validation, the queue and encoding
                return _with_id(self._checked(model, _encoded(model, entry)), request.id)
        if codec.heavy(request, size):  # many elements to convert: keep the event loop free meanwhile
            decoded = await asyncio.to_thread(_decode, model, request, deadline)
        else:
            decoded = _decode(model, request, deadline)
        del request
        return self._checked(model, codec.encode_response(await model.infer(decoded, key)))

    def _checked(self, model: ModelVersion, response: Any) -> Any:
        """Refuse an answer larger than the client is allowed to receive, saying so (gRPC itself would
        fail it with a bare RESOURCE_EXHAUSTED on the client's side)."""
        size = len(response) if isinstance(response, bytes) else response.ByteSize()
        if size > self._max_response_bytes:
            error = EngineError(
                f"model '{model.name}' produced a response of {size} bytes, more than the server sends "
                f"({self._max_response_bytes}, --grpc-max-message-bytes); ask for fewer outputs or a smaller batch"
            )
            model.rejected(error)
            raise error
        return response

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
    single-flight coroutines, and requests costly to decode get a task each.

    Backpressure: the stream stops reading while ``STREAM_MAX_IN_FLIGHT`` requests are unanswered, or
    while its unanswered requests and its answers not yet handed to gRPC hold
    ``STREAM_MAX_PENDING_BYTES``; a client that never reads its answers cannot grow the server's memory.
    Every request is also admitted against the server's in-flight byte budget.
    """

    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer
        self._admission = servicer._admission
        self._ready: deque[bytes] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._in_flight = 0  # read and not yet handed to gRPC (answers in _ready included)
        self._pending_bytes = 0  # of requests being answered, and of answers in _ready
        self._slot_free: asyncio.Future[None] | None = None
        self._started: set[asyncio.Future[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.done_reading = False
        self.broken: list[BaseException] = []

    async def read(self, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                while self._in_flight >= STREAM_MAX_IN_FLIGHT or self._pending_bytes >= STREAM_MAX_PENDING_BYTES:
                    self._slot_free = asyncio.get_running_loop().create_future()
                    await self._slot_free  # stop reading: backpressure
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                if isinstance(request, Undecodable):
                    raise ValueError(request.reason)
                self._in_flight += 1
                self._begin(request, _message_size(request))
        except Exception as exc:  # a message that does not parse, or the stream broke
            self.broken.append(exc)
        self.done_reading = True
        self.wake()

    async def next(self) -> bytes | None:
        """The next serialized answer; None once the requests ended (or the server is draining) and
        every accepted request is answered."""
        while not self._ready:
            if not self._in_flight and (self.done_reading or self._servicer.draining):
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        # the slot frees only once the answer is handed to gRPC to write: a client that stops
        # reading stops the server from reading, and answers cannot pile up
        answer = self._ready.popleft()
        self._release_slot(len(answer))
        return answer

    def _release_slot(self, size: int) -> None:
        self._in_flight -= 1
        self._pending_bytes -= size
        if self._slot_free is not None and not self._slot_free.done():
            self._slot_free.set_result(None)

    def cancel_pending(self) -> None:
        for future in (*self._started, *self._tasks):
            future.cancel()

    def _begin(self, request: Any, size: int) -> None:
        servicer = self._servicer
        if servicer.draining:
            servicer.stats.failed(Unavailable.reason)
            self._emit(request, Unavailable("the server is shutting down; retry on another replica"), 0)
            return
        if not self._admission.admit(size):
            servicer.stats.failed(Overloaded.reason)
            self._emit(request, self._admission.refusal(), 0)
            return
        self._pending_bytes += size
        try:
            model = servicer._model_for(request)
            if model.caches or codec.heavy(request, size):
                task = asyncio.create_task(self._answer_async(request, size))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            started = model.start(_decode(model, request, _stream_deadline(request)))
        except Exception as exc:
            self._emit(request, exc, size)
            return
        self._started.add(started.future)
        started.future.add_done_callback(lambda future: self._finish(request, model, started, size))

    def _finish(self, request: Any, model: ModelVersion, started: Any, size: int) -> None:
        self._started.discard(started.future)
        try:
            answer = self._servicer._checked(model, codec.encode_response(model.finish(started)))
            self._emit(request, answer.SerializeToString(), size)
        except asyncio.CancelledError:  # the stream ended: nobody to answer
            self._admission.release(size)
            self._release_slot(size)
            self.wake()
        except Exception as exc:
            self._emit(request, exc, size)

    async def _answer_async(self, request: Any, size: int) -> None:
        try:
            answer = await self._servicer._infer(request, _stream_deadline(request), size)
            self._emit(request, answer if isinstance(answer, bytes) else answer.SerializeToString(), size)
        except asyncio.CancelledError:  # the stream ended
            self._admission.release(size)
            raise
        except Exception as exc:
            self._emit(request, exc, size)

    def _emit(self, request: Any, answer: bytes | Exception, size: int) -> None:
        """Queue one answer (a serialized response, or the error to report); the request's bytes are
        released from the server's budget and the answer's counted against this stream's."""
        if isinstance(answer, RapidServeError):
            result = _stream_error(request, status_of(answer), str(answer))
        elif isinstance(answer, Exception):
            result = _stream_error(request, grpc.StatusCode.INTERNAL, _unexpected("ModelStreamInfer", answer))
        else:
            result = _stream_ok(answer)  # wrapping bytes is cheaper than copying the message
        if size:
            self._admission.release(size)
        self._pending_bytes += len(result) - size
        self._ready.append(result)
        self.wake()

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


def _decode(model: ModelVersion, request: Any, deadline: float | None) -> Any:
    try:
        return codec.decode_request(request, deadline, model.spec)
    except RapidServeError as exc:
        model.rejected(exc)
        raise


def _message_size(message: Any) -> int:
    """The bytes a received message holds (0 for one that did not parse: it holds none)."""
    return 0 if isinstance(message, Undecodable) or message is grpc.aio.EOF else int(message.ByteSize())


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
