"""One ModelStreamInfer call: requests read one at a time, answered in completion order.

Requests to models without the cache are queued with ``ModelVersion.start`` and answered from the
batcher's completion callback: no task per message. Cached models, whose misses are single-flight
coroutines, and requests costly to parse or decode get a task each.

Backpressure: the stream stops reading while ``STREAM_MAX_IN_FLIGHT`` requests are unanswered, or
while its unanswered requests and its answers not yet handed to gRPC hold ``STREAM_MAX_PENDING_BYTES``;
a client that never reads its answers cannot grow the server's memory. Every request is also admitted
against the server's in-flight byte budget, and answered RESOURCE_EXHAUSTED when it does not fit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import grpc

from rapidserve import protos
from rapidserve.server import codec
from rapidserve.server.errors import InvalidRequest, Overloaded, RapidServeError, Unavailable
from rapidserve.server.model import ModelVersion
from rapidserve.server.status import message_of, status_of, unexpected
from rapidserve.server.wire import SPLIT_FROM_BYTES, Undecodable, stream_ok

if TYPE_CHECKING:
    from rapidserve.server.servicer import InferenceServicer

__all__ = ["STREAM_MAX_IN_FLIGHT", "STREAM_MAX_PENDING_BYTES", "StreamAnswers"]

STREAM_MAX_IN_FLIGHT = 1024
STREAM_MAX_PENDING_BYTES = 64 * 2**20
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class StreamAnswers:
    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer
        self._admission = servicer.admission
        self._inference = servicer.inference
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
        """Read requests until the client half-closes (raw bytes: parsed here, off the loop when large)."""
        try:
            while True:
                while self._in_flight >= STREAM_MAX_IN_FLIGHT or self._pending_bytes >= STREAM_MAX_PENDING_BYTES:
                    self._slot_free = asyncio.get_running_loop().create_future()
                    await self._slot_free  # stop reading: backpressure
                data = await context.read()
                if data is grpc.aio.EOF:
                    break
                self._in_flight += 1
                if len(data) >= SPLIT_FROM_BYTES:
                    self._spawn(self._parse_then_begin(data))
                elif not self._begin(self._servicer.parse(data), len(data)):
                    break  # not a request: the stream ends once what it accepted is answered
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

    def cancel_pending(self) -> None:
        for future in (*self._started, *self._tasks):
            future.cancel()

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _release_slot(self, size: int) -> None:
        self._in_flight -= 1
        self._pending_bytes -= size
        if self._slot_free is not None and not self._slot_free.done():
            self._slot_free.set_result(None)

    def _spawn(self, work: Any, size: int = 0) -> None:
        """Run ``work`` as a task; if it is cancelled (the stream ended), ``size`` admitted bytes go back
        (a done-callback: a task cancelled before its first step never runs its own cleanup)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if size:
            task.add_done_callback(lambda done: done.cancelled() and self._admission.release(size))

    async def _parse_then_begin(self, data: bytes) -> None:
        try:
            request = await asyncio.to_thread(self._servicer.parse, data)
        except Exception as exc:
            request = Undecodable("inference.ModelInferRequest", exc)
        self._begin(request, len(data))

    def _begin(self, request: Any, size: int) -> bool:
        """Start answering one request; False when it was not one (the stream is then broken)."""
        servicer = self._servicer
        if isinstance(request, Undecodable):
            self.broken.append(InvalidRequest(request.reason))
            self._in_flight -= 1
            self.done_reading = True
            self.wake()
            return False
        if servicer.draining:
            servicer.stats.failed(Unavailable.reason)
            self._emit(request, Unavailable(SHUTTING_DOWN), 0)
            return True
        if not self._admission.admit(size):
            servicer.stats.failed(Overloaded.reason)
            self._emit(request, self._admission.refusal(), 0)
            return True
        self._pending_bytes += size
        try:
            model = self._inference.model_for(request)
            if model.caches or codec.heavy(request, size):
                self._spawn(self._answer_async(request, size), size)
                return True
            started = model.start(self._inference.decode(model, request, _stream_deadline(request)))
        except Exception as exc:
            self._emit(request, exc, size)
            return True
        self._started.add(started.future)
        started.future.add_done_callback(lambda future: self._finish(request, model, started, size))
        return True

    def _finish(self, request: Any, model: ModelVersion, started: Any, size: int) -> None:
        self._started.discard(started.future)
        try:
            answer = codec.encode_response(model.finish(started)).SerializeToString()
            self._emit(request, answer, size, model)
        except asyncio.CancelledError:  # the stream ended: nobody to answer
            self._admission.release(size)
            self._release_slot(size)
            self.wake()
        except Exception as exc:
            self._emit(request, exc, size)

    async def _answer_async(self, request: Any, size: int) -> None:
        """(If the stream ends meanwhile the task is cancelled: ``_spawn`` gives its bytes back.)"""
        try:
            answer = await self._inference.infer(request, _stream_deadline(request), size)
            self._emit(request, answer if isinstance(answer, bytes) else answer.SerializeToString(), size)
        except Exception as exc:
            self._emit(request, exc, size)

    def _emit(self, request: Any, answer: bytes | Exception, size: int, model: ModelVersion | None = None) -> None:
        """Queue one answer (a serialized response, or the error to report); the request's bytes are
        released from the server's budget and the answer's counted against this stream's."""
        if isinstance(answer, bytes):
            result = stream_ok(answer)  # wrapping bytes is cheaper than copying the message
            if len(result) > self._inference.max_response_bytes:
                answer = self._inference.too_large(model, len(result))
        if isinstance(answer, RapidServeError):
            result = _stream_error(request, status_of(answer), message_of(answer))
        elif isinstance(answer, Exception):
            result = _stream_error(request, grpc.StatusCode.INTERNAL, unexpected("ModelStreamInfer", answer))
        if size:
            self._admission.release(size)
        self._pending_bytes += len(result) - size
        self._ready.append(result)
        self.wake()


def _stream_deadline(request: Any) -> float | None:
    """A stream request's ``timeout`` parameter (microseconds), as a deadline."""
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
