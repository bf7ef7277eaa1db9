"""A lean HTTP/1.1 client connection for ``rapidserve bench --protocol http``: a whole request, serialized
once, in one ``transport.write``; the answer's status and body back, without header objects. Private: the
bench's transport, not an API.

Why: on a 2-core x86_64 VM with uvloop, a small binary-extension request (a 1x64 FP32 input, a 40-byte
output) against a local aiohttp server cost this client 18-21 us of CPU per call and aiohttp's
``ClientSession`` 94-126 us (4,000 calls at 1 and at 8 in flight, alternated); a load tester's own cost
hides the server's at low concurrency.

Scope: keep-alive, one request at a time per connection (no pipelining, as perf_analyzer's HTTP clients
do), answers with Content-Length or chunked bodies, plaintext or TLS; a ``Connection: close`` answer or
a server hang-up closes it (later sends fail at once with ``closed``).
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Iterable

__all__ = ["Http1Connection", "request_head"]

_MAX_HEAD = 64 * 1024  # an answer's status line and headers; more is not an HTTP server we measure


def request_head(method: str, path: str, authority: str, headers: Iterable[tuple[str, str]], length: int) -> bytes:
    """The request line and headers of a request with a ``length``-byte body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Http1Connection(asyncio.Protocol):
    """One connection; ``send`` writes a complete request and returns the answer's (status, body)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._status = 0
        self._length = -1  # the body's bytes still to come; -1: reading the head; -2: chunked
        self._chunks = bytearray()
        self._close_after = False
        self._lost: asyncio.Future[None] | None = None
        self.closed = False

    @classmethod
    async def open(
        cls, host: str, port: int, ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> Http1Connection:
        loop = asyncio.get_running_loop()
        kwargs = {"ssl": ssl, "server_hostname": server_hostname or host} if ssl is not None else {}
        _, connection = await loop.create_connection(cls, host, port, **kwargs)
        connection._lost = loop.create_future()
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("the server closed the connection"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.closed or self._transport is None:
            raise ConnectionResetError("the connection is closed")
        if self._waiter is not None:
            raise RuntimeError("one request at a time per connection")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._waiter is not None and self._step():
                pass
        except ValueError as exc:
            self._fail(ConnectionError(f"malformed HTTP answer: {exc}"))
            self.close()

    def _step(self) -> bool:
        """Parse what the buffer holds; True when there may be more to parse."""
        buffer = self._buffer
        if self._length == -1:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise ValueError("the head is too long")
                return False
            self._head(bytes(buffer[:end]))
            del buffer[: end + 4]
            return True
        if self._length == -2:
            return self._chunk()
        if len(buffer) < self._length:
            return False
        body = bytes(buffer[: self._length])
        del buffer[: self._length]
        self._finish(body)
        return True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.") or len(lines[0]) < 12:
            raise ValueError(f"status line {lines[0][:40]!r}")
        self._status = int(lines[0][9:12])
        self._length = 0
        self._close_after = lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._length = -2
            elif name == b"connection":
                self._close_after = value.strip().lower() == b"close"

    def _chunk(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(buffer[:end]).split(b";")[0], 16)
        if size == 0:  # the last chunk; then (no trailers) an empty line
            if len(buffer) < end + 4:
                return False
            del buffer[: end + 4]
            body, self._chunks = bytes(self._chunks), bytearray()
            self._finish(body)
            return True
        if len(buffer) < end + 2 + size + 2:
            return False
        self._chunks += buffer[end + 2 : end + 2 + size]
        del buffer[: end + 2 + size + 2]
        return True

    def _finish(self, body: bytes) -> None:
        self._length = -1
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body))
        if self._close_after:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        if self._lost is not None:
            await self._lost
