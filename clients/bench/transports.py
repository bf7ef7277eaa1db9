"""How ``rapidserve bench`` sends a serialized request: unary calls spread over connections (reconnecting
after the server closes one), or ModelStreamInfer streams with answers matched by request id. Each
``send`` returns the call's status name ("OK" or a gRPC code name); answers are not decoded. With several
servers, ``RoundRobin`` gives each its own transport and sends request i to server i mod n.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc

from rapidserve import protos
from rapidserve.clients._h2grpc import Connection, Reply

__all__ = ["RoundRobin", "Streams", "Transport", "Unary", "close_all"]

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class Transport(Protocol):
    async def send(self, payload: bytes, index: int) -> str: ...

    async def close(self) -> None: ...


class RoundRobin:
    """Request i to server i mod n, each server over its own transport (its own connections or streams),
    so that every server gets the same share of the load, request by request. A server's transport sees
    its requests numbered 0, 1, 2, ... as if it were the only one."""

    def __init__(self, transports: Sequence[Transport]) -> None:
        self._transports = list(transports)

    async def send(self, payload: bytes, index: int) -> str:
        count = len(self._transports)
        return await self._transports[index % count].send(payload, index // count)

    async def close(self) -> None:
        for transport in self._transports:
            await transport.close()


class Unary:
    """ModelInfer calls, request i on connection i mod n. When the server closes a connection (a
    restart, a max connection age), the next call there opens a new one, as a gRPC channel would (at
    most one attempt per 100 ms)."""

    def __init__(
        self, connections: list[Connection], connect: Callable[[], Awaitable[Connection]], timeout_s: float | None
    ) -> None:
        self._connections = list(connections)
        self._connect = connect  # opens a new connection to the same server, as the first ones were
        self._path = protos.method_path("ModelInfer")
        self._timeout = timeout_s
        self._reconnecting: asyncio.Lock | None = None
        self._last_attempt = 0.0
        self._retired: list[Connection] = []  # replaced ones: the server may still be finishing calls there

    async def send(self, payload: bytes, index: int) -> str:
        slot = index % len(self._connections)
        connection = self._connections[slot]
        if connection.closed:
            connection = await self._reconnect(slot)
        return (await connection.unary(self._path, payload, self._timeout)).code.name

    async def _reconnect(self, slot: int) -> Connection:
        self._reconnecting = self._reconnecting or asyncio.Lock()
        async with self._reconnecting:
            if self._connections[slot].closed:  # (else another caller reconnected it meanwhile)
                await asyncio.sleep(max(self._last_attempt + 0.1 - time.monotonic(), 0))
                self._last_attempt = time.monotonic()
                with contextlib.suppress(OSError, asyncio.TimeoutError):  # else: UNAVAILABLE on the old one
                    fresh = await asyncio.wait_for(self._connect(), 5)
                    self._retired.append(self._connections[slot])
                    self._connections[slot] = fresh
            return self._connections[slot]

    async def close(self) -> None:
        await close_all((*self._retired, *self._connections))


class Streams:
    """Requests over ``count`` ModelStreamInfer streams (request i on stream i mod count): a stream
    carries one write at a time, so one stream alone cannot keep a busy server fed."""

    def __init__(self, streams: list[_OneStream]) -> None:
        self._streams = streams

    @classmethod
    async def open(cls, connections: list[Connection], count: int = 1) -> Streams:
        """``count`` streams, stream k on connection k mod n (at most each one's MAX_CONCURRENT_STREAMS:
        streams never end, so more would wait forever)."""
        count = min(max(count, 1), sum(c.max_streams for c in connections))
        spread = [c for _, c in zip(range(count), itertools.cycle(connections))]
        return cls([await _OneStream.open(c) for c in spread])

    async def send(self, payload: bytes, index: int) -> str:
        return await self._streams[index % len(self._streams)].send(payload, index)

    async def close(self) -> None:
        for stream in self._streams:
            stream.close()


class _OneStream:
    """One ModelStreamInfer stream, answers matched by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._parse = protos.ModelStreamInferResponse.FromString
        self._broken = ""  # the stream's final status once it ended: later sends fail with it at once

    @classmethod
    async def open(cls, connection: Connection) -> _OneStream:
        self = cls()
        self._stream = await connection.stream(protos.method_path("ModelStreamInfer"), self._on_message)
        self._stream.status.add_done_callback(self._ended)
        return self

    def _on_message(self, data: bytes) -> None:
        response = self._parse(data)
        future = self._waiting.pop(response.infer_response.id, None)
        if future is None and response.error_message and self._waiting:
            # an error the server could not tie to a request (no id): charge it to the oldest one
            future = self._waiting.pop(next(iter(self._waiting)))
        if future is None or future.done():
            return
        if response.error_message:
            params = response.infer_response.parameters
            code = params["grpc_code"].int64_param if "grpc_code" in params else -1
            future.set_result(_CODE_NAMES.get(code, "UNKNOWN"))
        else:
            future.set_result("OK")

    def _ended(self, status: asyncio.Future[Reply]) -> None:
        code = grpc.StatusCode.CANCELLED if status.cancelled() else status.result().code
        self._broken = "UNAVAILABLE" if code == grpc.StatusCode.OK else code.name  # unanswered requests
        for future in self._waiting.values():
            if not future.done():
                future.set_result(self._broken)
        self._waiting.clear()

    async def send(self, payload: bytes, index: int) -> str:
        if self._broken:
            await asyncio.sleep(0)  # a closed loop must not spin without yielding
            return self._broken
        request_id = str(index)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        encoded = request_id.encode()
        self._stream.write(payload + b"\x1a" + protos.varint(len(encoded)) + encoded)  # id: the last one wins
        return await future

    def close(self) -> None:
        self._stream.cancel()


async def close_all(connections: Sequence[Connection]) -> None:
    """Close, and wait (not for long) until the sockets are closed."""
    for connection in connections:
        connection.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in connections)), 5)
