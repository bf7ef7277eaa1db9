"""A lean gRPC client over HTTP/2 for ``rapidserve bench``: serialized messages in, bytes out. Private:
the bench's transport, not an API.

Why it exists: on a 2-core x86_64 VM grpcio's Python client spends 260-580 us of CPU on every unary
call (its blocking and asyncio calls), as much as a small model's whole server-side time, so a load
tester built on it reports its own overhead at low concurrency; this one spends 110-175 us
(``benchmarks/client_overhead.py``; benchmarks/RESULTS.md, "one request in flight"). Here a call is a
header block encoded once per method plus the message, written in one ``transport.write``; an answer
is parsed from the frames without creating protobuf or grpc objects.

Scope: HTTP/2 with prior knowledge in plaintext (h2c, what ``grpc.insecure_channel`` speaks) or over TLS
with ALPN ``h2`` (mutual TLS too: see ``ssl_context``), unary and bidirectional-streaming calls, identity
message encoding, extra request headers fixed per connection. The framing follows RFC 9113 (flow control
both ways, CONTINUATION, padding, SETTINGS, PING, RST_STREAM, GOAWAY); HPACK comes from the ``hpack``
package, whose decoder's internal table (``header_table.dynamic_entries``, hpack 4) the header-block
cache reads: ``check_hpack`` refuses an hpack without it. Request header blocks use never-indexed
literals only, so they never touch the server's decoding table and can be reused verbatim on every
call; TLS and extra headers change what a block holds, not what a call costs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import ssl as _ssl
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple
from urllib.parse import unquote

import grpc
import hpack

from rapidserve.clients.connection import check_headers, ssl_context

__all__ = ["Connection", "Reply", "Stream", "check_hpack", "ssl_context"]

# frame types, flags, settings and error codes of RFC 9113
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
NO_ERROR, PROTOCOL_ERROR, CANCEL = 0x0, 0x1, 0x8
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW, DEFAULT_FRAME = 65_535, 16_384
RECEIVE_WINDOW = 1 << 30  # what we let the server send before we acknowledge; replenished at half
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: the 9-byte frame header
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# gRPC's mapping of an HTTP status that arrives without grpc-status, and of RST_STREAM error codes
_HTTP_CODES = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
               403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
               429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
               503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}  # fmt: skip
_RESET_CODES = {0x7: grpc.StatusCode.UNAVAILABLE, 0x8: grpc.StatusCode.CANCELLED,
                0xB: grpc.StatusCode.RESOURCE_EXHAUSTED, 0xC: grpc.StatusCode.PERMISSION_DENIED}  # fmt: skip


def check_hpack(decoder: hpack.Decoder | None = None) -> None:
    """Raise ``ImportError`` when hpack's decoder lacks the internal table ``Connection._decode`` reads
    (hpack 4 has it; hpack is not pinned by everything that installs it)."""
    table = (decoder or hpack.Decoder()).header_table
    if not hasattr(table, "dynamic_entries"):
        try:
            version = importlib.metadata.version("hpack")
        except importlib.metadata.PackageNotFoundError:
            version = getattr(hpack, "__version__", "(unknown version)")
        raise ImportError(
            f"hpack {version} lacks the internal table rapidserve's bench client relies on; install hpack>=4,<5"
        )


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return _HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


class Reply(NamedTuple):
    """How a call ended: its status, the server's message, and (unary calls) the answer's bytes."""

    code: grpc.StatusCode
    message: str = ""
    response: bytes | None = None


class _Call:
    """One HTTP/2 stream carrying one gRPC call."""

    __slots__ = (
        "buffer",
        "consumed",
        "done",
        "end_after_outbox",
        "headers",
        "id",
        "on_message",
        "outbox",
        "response",
        "send_window",
        "sent_end",
        "timer",
    )  # fmt: skip

    def __init__(self, stream_id: int, done: asyncio.Future[Reply], send_window: int,
                 on_message: Callable[[bytes], None] | None) -> None:  # fmt: skip
        self.id = stream_id
        self.on_message = on_message  # None: a unary call keeps its one answer in ``response``
        self.done = done
        self.buffer = bytearray()  # received bytes of an incomplete message
        self.response: bytes | None = None
        self.headers: dict[bytes, bytes] | None = None  # the response's initial headers, once read
        self.send_window = send_window
        self.outbox: deque[memoryview] = deque()  # message bytes waiting for flow-control window
        self.end_after_outbox = False
        self.sent_end = False  # END_STREAM written: this side is half-closed
        self.consumed = 0  # bytes received since this stream's window was last replenished
        self.timer: asyncio.TimerHandle | None = None


class Stream:
    """A bidirectional-streaming call: ``write`` messages, answers go to ``on_message``; ``status``
    resolves when the server ends the call."""

    def __init__(self, connection: Connection, call: _Call) -> None:
        self._connection, self._call = connection, call
        # shielded: cancelling an await of ``status`` must not end the call without telling the server
        self.status: asyncio.Future[Reply] = asyncio.shield(call.done)

    def write(self, message: bytes) -> None:
        """Queue one message (sent now, or as soon as flow control allows); ignored after ``end``."""
        self._connection._send(self._call, message, end=False)

    def end(self) -> None:
        """Half-close: no more messages from this side."""
        self._connection._send(self._call, b"", end=True, framed=False)

    def cancel(self) -> None:
        self._connection._reset(self._call, grpc.StatusCode.CANCELLED, "cancelled by the client")


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server; calls are multiplexed on it as streams.

    Open with ``await Connection.open("host:port")``. Every failure ends a call with a status (never an
    exception): the connection closing or going away ends pending calls UNAVAILABLE, as grpcio does.
    """

    def __init__(self, authority: str, tls: bool = False, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._authority = authority
        self._tls = tls
        self._extra_headers = tuple(headers)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = self._loop.create_future()  # the server's first SETTINGS
        self._lost: asyncio.Future[None] = self._loop.create_future()  # the transport closed
        self._calls: dict[int, _Call] = {}
        self._next_id = 1
        self._blocks: dict[tuple[str, float | None], bytes] = {}  # encoded request header blocks
        self._decoder = hpack.Decoder(max_header_list_size=1 << 24)  # room for large trailers (status details)
        check_hpack(self._decoder)
        self._table = self._decoder.header_table.dynamic_entries  # newest entry first
        self._decoded: dict[bytes, tuple[object, int, int, dict[bytes, bytes]]] = {}  # see _decode
        self._rx = bytearray()  # the start of a frame that has not fully arrived
        self._need = 0  # how many bytes that frame needs
        self._headers_in_progress: tuple[int, int, bytearray] | None = None  # (stream, flags, fragments)
        # what the server allows us to send, and what we allow it
        self._send_window = DEFAULT_WINDOW
        self._stream_window = DEFAULT_WINDOW
        self._max_frame = DEFAULT_FRAME
        self._max_streams = MAX_WINDOW
        self._blocked: dict[int, _Call] = {}  # calls with bytes waiting for window, in arrival order
        self._consumed = 0
        self._slots: deque[asyncio.Future[None]] = deque()  # calls waiting for MAX_CONCURRENT_STREAMS
        self._closed: Reply | None = None  # set once no new call may start, with the reason

    # ---- opening and closing

    @classmethod
    async def open(
        cls,
        url: str,
        timeout_s: float = 30.0,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> Connection:
        """Connect to ``host:port`` (``[v6addr]:port`` too) and wait for the server's SETTINGS.

        ``ssl`` (see ``ssl_context``) makes it TLS; the server must then select ALPN ``h2``.
        ``server_hostname`` is the name its certificate must carry when that is not ``host``.
        ``headers`` go with every call (names lower-case; checked here). A failure to connect raises
        ``OSError`` (``ConnectionError``, ``ssl.SSLError``, ``TimeoutError``) saying why."""
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {url!r}")
        if server_hostname is not None and ssl is None:
            raise ValueError("server_hostname applies to TLS only: pass ssl too")
        loop = asyncio.get_running_loop()
        connection = cls(url, ssl is not None, check_headers(headers))
        tls = {"ssl": ssl, "server_hostname": server_hostname} if ssl is not None else {}
        await asyncio.wait_for(
            loop.create_connection(lambda: connection, host.strip("[]"), int(port), **tls), timeout_s
        )
        try:
            await asyncio.wait_for(asyncio.shield(connection._ready), timeout_s)
        except BaseException:
            connection._ready.cancel()  # nobody will wait for it any more
            connection.close()
            raise
        return connection

    @property
    def closed(self) -> bool:
        """True once no new call can start here (closed, lost, or the server is going away)."""
        return self._closed is not None

    @property
    def max_streams(self) -> int:
        """The server's limit on calls in flight at once (MAX_CONCURRENT_STREAMS)."""
        return self._max_streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tls and (alpn := transport.get_extra_info("ssl_object").selected_alpn_protocol()) != "h2":
            self._ready.set_exception(ConnectionError(
                f"{self._authority} did not select HTTP/2 in the TLS handshake (ALPN {alpn or 'none'}, "
                "expected h2): not a gRPC server?"))  # fmt: skip
            transport.abort()  # type: ignore[attr-defined]
            return
        self._transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport subclass)
        settings = struct.pack(">HIHIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW,
                               SETTINGS_MAX_FRAME_SIZE, (1 << 24) - 1)  # fmt: skip
        transport.write(PREFACE + frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW)))  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._lost.done():
            self._lost.set_result(None)
        reason = f"connection to {self._authority} lost" + (f": {exc}" if exc else "")
        self._shut(Reply(grpc.StatusCode.UNAVAILABLE, reason))
        if not self._ready.done():
            hint = ""
            if exc is None:  # the server hung up: a TLS mismatch shows up so
                hint = " (a client certificate missing or refused?)" if self._tls else " (does the server expect TLS?)"
            self._ready.set_exception(ConnectionError(f"{reason} before the HTTP/2 handshake finished{hint}"))

    def close(self) -> None:
        """End every call CANCELLED and close the connection."""
        self._shut(Reply(grpc.StatusCode.CANCELLED, "the connection was closed by the client"))
        if self._transport is not None:
            self._transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, NO_ERROR)))
            self._transport.close()
            if self._tls:  # our close_notify is out; waiting for the server's (gRPC servers send none) takes 30 s
                self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed, after ``close`` (which only starts closing it)."""
        if self._transport is not None:
            await asyncio.shield(self._lost)

    def _shut(self, reply: Reply) -> None:
        self._refuse_new_calls(reply)
        for call in list(self._calls.values()):
            self._finish(call, reply)

    def _refuse_new_calls(self, reply: Reply) -> None:
        self._closed = self._closed or reply
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Let calls waiting for a stream slot go on: as many as there are free slots, or all of them
        once no new call may start (they then end with the reason)."""
        free = MAX_WINDOW if self._closed is not None else self._max_streams - len(self._calls)
        while self._slots and free > 0:
            waiter = self._slots.popleft()
            if not waiter.done():  # (a waiter whose call was cancelled passes the slot on)
                waiter.set_result(None)
                free -= 1

    # ---- starting calls

    async def unary(self, method: str, message: bytes, timeout_s: float | None = None) -> Reply:
        """One unary call; the Reply carries the answer's bytes when the status is OK."""
        started = await self._start(method, timeout_s, None)
        if started is None:
            assert self._closed is not None
            await asyncio.sleep(0)  # a caller looping on a closed connection must still let others run
            return self._closed
        call, head = started
        self._send(call, message, end=True, head=head)  # headers and message in one write
        try:
            return await call.done
        except asyncio.CancelledError:
            self._reset(call, grpc.StatusCode.CANCELLED, "cancelled by the client")
            raise

    async def stream(self, method: str, on_message: Callable[[bytes], None], timeout_s: float | None = None) -> Stream:
        """Start a bidirectional-streaming call."""
        started = await self._start(method, timeout_s, on_message)
        if started is None:
            assert self._closed is not None
            done: asyncio.Future[Reply] = self._loop.create_future()
            done.set_result(self._closed)
            return Stream(self, _Call(0, done, 0, on_message))
        call, head = started
        assert self._transport is not None
        self._transport.write(head)
        return Stream(self, call)

    async def _start(
        self, method: str, timeout_s: float | None, on_message: Callable[[bytes], None] | None
    ) -> tuple[_Call, bytes] | None:
        """A new call and its HEADERS frame (for the caller to write), or None if no call may start."""
        begun = self._loop.time()
        waited = False
        while len(self._calls) >= self._max_streams and self._closed is None:
            waited = True
            waiter = self._loop.create_future()
            self._slots.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken, then cancelled: pass the slot on
                    self._wake_waiters()
                raise
        if self._closed is not None or self._transport is None:
            return None
        if self._next_id > MAX_WINDOW:
            self._refuse_new_calls(Reply(grpc.StatusCode.UNAVAILABLE, "this connection used up its stream ids"))
            return None
        call = _Call(self._next_id, self._loop.create_future(), self._stream_window, on_message)
        self._next_id += 2
        self._calls[call.id] = call
        if timeout_s is None or not waited:
            block = self._blocks.get((method, timeout_s)) or self._header_block(method, timeout_s)
        else:  # the deadline counts from the call, so a wait for a slot uses some of it up
            timeout_s = max(timeout_s - (self._loop.time() - begun), 1e-6)
            block = self._header_block(method, timeout_s, remember=False)
        if timeout_s is not None:
            call.timer = self._loop.call_later(timeout_s, self._reset, call, grpc.StatusCode.DEADLINE_EXCEEDED,
                                               "deadline exceeded")  # fmt: skip
        return call, frame(HEADERS, END_HEADERS, call.id, block)

    def _header_block(self, method: str, timeout_s: float | None, remember: bool = True) -> bytes:
        headers = [(":method", "POST"), (":scheme", "https" if self._tls else "http"), (":path", method),
                   (":authority", self._authority), ("content-type", "application/grpc"), ("te", "trailers"),
                   ("user-agent", "rapidserve-bench"), *self._extra_headers]  # fmt: skip
        if timeout_s is not None:
            headers.append(("grpc-timeout", grpc_timeout(timeout_s)))
        block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])
        if remember:
            self._blocks[(method, timeout_s)] = block
        return block

    # ---- sending

    def _send(self, call: _Call, message: bytes, end: bool, framed: bool = True, head: bytes = b"") -> None:
        """Send one message (gRPC's 5-byte prefix added) within the flow-control windows; queue the rest.
        ``head``, the call's HEADERS frame, goes first, in the same write when the message fits."""
        if self._transport is None or call.done.done() or call.sent_end or call.end_after_outbox:
            return
        data = b"\0" + len(message).to_bytes(4, "big") + message if framed else message
        size = len(data)
        if (not call.outbox and size <= self._max_frame and size <= self._send_window
                and size <= call.send_window):  # fmt: skip
            self._send_window -= size
            call.send_window -= size
            self._transport.write(head + frame(DATA, END_STREAM if end else 0, call.id, data))
            call.sent_end = end
            return
        if head:
            self._transport.write(head)
        if data:
            call.outbox.append(memoryview(data))
        call.end_after_outbox = end
        self._blocked[call.id] = call
        self._flush(call)

    def _flush(self, call: _Call) -> None:
        assert self._transport is not None
        while call.outbox:
            chunk = call.outbox[0]
            size = min(len(chunk), self._max_frame, self._send_window, call.send_window)
            if size <= 0:
                return  # wait for WINDOW_UPDATE
            last = size == len(chunk) and len(call.outbox) == 1 and call.end_after_outbox
            self._transport.write(frame(DATA, END_STREAM if last else 0, call.id, bytes(chunk[:size])))
            self._send_window -= size
            call.send_window -= size
            if size == len(chunk):
                call.outbox.popleft()
            else:
                call.outbox[0] = chunk[size:]
            if last:
                call.sent_end = True
                break
        else:
            if call.end_after_outbox:  # nothing left but the half-close
                self._transport.write(frame(DATA, END_STREAM, call.id))
                call.sent_end = True
        self._blocked.pop(call.id, None)

    def _flush_blocked(self) -> None:
        for call in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self._flush(call)

    def _reset(self, call: _Call, code: grpc.StatusCode, message: str) -> None:
        """End a call from this side (a deadline, a cancel): RST_STREAM tells the server to stop."""
        if call.id not in self._calls:  # ended already (``done`` alone may be cancelled with its awaiter)
            return
        if self._transport is not None:
            self._transport.write(frame(RST_STREAM, 0, call.id, struct.pack(">I", CANCEL)))
        self._finish(call, Reply(code, message))

    def _finish(self, call: _Call, reply: Reply) -> None:
        self._calls.pop(call.id, None)
        self._blocked.pop(call.id, None)
        if call.timer is not None:
            call.timer.cancel()
        if not call.done.done():
            call.done.set_result(reply)
        if self._slots:
            self._wake_waiters()

    # ---- receiving

    def data_received(self, data: bytes) -> None:
        if self._rx:
            self._rx += data
            if len(self._rx) < self._need:
                return  # a large frame still arriving: parse it once, when whole
            data = bytes(self._rx)
            self._rx.clear()
        pos, end = 0, len(data)
        try:
            while end - pos >= 9:
                length_kind, flags, stream_id = _HEAD.unpack_from(data, pos)
                length = length_kind >> 8
                if end - pos - 9 < length:
                    break
                payload = data[pos + 9 : pos + 9 + length]
                pos += 9 + length
                self._on_frame(length_kind & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        except _ProtocolError as exc:
            self._abort(str(exc))
            return
        if pos < end:
            self._rx += memoryview(data)[pos:]
            self._need = 9 + (_HEAD.unpack_from(data, pos)[0] >> 8) if end - pos >= 9 else 9

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._headers_in_progress is not None and kind != CONTINUATION:
            raise _ProtocolError(f"frame type {kind} in the middle of a header block")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            payload = _unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:
                    raise _ProtocolError("a HEADERS frame too short for its priority fields")
                payload = payload[5:]
            if flags & END_HEADERS:
                self._on_headers(stream_id, flags, payload)
            else:
                self._headers_in_progress = (stream_id, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._headers_in_progress is None or self._headers_in_progress[0] != stream_id:
                raise _ProtocolError("CONTINUATION without a header block to continue")
            self._headers_in_progress[2].extend(payload)
            if flags & END_HEADERS:
                sid, first_flags, block = self._headers_in_progress
                self._headers_in_progress = None
                self._on_headers(sid, first_flags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == WINDOW_UPDATE:
            _expect_length(kind, payload, 4)
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            _expect_length(kind, payload, 8)
            if not flags & ACK and self._transport is not None:
                self._transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            _expect_length(kind, payload, 4)
            if (call := self._calls.get(stream_id)) is not None:
                (code,) = struct.unpack(">I", payload[:4])
                status = _RESET_CODES.get(code, grpc.StatusCode.INTERNAL)
                self._finish(call, Reply(status, f"the server reset the stream (HTTP/2 error code {code:#x})"))
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise _ProtocolError(f"a GOAWAY frame of {len(payload)} bytes")
            self._on_goaway(payload)
        elif kind == PUSH_PROMISE:
            raise _ProtocolError("PUSH_PROMISE although push was disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._consumed += len(payload)
        if self._consumed >= RECEIVE_WINDOW // 2 and self._transport is not None:
            self._transport.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._consumed)))
            self._consumed = 0
        call = self._calls.get(stream_id)
        if call is None:
            return  # a call we already ended (deadline, cancel): its bytes still count for the connection
        call.consumed += len(payload)
        if call.consumed >= RECEIVE_WINDOW // 2 and not flags & END_STREAM and self._transport is not None:
            self._transport.write(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", call.consumed)))
            call.consumed = 0
        data = _unpad(flags, payload)
        if call.headers is None:
            self._reset(call, grpc.StatusCode.INTERNAL, "the server sent data before its response headers")
            return
        if call.buffer or len(data) < 5 or len(data) != 5 + int.from_bytes(data[1:5], "big") or data[0]:
            call.buffer += data
            self._split_messages(call)
        else:
            self._deliver(call, data[5:])  # the common case: one whole uncompressed message in one frame
        if flags & END_STREAM and call.id in self._calls:
            self._ended_by_server(
                call, Reply(grpc.StatusCode.INTERNAL, "the server ended the call without a grpc-status")
            )

    def _deliver(self, call: _Call, message: bytes) -> None:
        if call.on_message is None:
            call.response = message
            return
        try:
            call.on_message(message)
        except Exception as exc:  # the caller's handler failed: that ends this call, not the connection
            self._reset(call, grpc.StatusCode.INTERNAL, f"handling an answer failed: {type(exc).__name__}: {exc}")

    def _split_messages(self, call: _Call) -> None:
        buffer = call.buffer
        while len(buffer) >= 5 and call.id in self._calls:
            size = int.from_bytes(buffer[1:5], "big")
            if len(buffer) < 5 + size:
                return
            if buffer[0]:
                reason = "the server sent a compressed message, which this client never asks for"
                self._reset(call, grpc.StatusCode.INTERNAL, reason)
                return
            message = bytes(memoryview(buffer)[5 : 5 + size])
            del buffer[: 5 + size]
            self._deliver(call, message)

    def _on_headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # every block, even a dropped call's: it keeps the HPACK table in step
        call = self._calls.get(stream_id)
        if call is None:
            return
        if call.headers is None and not flags & END_STREAM:  # the initial headers; the status comes last
            http = headers.get(b":status", b"")
            if http != b"200" or not headers.get(b"content-type", b"").startswith(b"application/grpc"):
                code = (
                    _HTTP_CODES.get(int(http), grpc.StatusCode.UNKNOWN) if http.isdigit() else grpc.StatusCode.INTERNAL
                )
                kind = headers.get(b"content-type", b"no content type").decode(errors="replace")
                self._reset(call, code, f"the server answered HTTP {http.decode(errors='replace')} ({kind}), not gRPC")
                return
            call.headers = headers
            return
        initial = call.headers if call.headers is not None else headers  # trailers-only: one block has both
        status = headers.get(b"grpc-status")
        if status is not None and status.isdigit():
            code = _CODES.get(int(status), grpc.StatusCode.UNKNOWN)
            message = unquote(headers.get(b"grpc-message", b"").decode("utf-8", "replace"))
        else:
            http = initial.get(b":status", b"")
            code = _HTTP_CODES.get(int(http), grpc.StatusCode.UNKNOWN) if http.isdigit() else grpc.StatusCode.INTERNAL
            message = f"the server answered HTTP {http.decode(errors='replace') or '(no status)'} without a grpc-status"
        if call.buffer and code == grpc.StatusCode.OK:
            code, message = grpc.StatusCode.INTERNAL, "the stream ended inside a message"
        elif code == grpc.StatusCode.OK and call.on_message is None and call.response is None:
            code, message = grpc.StatusCode.INTERNAL, "the server ended a unary call without an answer"
        self._ended_by_server(call, Reply(code, message, call.response if code == grpc.StatusCode.OK else None))

    def _ended_by_server(self, call: _Call, reply: Reply) -> None:
        if not call.sent_end and self._transport is not None:  # we were still sending: close our half too
            self._transport.write(frame(RST_STREAM, 0, call.id, struct.pack(">I", NO_ERROR)))
        self._finish(call, reply)

    def _decode(self, block: bytes) -> dict[bytes, bytes]:
        """Decode a header block. A server sends the same few blocks over and over (``:status 200``,
        ``grpc-status 0``); one whose decoding left the dynamic table as it was means the same until
        the table changes, so it is remembered together with the table's state: its newest entry (held,
        so never reused) and its length. That skips hpack's pure-Python decoder on almost every answer."""
        table, limits = self._table, self._decoder.header_table
        state = (table[0] if table else None, len(table), limits.maxsize)
        known = self._decoded.get(block)
        if known is not None and known[0] is state[0] and known[1:3] == state[1:]:
            return known[3]
        try:
            headers = dict(self._decoder.decode(block, raw=True))
        except hpack.HPACKError as exc:
            raise _ProtocolError(f"undecodable header block: {exc}") from exc
        if (table[0] if table else None) is state[0] and (len(table), limits.maxsize) == state[1:]:
            if len(self._decoded) >= 64:
                self._decoded.clear()
            self._decoded[block] = (*state, headers)
        return headers

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ProtocolError("a SETTINGS frame whose length is not a multiple of 6")
        for key, value in struct.iter_unpack(">HI", payload):
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(f"INITIAL_WINDOW_SIZE {value} is over 2^31-1")
                delta, self._stream_window = value - self._stream_window, value
                for call in self._calls.values():
                    call.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value < 1 << 24:
                    raise _ProtocolError(f"MAX_FRAME_SIZE {value} is outside [2^14, 2^24-1]")
                self._max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._max_streams = value
        assert self._transport is not None
        self._transport.write(frame(SETTINGS, ACK, 0))
        if not self._ready.done():
            self._ready.set_result(None)
        if any(c.send_window > MAX_WINDOW for c in self._calls.values()):
            raise _ProtocolError("INITIAL_WINDOW_SIZE pushed a stream's window over 2^31-1")
        self._wake_waiters()
        self._flush_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if increment == 0:
            raise _ProtocolError("a WINDOW_UPDATE of 0")
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ProtocolError("WINDOW_UPDATE pushed the connection's window over 2^31-1")
            self._flush_blocked()
        elif (call := self._calls.get(stream_id)) is not None:
            call.send_window += increment
            if call.send_window > MAX_WINDOW:
                raise _ProtocolError(f"WINDOW_UPDATE pushed stream {stream_id}'s window over 2^31-1")
            if call.id in self._blocked:
                self._flush(call)

    def _on_goaway(self, payload: bytes) -> None:
        last_id, code = struct.unpack(">II", payload[:8])
        last_id &= 0x7FFFFFFF
        detail = payload[8:].decode("utf-8", "replace")
        reason = f"the server is going away (HTTP/2 error code {code:#x}{': ' + detail if detail else ''})"
        self._refuse_new_calls(Reply(grpc.StatusCode.UNAVAILABLE, reason))
        for call in [c for c in self._calls.values() if c.id > last_id]:
            self._finish(call, Reply(grpc.StatusCode.UNAVAILABLE, reason + "; this call was not processed"))

    def _abort(self, reason: str) -> None:
        """The server broke the protocol: end everything INTERNAL and close."""
        if self._transport is not None:
            self._transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, PROTOCOL_ERROR)))
            self._transport.close()
        self._shut(Reply(grpc.StatusCode.INTERNAL, f"HTTP/2 protocol error from the server: {reason}"))


def grpc_timeout(seconds: float) -> str:
    """A deadline as gRPC's ``grpc-timeout`` header: at most 8 digits, in the finest unit that fits."""
    for unit, per_second in (("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = math.ceil(seconds * per_second)
        if value < 10**8:
            return f"{max(value, 1)}{unit}"
    return "99999999H"


class _ProtocolError(Exception):
    pass


def _expect_length(kind: int, payload: bytes, length: int) -> None:
    if len(payload) != length:
        raise _ProtocolError(f"a frame of type {kind} with {len(payload)} bytes instead of {length}")


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ProtocolError("padding longer than its frame")
    return payload[1 : len(payload) - payload[0]]
