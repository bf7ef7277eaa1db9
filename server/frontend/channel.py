"""Control messages between the engine process and one front end, over a private unix socket pair.

A message is a small tuple (no tensor data: tensors travel in shared memory). Messages sent in one event
loop turn go out as one frame, so requests that arrive together cost one write and one read. Frames
are parsed as they arrive, in the transport's callback, and handed over without a coroutine per frame.
Both ends are this server's own processes, connected by a socket pair made before the front end
started (no path in the file system, no listener), so the frames are pickled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["Channel", "ChannelClosed"]

_LENGTH = struct.Struct("<Q")
log = logging.getLogger(__name__)

LAZY_FLUSH_S = 0.02  # how long a message sent with ``later`` may wait for a frame to ride on


class ChannelClosed(ConnectionError):
    """The other process closed its end (it exited or died)."""


class Channel(asyncio.Protocol):
    """Framed, batched messages over a connected stream socket."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outbox: list[Any] = []
        self._flush_soon = False
        self._lazy: asyncio.TimerHandle | None = None
        self._handle: Callable[[Any], None] | None = None
        self._frames: collections.deque[list[Any]] = collections.deque()  # received before ``serve``
        self._arrived: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        loop = asyncio.get_running_loop()
        channel = cls()
        channel._lost = loop.create_future()
        await loop.create_unix_connection(lambda: channel, sock=sock)
        return channel

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue a message; everything queued in this loop turn goes out as one frame."""
        if self.closed:
            return
        self._outbox.append(message)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def later(self, message: Any) -> None:
        """Queue a message that may wait (up to ``LAZY_FLUSH_S``) to ride with the next frame."""
        if self.closed:
            return
        self._outbox.append(message)
        if not self._flush_soon and self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(LAZY_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if self.closed or not self._outbox or self._transport is None:
            return
        messages, self._outbox = self._outbox, []
        data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.writelines((_LENGTH.pack(len(data)), data))

    async def drain(self) -> None:
        """Hand what was sent to the socket now (before exiting)."""
        self._flush()
        await asyncio.sleep(0)

    # -- receiving ----------------------------------------------------------------------------

    async def receive(self) -> list[Any]:
        """The messages of the next frame (before ``serve`` takes them over)."""
        while not self._frames:
            if self.closed:
                raise ChannelClosed("the other process closed the channel")
            self._arrived = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._arrived, self._lost_future()), return_when=asyncio.FIRST_COMPLETED)
        return self._frames.popleft()

    async def serve(self, handle: Callable[[Any], None]) -> None:
        """Call ``handle`` for each message until the other side closes; raises ChannelClosed then."""
        while self._frames:
            for message in self._frames.popleft():
                handle(message)
        self._handle = handle
        await self._lost_future()
        raise ChannelClosed("the other process closed the channel")

    def _lost_future(self) -> asyncio.Future[None]:
        assert self._lost is not None
        return self._lost

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        while size - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if end > size:
                break
            with memoryview(buffer) as view, view[start + _LENGTH.size : end] as frame:
                messages = pickle.loads(frame)
            start = end
            if self._handle is not None:
                for message in messages:
                    try:
                        self._handle(message)
                    except Exception:  # a bug in one message's handling must not stop the others'
                        log.exception("control message %r failed", message[0] if message else message)
            else:
                self._frames.append(messages)
                if self._arrived is not None and not self._arrived.done():
                    self._arrived.set_result(None)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
