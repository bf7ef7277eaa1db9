"""The gRPC edge: KServe v2 RPCs as thin translations between protobuf and the model manager.

Errors raised below are transport-neutral; ``rapidserve.server.status`` maps them to gRPC status
codes. How calls reach these methods (reading through the in-flight budget, parsing) is
``rapidserve.server.transport``; what an inference request goes through below the edge (the wire-level
cache path, decoding, the model, encoding) is ``rapidserve.server.inference``; one stream's requests
and answers are ``rapidserve.server.streams``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rapidserve import protos
from rapidserve.server.admission import Admission
from rapidserve.server.errors import InvalidRequest, RapidServeError, Unavailable
from rapidserve.server.inference import InferencePath
from rapidserve.server.manager import ModelManager
from rapidserve.server.replies import load_arguments, model_metadata, server_metadata
from rapidserve.server.stats import ServerStats
from rapidserve.server.status import message_of, status_of, unexpected
from rapidserve.server.streams import SHUTTING_DOWN, StreamAnswers
from rapidserve.server.wire import Undecodable, parser

__all__ = ["InferenceServicer", "deadline_of"]

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _rpc(handler: Handler) -> Handler:
    """Turn rapidserve errors into gRPC statuses; anything unexpected is logged and INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                if handler.__name__ == "ModelInfer":
                    self.stats.failed(InvalidRequest.reason)
                raise InvalidRequest(request.reason)
            answer = handler(self, request, context)
            del request  # (ModelInfer lets go of its request once decoded)
            return await answer
        except RapidServeError as exc:
            await context.abort(status_of(exc), message_of(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, unexpected(handler.__name__, exc))

    return wrapper  # type: ignore[return-value]


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
        self.admission = admission or Admission(2**62, 2**31, read_timeout_s=3600.0)
        self.inference = InferencePath(manager, self.stats, max_response_bytes)
        self.parse = parser(protos.ModelInferRequest)
        self.draining = False
        self._streams: set[StreamAnswers] = set()
        self._unary_in_flight = 0
        self._idle: asyncio.Future[None] | None = None  # made by idle(), resolved once nothing is in flight

    def drain(self) -> None:
        """Shutting down: new inference requests (unary, or on open streams) get UNAVAILABLE; streams
        end once the requests they had accepted are answered."""
        self.draining = True
        for stream in list(self._streams):
            stream.wake()
        self._check_idle()

    async def idle(self) -> None:
        """Returns once no inference request that was accepted is unanswered (after ``drain``)."""
        if self._unary_in_flight or self._streams:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _check_idle(self) -> None:
        if self._idle is not None and not self._unary_in_flight and not self._streams and not self._idle.done():
            self._idle.set_result(None)

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
        return server_metadata(self._server_name)

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return model_metadata(self._manager, request.name, request.version)

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return protos.ModelConfigResponse(config=self._manager.get(request.name, request.version).config)

    @_rpc
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.draining:
            self.stats.failed(Unavailable.reason)
            raise Unavailable(SHUTTING_DOWN)
        self._unary_in_flight += 1
        try:
            answer = self.inference.infer(request, deadline_of(context), request.ByteSize())
            del request  # infer lets go of it once it is decoded
            return await answer
        finally:
            self._unary_in_flight -= 1
            self._check_idle()

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Answer each request as it completes; an error answers that request, not the stream.
        A request's ``timeout`` parameter (microseconds) is its deadline, as a unary call's would be."""
        stream = StreamAnswers(self)
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(context))
        try:
            while (item := await stream.next()) is not None:
                yield item
        finally:
            self._streams.discard(stream)  # first: a second cancellation must not skip it
            self._check_idle()
            reader.cancel()  # (read() handles its own errors: nothing to collect)
            stream.cancel_pending()
        if stream.broken:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message_of(f"bad stream message: {stream.broken[0]}"))
        if self.draining and not stream.done_reading:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        return await self._manager.statistics(request.name, request.version)

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        response = protos.RepositoryIndexResponse()
        for entry in await self._manager.listing(ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self._manager.check_load_allowed()  # before walking a caller's parameters
        parameters = request.parameters
        config, files = load_arguments(parameters.items(), len(parameters))
        await self._manager.load(
            request.model_name, config_json=config.string_param if config else "",
            files={path: param.bytes_param for path, param in files},
        )  # fmt: skip
        return protos.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._manager.unload(request.model_name)
        return protos.RepositoryModelUnloadResponse()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a ``time.monotonic()`` time."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
