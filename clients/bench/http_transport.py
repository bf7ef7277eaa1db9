"""How ``rapidserve bench --protocol http`` sends a serialized request: a whole HTTP/1.1 request (head,
JSON header and binary tensor data, built once by ``payloads``) written on a keep-alive connection that
has nothing in flight, as perf_analyzer's HTTP clients do. ``send`` returns the call's status as the
gRPC transports name it ("OK", or the gRPC code an HTTP error status means); answers are not decoded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from rapidserve.clients._http1 import Http1Connection
from rapidserve.clients.types import code_of_http_status

__all__ = ["HttpUnary"]


class HttpUnary:
    """Requests over a pool of connections: an idle one is taken, or a new one opened when all are busy
    (an open loop can have more in flight than it began with). A connection the server closed is dropped;
    one whose request ran past ``timeout_s`` is closed, since its answer may still come."""

    def __init__(self, connect: Callable[[], Awaitable[Http1Connection]], timeout_s: float | None) -> None:
        self._connect = connect
        self._timeout = timeout_s
        self._idle: list[Http1Connection] = []
        self._all: list[Http1Connection] = []

    @classmethod
    async def open(
        cls, connect: Callable[[], Awaitable[Http1Connection]], count: int, timeout_s: float | None
    ) -> HttpUnary:
        self = cls(connect, timeout_s)
        for _ in range(count):
            self._idle.append(await self._new())
        return self

    async def _new(self) -> Http1Connection:
        connection = await self._connect()
        self._all = [c for c in self._all if not c.closed]
        self._all.append(connection)
        return connection

    async def send(self, payload: bytes, index: int) -> str:
        try:
            connection = self._idle.pop() if self._idle else await self._new()
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0)  # a closed loop must not spin without yielding
            return "UNAVAILABLE"
        try:
            if self._timeout is None:
                status, _ = await connection.send(payload)
            else:
                status, _ = await asyncio.wait_for(connection.send(payload), self._timeout)
        except asyncio.TimeoutError:
            connection.close()
            return "DEADLINE_EXCEEDED"
        except (ConnectionError, OSError):
            return "UNAVAILABLE"
        if not connection.closed:
            self._idle.append(connection)
        return "OK" if status == 200 else code_of_http_status(status).name

    async def close(self) -> None:
        """Close every connection, and wait (not for long) until the sockets are closed."""
        for connection in self._all:
            connection.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in self._all)), 5)
