"""The asyncio client's ``ModelStreamInfer`` multiplexing: many concurrent ``infer`` calls over one
persistent stream, each answer routed back by request id; and the ``InferenceServerError`` of a gRPC
failure, which the unary calls share."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import grpc

from rapidserve.clients.connection import Tls, hint
from rapidserve.clients.types import InferenceServerError

__all__ = ["Multiplexer", "grpc_error"]


def grpc_error(exc: grpc.RpcError, security: Tls | None = None) -> InferenceServerError:
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        details += hint(details, security)
    return InferenceServerError(exc.code(), details)


class Multiplexer:
    """Many concurrent requests over one bidirectional stream, each answer routed by request id.

    The client's own ids replace the caller's on the wire and are put back on the answer. If the
    stream breaks, every waiting call fails with the stream's status and the next call opens a new one.
    """

    def __init__(
        self, stub: Any, metadata: tuple[tuple[str, str], ...] | None = None, security: Tls | None = None
    ) -> None:
        # gRPC allows one outstanding write per stream: requests queue up and gRPC pulls them
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._call = stub(self._requests(), metadata=metadata)
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._tls = security
        self._reader = asyncio.create_task(self._read())
        self._broken: InferenceServerError | None = None
        self._answered = False

    @property
    def status_lost(self) -> bool:
        """Whether the stream ended before any answer with the status grpc.aio puts in place of the
        server's when a request is written as the server ends the stream (a server that refuses the
        stream at once, e.g. without an access key, races with the first write): the real status is
        unknown, and a unary call would tell it."""
        return (
            not self._answered
            and self._broken is not None
            and self._broken.code == grpc.StatusCode.INTERNAL
            and self._broken.message == "Internal error from Core"
        )

    @property
    def broken(self) -> bool:
        return self._broken is not None

    async def send(self, request: Any, timeout_s: float | None) -> Any:
        if self._broken is not None:
            raise self._broken
        caller_id = request.id
        wire_id = f"rs{next(self._ids)}"
        request.id = wire_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[wire_id] = future
        self._outbox.put_nowait(request)
        try:
            response = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise InferenceServerError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        finally:
            self._waiting.pop(wire_id, None)
            request.id = caller_id  # (a caller may send the request again, unary)
        if response.error_message:
            params = response.infer_response.parameters
            code = params["grpc_code"].int64_param if "grpc_code" in params else None  # Triton sends none
            status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
            raise InferenceServerError(status, response.error_message)
        response.infer_response.id = caller_id
        return response.infer_response

    async def _requests(self) -> Any:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._answered = True
                future = self._waiting.get(response.infer_response.id)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as exc:
            self._broken = grpc_error(exc, self._tls)
        else:
            self._broken = InferenceServerError(grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._broken)

    async def close(self) -> None:
        self._outbox.put_nowait(None)  # ends the request stream
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
