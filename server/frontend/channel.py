"""Control messages between the engine process and one front end, over a private unix socket pair.

A message is a small tuple (no tensor data: tensors travel in shared memory). Messages sent in one event
loop turn go out as one frame, so requests that arrive together cost one write and one read. Both ends
are this server's own processes, connected by a socket pair made before the front end started (no
path in the file system, no listener), so the frames are pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["Channel", "ChannelClosed"]

_LENGTH = struct.Struct("<Q")


class ChannelClosed(ConnectionError):
    """The other process closed its end (it exited or died)."""


class Channel:
    """Framed, batched messages over a connected stream socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._outbox: list[Any] = []
        self._flush_soon = False
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        """Queue a message; everything queued in this loop turn goes out as one frame."""
        if self.closed:
            return
        self._outbox.append(message)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self.closed or not self._outbox:
            return
        messages, self._outbox = self._outbox, []
        data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._writer.write(_LENGTH.pack(len(data)) + data)
        except (ConnectionError, RuntimeError):
            self.closed = True

    async def drain(self) -> None:
        """Wait until what was sent is handed to the socket (for backpressure and before exiting)."""
        self._flush()
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def receive(self) -> list[Any]:
        """The messages of the next frame."""
        try:
            (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            messages: list[Any] = pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.closed = True
            raise ChannelClosed(str(exc)) from None
        return messages

    async def serve(self, handle: Callable[[Any], None]) -> None:
        """Call ``handle`` for each message until the other side closes; raises ChannelClosed then."""
        while True:
            for message in await self.receive():
                handle(message)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self._writer.close()
