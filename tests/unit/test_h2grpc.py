"""The bench's HTTP/2 gRPC client against a scripted HTTP/2 peer: each test makes the server side
do one thing a real server may do (split frames, padding, CONTINUATION, small windows, PING, resets,
GOAWAY, HTTP errors, stalls) and checks the call's outcome and what the client put on the wire.
Against a real rapidserve server: tests/integration/test_h2grpc.py."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from certs import Pki, make_pki

from rapidserve.clients import _h2grpc as h2grpc
from rapidserve.clients._h2grpc import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    frame,
)

pytestmark = pytest.mark.timeout(30)
METHOD = "/test.Service/Call"
GRPC_OK = [(":status", "200"), ("content-type", "application/grpc")]
Script = Callable[["Peer", int, int, int, bytes], Awaitable[None]]


def grpc_message(data: bytes) -> bytes:
    return b"\0" + len(data).to_bytes(4, "big") + data


class Peer:
    """A scripted HTTP/2 server on a free port. After the client's preface it sends ``settings``;
    then every frame from the client is recorded and handed to ``script``. ``received[stream]``
    collects each stream's DATA bytes (on the connection the current frame came from). With ``tls``
    (a server context) it speaks TLS."""

    def __init__(
        self, script: Script, settings: dict[int, int] | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.script = script
        self.settings = settings or {}
        self.tls = tls
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.encoder = hpack.Encoder()  # with indexing, so the client's decoder table is exercised
        self.writer: asyncio.StreamWriter | None = None  # the latest connection's
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Peer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.url = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:  # read on until the client hangs up, so ``frames`` holds all it sent
            await asyncio.wait_for(self.closed.wait(), 5)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # each connection has its own HPACK table and stream ids: the script sees the current one's
        encoder, received = hpack.Encoder(), defaultdict(bytearray)
        self.writer, self.encoder, self.received = writer, encoder, received
        self.writers.append(writer)
        assert await reader.readexactly(24) == h2grpc.PREFACE
        payload = b"".join(struct.pack(">HI", k, v) for k, v in self.settings.items())
        self.send(SETTINGS, 0, 0, payload)
        try:
            while True:
                length_kind, flags, stream_id = struct.unpack(">IBI", await reader.readexactly(9))
                payload = await reader.readexactly(length_kind >> 8)
                kind = length_kind & 0xFF
                self.frames.append((kind, flags, stream_id, payload))
                self.writer, self.encoder, self.received = writer, encoder, received  # answer on this connection
                if kind == DATA:
                    received[stream_id] += payload
                await self.script(self, kind, flags, stream_id, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        assert self.writer is not None
        self.writer.write(frame(kind, flags, stream_id, payload))

    def headers(self, stream_id: int, pairs: list[tuple[str, str]], end_stream: bool = False) -> None:
        self.send(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.encoder.encode(pairs))

    def answer(self, stream_id: int, body: bytes, status: int = 0, message: str = "") -> None:
        """A whole gRPC answer: initial headers, one DATA frame, trailers."""
        self.headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self.send(DATA, 0, stream_id, grpc_message(body))
        trailers = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
        self.headers(stream_id, trailers, end_stream=True)

    def kinds(self, kind: int) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == kind]


async def echo(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
    """Answer each call, once the client half-closed it, with its own message reversed."""
    if kind == DATA and flags & END_STREAM:
        peer.answer(stream_id, bytes(peer.received[stream_id][5:])[::-1])


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_unary_call_and_request_headers() -> None:
    async def scenario() -> None:
        async with Peer(echo) as peer:
            connection = await Connection.open(peer.url)
            replies = [await connection.unary(METHOD, b"abc"), await connection.unary(METHOD, b"xyz", timeout_s=2.5)]
            connection.close()
        assert replies == [h2grpc.Reply(grpc.StatusCode.OK, "", b"cba"), h2grpc.Reply(grpc.StatusCode.OK, "", b"zyx")]
        decoder = hpack.Decoder()
        blocks = [dict(decoder.decode(f[3])) for f in peer.kinds(HEADERS)]
        assert blocks[0][":path"] == METHOD and blocks[0]["content-type"] == "application/grpc"
        assert blocks[0]["te"] == "trailers" and blocks[0][":authority"] == peer.url
        assert "grpc-timeout" not in blocks[0] and blocks[1]["grpc-timeout"] == "2500000u"
        assert [f[2] for f in peer.kinds(HEADERS)] == [1, 3]  # odd stream ids, in order
        # the client acknowledged the server's SETTINGS and opened a large receive window
        assert any(f[1] == h2grpc.ACK for f in peer.kinds(SETTINGS))
        assert struct.unpack(">I", peer.kinds(WINDOW_UPDATE)[0][3])[0] > 1 << 20

    run(scenario)


def server_context(pki: Pki, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_extra_headers_go_with_every_call_and_tls_says_https(tmp_path: Path, tls: bool) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> list[h2grpc.Reply]:
        async with Peer(echo, tls=server_context(pki, ["h2"]) if tls else None) as peer:
            connection = await Connection.open(peer.url, ssl=h2grpc.ssl_context(pki.ca) if tls else None,
                                               headers={"X-Key": "secret", "x-tag": "a b"})  # fmt: skip
            replies = [await connection.unary(METHOD, b"abc"), await connection.unary(METHOD, b"xyz", timeout_s=2)]
            stream = await connection.stream(METHOD, lambda message: None)
            stream.end()
            await stream.status
            connection.close()
            await connection.wait_closed()
        blocks = [dict(hpack.Decoder().decode(f[3])) for f in peer.kinds(HEADERS)]
        assert [b[":scheme"] for b in blocks] == ["https" if tls else "http"] * 3
        assert all(b["x-key"] == "secret" and b["x-tag"] == "a b" for b in blocks)
        return replies

    assert [r.response for r in run(scenario)] == [b"cba", b"zyx"]


def test_a_tls_server_must_select_h2(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path, "a"), make_pki(tmp_path, "b")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()
        writer.close()

    async def attempt(alpn: list[str], **options: Any) -> None:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=server_context(pki, alpn))
        try:
            url = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            await Connection.open(url, 5, **options)
        finally:
            server.close()
            await server.wait_closed()

    for alpn, selected in (([], "none"), (["http/1.1", "h2c"], "http/1.1")):
        context = h2grpc.ssl_context(pki.ca)
        context.set_alpn_protocols(["h2", "http/1.1"])  # (a client offering h2 only gets no ALPN answer)
        with pytest.raises(ConnectionError, match=f"did not select HTTP/2 .*ALPN {selected}, expected h2"):
            run(lambda: attempt(alpn, ssl=context))  # noqa: B023
    with pytest.raises(ssl.SSLCertVerificationError):  # a server certificate the given CA did not sign
        run(lambda: attempt(["h2"], ssl=h2grpc.ssl_context(other.ca)))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        run(lambda: attempt(["h2"], ssl=h2grpc.ssl_context(pki.ca), server_hostname="elsewhere.example"))


def test_an_answer_in_pieces_padded_continued_and_interrupted_by_ping() -> None:
    body = bytes(range(256)) * 40

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if not (kind == DATA and flags & END_STREAM):
            return
        block = peer.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        peer.send(HEADERS, 0, stream_id, block[:3])  # the header block continues in CONTINUATION frames
        peer.send(CONTINUATION, 0, stream_id, block[3:5])
        peer.send(CONTINUATION, END_HEADERS, stream_id, block[5:])
        message = grpc_message(body)
        peer.send(DATA, PADDED, stream_id, bytes([7]) + message[:3] + b"\0" * 7)  # padded, the prefix split
        peer.send(PING, 0, 0, b"12345678")
        peer.send(DATA, 0, stream_id, message[3:5000])
        peer.send(DATA, 0, stream_id, message[5000:])
        trailers = peer.encoder.encode([("grpc-status", "0")])
        peer.send(HEADERS, PADDED | END_HEADERS | END_STREAM, stream_id, bytes([2]) + trailers + b"\0\0")

    async def scenario() -> None:
        async with Peer(script) as peer:
            connection = await Connection.open(peer.url)
            reply = await connection.unary(METHOD, b"x")
            connection.close()
        assert reply.code == grpc.StatusCode.OK and reply.response == body
        assert (PING, h2grpc.ACK, 0, b"12345678") in peer.frames

    run(scenario)


def test_large_message_respects_flow_control_and_frame_size() -> None:
    message = bytes(range(251)) * 1000  # 251 KB: several frames, far over a 1000-byte window

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            outstanding = len(peer.received[stream_id]) - peer.granted.get(stream_id, 0)
            assert len(payload) <= 16_384 and outstanding <= 1000, "the client overran its window"
            peer.granted[stream_id] = len(peer.received[stream_id])
            peer.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload)))
            peer.send(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", len(payload)))
            if flags & END_STREAM:
                peer.answer(stream_id, bytes(peer.received[stream_id][5:]))

    async def scenario() -> None:
        async with Peer(script, {h2grpc.SETTINGS_INITIAL_WINDOW_SIZE: 1000}) as peer:
            peer.granted = {}
            connection = await Connection.open(peer.url)
            reply = await connection.unary(METHOD, message)
            connection.close()
        assert reply.code == grpc.StatusCode.OK and reply.response == message
        assert len(peer.kinds(DATA)) > 250

    run(scenario)


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        (lambda p, s: p.headers(s, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5"),
                                    ("grpc-message", "no model %27x%27 (100%25)")], end_stream=True),
         grpc.StatusCode.NOT_FOUND, "no model 'x' (100%)"),  # trailers-only, percent-encoded message
        (lambda p, s: p.answer(s, b"", status=8, message="queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        (lambda p, s: p.headers(s, [(":status", "503")], end_stream=True), grpc.StatusCode.UNAVAILABLE, "HTTP 503"),
        (lambda p, s: p.send(RST_STREAM, 0, s, struct.pack(">I", 0x7)), grpc.StatusCode.UNAVAILABLE, "0x7"),
        (lambda p, s: p.send(RST_STREAM, 0, s, struct.pack(">I", 0x2)), grpc.StatusCode.INTERNAL, "0x2"),
        (lambda p, s: (p.headers(s, GRPC_OK), p.send(DATA, END_STREAM, s, grpc_message(b"a"))),
         grpc.StatusCode.INTERNAL, "without a grpc-status"),
        (lambda p, s: (p.headers(s, GRPC_OK), p.send(DATA, 0, s, b"\x01\0\0\0\x01z")),
         grpc.StatusCode.INTERNAL, "compressed"),
        (lambda p, s: (p.headers(s, [(":status", "502"), ("content-type", "text/html")]), p.send(DATA, 0, s, b"<html>")),
         grpc.StatusCode.UNAVAILABLE, "HTTP 502 (text/html), not gRPC"),  # a proxy's error page
        (lambda p, s: p.send(DATA, 0, s, grpc_message(b"a")), grpc.StatusCode.INTERNAL, "before its response headers"),
        (lambda p, s: p.headers(s, [*GRPC_OK, ("grpc-status", "0")], end_stream=True),
         grpc.StatusCode.INTERNAL, "without an answer"),
    ],
)  # fmt: skip
def test_failed_calls_end_with_the_right_status(answer: Callable[[Peer, int], Any], code: grpc.StatusCode,
                                                message: str) -> None:  # fmt: skip
    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA and flags & END_STREAM:
            answer(peer, stream_id)

    async def scenario() -> None:
        async with Peer(script) as peer:
            connection = await Connection.open(peer.url)
            reply = await connection.unary(METHOD, b"q")
            after = await connection.unary(METHOD, b"q")  # the connection still works after a failed call
            connection.close()
        assert reply.code == code and message in reply.message and reply.response is None, reply
        assert after.code == code

    run(scenario)


def test_deadline_and_cancel_reset_the_stream() -> None:
    async def silent(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        pass

    async def scenario() -> None:
        async with Peer(silent) as peer:
            connection = await Connection.open(peer.url)
            reply = await connection.unary(METHOD, b"q", timeout_s=0.2)
            task = asyncio.create_task(connection.unary(METHOD, b"q"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)
            connection.close()
        assert reply.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [(f[2], f[3]) for f in peer.kinds(RST_STREAM)] == [(1, b"\0\0\0\x08"), (3, b"\0\0\0\x08")]

    run(scenario)


def test_goaway_and_a_lost_connection_end_calls_unavailable() -> None:
    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA and stream_id == 3:  # with calls 1 and 3 open: only 1 will be served
            peer.send(GOAWAY, 0, 0, struct.pack(">II", 1, 0) + b"shutting down")
            peer.answer(1, b"served")

    async def scenario() -> None:
        async with Peer(script) as peer:
            connection = await Connection.open(peer.url)
            first = asyncio.create_task(connection.unary(METHOD, b"1"))
            await asyncio.sleep(0.05)
            second = await connection.unary(METHOD, b"3")
            third = await connection.unary(METHOD, b"5")
            assert (await first).response == b"served"
            connection.close()
        assert second.code == third.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in second.message

        async def hang_up(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
            if kind == DATA:
                assert peer.writer is not None
                peer.writer.close()

        async with Peer(hang_up) as peer:
            connection = await Connection.open(peer.url)
            lost = await connection.unary(METHOD, b"1")
            later = await connection.unary(METHOD, b"1")
        assert lost.code == later.code == grpc.StatusCode.UNAVAILABLE and "lost" in lost.message

    run(scenario)


def test_max_concurrent_streams_is_respected() -> None:
    active: set[int] = set()
    most = 0

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        nonlocal most
        if kind == HEADERS:
            active.add(stream_id)
            most = max(most, len(active))
        if kind == DATA and flags & END_STREAM:  # answered a little later, the peer reading on meanwhile
            asyncio.get_running_loop().call_later(
                0.05, lambda: (active.discard(stream_id), peer.answer(stream_id, b"ok"))
            )

    async def scenario() -> None:
        async with Peer(script, {h2grpc.SETTINGS_MAX_CONCURRENT_STREAMS: 2}) as peer:
            connection = await Connection.open(peer.url)
            replies = await asyncio.gather(*(connection.unary(METHOD, b"q") for _ in range(6)))
            connection.close()
        assert all(r.response == b"ok" for r in replies)
        assert most == 2

    run(scenario)


def test_streaming_call_and_bench_streams_that_break() -> None:
    from rapidserve.clients.bench.transports import Streams

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == HEADERS:
            peer.headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        elif kind == DATA and payload:
            peer.send(DATA, 0, stream_id, grpc_message(payload[5:] * 2) + grpc_message(b"!"))
        if kind == DATA and flags & END_STREAM:
            peer.headers(stream_id, [("grpc-status", "0")], end_stream=True)

    async def scenario() -> None:
        async with Peer(script) as peer:
            connection = await Connection.open(peer.url)
            got: list[bytes] = []
            stream = await connection.stream(METHOD, got.append)
            stream.write(b"ab")
            stream.write(b"cd")
            stream.end()
            assert (await stream.status).code == grpc.StatusCode.OK
            assert got == [b"abab", b"!", b"cdcd", b"!"]

            async def reset(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
                if kind == DATA:
                    peer.send(RST_STREAM, 0, stream_id, struct.pack(">I", 0x7))

            peer.script = reset
            streams = await Streams.open([connection], 2)
            results = await asyncio.gather(*(streams.send(b"", i) for i in range(4)))
            again = await streams.send(b"", 4)
            await streams.close()
            connection.close()
        assert [*results, again] == ["UNAVAILABLE"] * 5

    run(scenario)


def test_open_fails_clearly_when_nothing_listens() -> None:
    async def scenario() -> None:
        with pytest.raises(OSError):
            await Connection.open("127.0.0.1:1")
        with pytest.raises(ValueError, match="HOST:PORT"):
            await Connection.open("localhost")

    run(scenario)


def test_on_uvloop_as_the_bench_runs_it() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not available on Windows")

    async def scenario() -> list[h2grpc.Reply]:
        async with Peer(echo) as peer:
            connection = await Connection.open(peer.url)
            replies = await asyncio.gather(*(connection.unary(METHOD, bytes([i]) * 3000) for i in range(20)))
            connection.close()
            return replies

    replies = uvloop.run(asyncio.wait_for(scenario(), 20))
    assert [r.response for r in replies] == [bytes([i]) * 3000 for i in range(20)]


def test_grpc_timeout_header_fits_eight_digits() -> None:
    assert h2grpc.grpc_timeout(2.5) == "2500000u"
    assert h2grpc.grpc_timeout(1e-9) == "1u"
    assert h2grpc.grpc_timeout(1000) == "1000000m"  # 10^9 us would be 10 digits
    assert h2grpc.grpc_timeout(86_400 * 365 * 10) == "5256000M"


def test_remembered_header_blocks_follow_the_servers_table() -> None:
    # The peer's encoder indexes what it sends: the 2nd and 4th trailers are both the one byte 0xbe
    # ("dynamic entry 62"), which means grpc-status 0 the first time and 7 the second (after the 3rd
    # answer inserted grpc-status 7 in front). A decoder cache that ignored the table would say OK.
    statuses = iter([0, 0, 7, 7])
    trailers: list[bytes] = []

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA and flags & END_STREAM:
            peer.headers(stream_id, GRPC_OK)
            peer.send(DATA, 0, stream_id, grpc_message(b"answer"))
            block = peer.encoder.encode([("grpc-status", str(next(statuses)))])
            trailers.append(block)
            peer.send(HEADERS, END_HEADERS | END_STREAM, stream_id, block)

    async def scenario() -> list[grpc.StatusCode]:
        async with Peer(script) as peer:
            connection = await Connection.open(peer.url)
            codes = [(await connection.unary(METHOD, b"q")).code for _ in range(4)]
            connection.close()
            return codes

    assert run(scenario) == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert trailers[1] == trailers[3] == b"\xbe"


def test_calls_waiting_for_a_stream_slot_end_when_the_server_goes_away() -> None:
    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA and stream_id == 1:  # one call in flight, the limit; three more wait for a slot
            asyncio.get_running_loop().call_later(0.1, peer.send, GOAWAY, 0, 0, struct.pack(">II", 1, 0))

    async def scenario() -> list[h2grpc.Reply]:
        async with Peer(script, {h2grpc.SETTINGS_MAX_CONCURRENT_STREAMS: 1}) as peer:
            connection = await Connection.open(peer.url)
            calls = [asyncio.create_task(connection.unary(METHOD, b"q")) for _ in range(4)]
            await asyncio.wait_for(asyncio.wait(calls[1:]), 10)  # GOAWAY ends the three that wait
            waiting = [c for c in calls[1:] if c.done()]
            connection.close()  # ends call 1, which the server kept (it is <= GOAWAY's last id)
            return [c.result() for c in waiting] + [await calls[0]]

    replies = run(scenario)
    assert [r.code for r in replies] == [grpc.StatusCode.UNAVAILABLE] * 3 + [grpc.StatusCode.CANCELLED]
    assert "going away" in replies[0].message


def test_a_closed_loop_on_a_closed_connection_keeps_the_event_loop_running() -> None:
    from rapidserve.clients.bench.transports import Unary
    from rapidserve.clients.loadgen import Measurement, closed_loop

    async def hang_up(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == HEADERS:
            peer.send(GOAWAY, 0, 0, struct.pack(">II", 0, 0))

    async def scenario() -> dict[str, Any]:
        async with Peer(hang_up) as peer:
            connection = await Connection.open(peer.url)
            unary = Unary([connection], lambda: Connection.open(peer.url), None)

            async def send(index: int) -> str:
                return await unary.send(b"q", index)

            point = await closed_loop(send, 4, Measurement(window_s=0.1, warmup_s=0.05, max_windows=3))
            await unary.close()
            return point.summary()

    summary = run(scenario)  # before the fix this never yielded: the windows never closed on time
    assert set(summary["errors"]) == {"UNAVAILABLE"} and summary["requests_per_s"] == 0


def test_window_changes_mid_call_and_bad_frames() -> None:
    message = bytes(200_000)

    async def script(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA and len(peer.received[stream_id]) == 100:  # the window it opened with: widen it now
            peer.send(SETTINGS, 0, 0, struct.pack(">HI", h2grpc.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20))
            peer.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
        if kind == DATA and flags & END_STREAM:
            peer.answer(stream_id, b"%d" % (len(peer.received[stream_id]) - 5))

    async def bad(peer: Peer, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            peer.send(WINDOW_UPDATE, 0, 0, b"\0\0")  # a WINDOW_UPDATE must be 4 bytes

    async def scenario() -> tuple[h2grpc.Reply, h2grpc.Reply, h2grpc.Reply]:
        async with Peer(script, {h2grpc.SETTINGS_INITIAL_WINDOW_SIZE: 100}) as peer:
            connection = await Connection.open(peer.url)
            big = await connection.unary(METHOD, message)
            connection.close()
        assert len(peer.kinds(DATA)[0][3]) == 100  # within the first window, then on after SETTINGS widened it
        async with Peer(bad) as peer:
            connection = await Connection.open(peer.url)
            broken = await connection.unary(METHOD, b"q")
            after = await connection.unary(METHOD, b"q")
        assert (GOAWAY, 0, 0, struct.pack(">II", 0, h2grpc.PROTOCOL_ERROR)) in peer.frames
        return big, broken, after

    big, broken, after = run(scenario)
    assert big.code == grpc.StatusCode.OK and big.response == b"200000"
    assert broken.code == grpc.StatusCode.INTERNAL and "protocol error" in broken.message
    assert after.code == grpc.StatusCode.INTERNAL  # the connection is closed for good


def test_a_failing_message_handler_ends_only_its_stream() -> None:
    async def scenario() -> tuple[h2grpc.Reply, h2grpc.Reply]:
        async with Peer(echo) as peer:
            connection = await Connection.open(peer.url)

            def explode(message: bytes) -> None:
                raise ValueError("cannot parse")

            stream = await connection.stream(METHOD, explode)
            stream.write(b"x")
            stream.end()
            failed = await stream.status
            fine = await connection.unary(METHOD, b"ok")
            connection.close()
            return failed, fine

    failed, fine = run(scenario)
    assert failed.code == grpc.StatusCode.INTERNAL and "ValueError: cannot parse" in failed.message
    assert fine.response == b"ko"


def test_bench_spreads_calls_over_connections_like_perf_analyzer() -> None:
    from rapidserve.clients.bench.jobs import Job, connection_count
    from rapidserve.clients.bench.transports import Unary
    from rapidserve.clients.loadgen import Measurement

    def job(mode: str, level: float, connections: int | None = None) -> Job:
        return Job("h:1", "m", "", [], False, mode, level, Measurement(), connections=connections)

    # perf_analyzer's contexts share one connection per 6 (1, 16 and 64 in flight: 1, 3 and 11 seen)
    assert [connection_count(job("concurrency", c)) for c in (1, 6, 7, 16, 64)] == [1, 1, 2, 3, 11]
    assert connection_count(job("request_rate", 500)) == 1 and connection_count(job("concurrency", 64, 2)) == 2

    async def scenario() -> list[str]:
        async with Peer(echo) as peer:
            connections = [await Connection.open(peer.url) for _ in range(3)]
            unary = Unary(connections, lambda: Connection.open(peer.url), None)
            statuses = await asyncio.gather(*(unary.send(b"q", i) for i in range(6)))
            await unary.close()
        assert sorted(f[2] for f in peer.kinds(HEADERS)) == [1, 1, 1, 3, 3, 3]  # two calls on each
        return statuses

    assert run(scenario) == ["OK"] * 6


def test_an_hpack_without_its_internal_table_is_refused_when_a_connection_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata
    from types import SimpleNamespace

    h2grpc.check_hpack()  # the installed hpack has it
    message = (
        f"hpack {importlib.metadata.version('hpack')} lacks the internal table rapidserve's bench client relies on; "
        "install hpack>=4,<5"
    )

    class NoTable:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.header_table = SimpleNamespace(maxsize=4096)

    monkeypatch.setattr(hpack, "Decoder", NoTable)
    with pytest.raises(ImportError) as refused:
        h2grpc.check_hpack()
    assert str(refused.value) == message

    async def connect() -> None:
        Connection("localhost:1")

    with pytest.raises(ImportError, match="lacks the internal table"):
        asyncio.run(connect())
