"""How ``rapidserve bench --protocol http`` sends a serialized request: a whole HTTP/1.1 request (head,
JSON header and binary tensor data, built once by ``payloads``) written on a keep-alive connection that
has nothing in flight, as perf_analyzer's HTTP clients do. ``send`` returns the call's status as the
gRPC transports name it ("OK", or the gRPC code an HTTP error status means); answers are not decoded."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

from rapidserve.clients._http1 import Http1Connection
from rapidserve.clients.types import code_of_http_status

__all__ = ["MAX_CONNECTIONS", "HttpUnary"]

MAX_CONNECTIONS = 512  # per worker: an open loop past this many in flight waits (each is a file descriptor)


class HttpUnary:
    """Requests over a pool of connections: an idle one is taken, or a new one opened when all are busy
    (an open loop can have more in flight than it began with), up to ``max_connections``; past that a
    request waits for one to come free. A connection the server closed is dropped; one whose request ran
    past ``timeout_s`` is closed, since its answer may still come."""

    def __init__(
        self, connect: Callable[[], Awaitable[Http1Connection]], timeout_s: float | None, max_connections: int
    ) -> None:
        self._connect = connect
        self._timeout = timeout_s
        self._limit = max_connections
        self._idle: list[Http1Connection] = []
        self._waiting: deque[asyncio.Future[Http1Connection | None]] = deque()
        self._count = 0  # connections open or opening
        self._all: list[Http1Connection] = []

    @classmethod
    async def open(
        cls,
        connect: Callable[[], Awaitable[Http1Connection]],
        count: int,
        timeout_s: float | None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> HttpUnary:
        self = cls(connect, timeout_s, max(max_connections, count))
        for _ in range(count):
            self._idle.append(await self._new())
        return self

    async def _new(self) -> Http1Connection:
        self._count += 1
        try:
            connection = await self._connect()
        except BaseException:
            self._count -= 1
            raise
        self._all = [c for c in self._all if not c.closed]
        self._all.append(connection)
        return connection

    async def _acquire(self) -> Http1Connection:
        while True:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection
                self._count -= 1  # the server closed it while idle
            if self._count < self._limit:
                return await self._new()
            waiter: asyncio.Future[Http1Connection | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            connection = await waiter
            if connection is not None:
                return connection

    def _release(self, connection: Http1Connection) -> None:
        if connection.closed:
            self._count -= 1
            free: Http1Connection | None = None  # a waiting request may open one in its place
        else:
            free = connection
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(free)
                return
        if free is not None:
            self._idle.append(free)

    async def send(self, payload: bytes, index: int) -> str:
        try:
            connection = await self._acquire()
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
            connection.close()
            return "UNAVAILABLE"
        except BaseException:  # cancelled: its answer may still come, so the connection cannot be reused
            connection.close()
            raise
        finally:
            self._release(connection)
        return "OK" if status == 200 else code_of_http_status(status).name

    async def close(self) -> None:
        """Close every connection, and wait (not for long) until the sockets are closed."""
        for connection in self._all:
            connection.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in self._all)), 5)
