"""The KServe v2 HTTP/REST port: aiohttp's low-level server on the gRPC server's event loop.

This module is the edge only: it binds the port, enforces the limits a request meets before any of
it is decoded (access restriction, Content-Length, the in-flight byte budget shared with gRPC, the
read timeout), and hands the raw request to ``RestApi``, which gives the protocol its meaning.

Order of the checks, cheapest first and none reading the body: draining (503, except health and
metadata, which stay answered), restricted API (403), a body on GET/HEAD or health (400), declared
length over the limit or a JSON part over ``MAX_JSON_BYTES`` (413); then the body is read through the
budget, reserving what it can hold once parsed: a chunked body is counted as it comes and cut off at the
limit (413); a body that does not arrive in time is 408. An answer the client does not read within the
read timeout loses its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from rapidserve.server.access import check_groups, matches
from rapidserve.server.admission import Admission
from rapidserve.server.errors import DeadlineExceeded, RapidServeError, TooLarge
from rapidserve.server.ports import bare_host, bind_error, check_bindable, host_port
from rapidserve.server.rest import RestApi, RestRequest, RestResponse
from rapidserve.server.rest_codec import JSON_EXPANSION, MAX_JSON_BYTES
from rapidserve.server.settings import ServerSettings, TlsSettings
from rapidserve.server.status import http_status_of, message_of, unexpected

__all__ = ["HttpServer", "server_ssl_context"]

log = logging.getLogger(__name__)
# aiohttp logs a malformed request (bad request line, headers over the limits) with a traceback at
# ERROR: that is the client's fault, answered 400, and a client could flood the log with it.
_wire_log = logging.getLogger(__name__ + ".wire")
_wire_log.setLevel(logging.CRITICAL)

# Header limits, set here rather than left to the library's defaults: a request line or one header
# of at most 8 KiB, at most 128 headers (every client we know sends fewer than 20).
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128
READ_CHUNK_BYTES = 2**16  # what the server buffers per connection before it stops reading the socket
ANSWERED_WHILE_DRAINING = ("health", "metadata")  # Triton keeps liveness (and metadata) answered in a drain
BODILESS_APIS = ("health",)  # answered without a body: they never read through a budget
JSON_LENGTH_HEADER = "Inference-Header-Content-Length"


class HttpServer:
    """One HTTP/1.1 listener. ``limit_of(api, path)`` is the most bytes a request body to that
    endpoint may hold; ``admission_of(api)`` the budget it is read through (None: read as it comes)."""

    def __init__(
        self,
        api: RestApi,
        settings: ServerSettings,
        *,
        limit_of: Callable[[str | None, str], int],
        admission_of: Callable[[str | None], Admission | None],
        refused: Callable[[str], None] | None = None,
        shared_port: bool = False,
    ) -> None:
        """``shared_port``: one of several front-end processes on the port (SO_REUSEPORT; the engine
        process checked it was free and holds it)."""
        self._api = api
        self._shared_port = shared_port
        self._settings = settings
        self._limit_of = limit_of
        self._admission_of = admission_of
        self._refused = refused  # hears of inference requests refused before RestApi saw them
        api.stats.expect_calls("http", "inference")
        check_groups(settings.http_restricted_api, "--http-restricted-api")
        self._required: dict[str, tuple[str, bytes]] = {}
        for apis, key, value in settings.http_restricted_api:
            for name in apis:
                self._required[name] = (key, value.encode("utf-8", "surrogateescape"))
        self._ssl: ssl.SSLContext | None = None
        self._listener: asyncio.Server | None = None
        self._server: _Server | None = None
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> int:
        """Bind the port and serve; returns the port (the one picked when ``http_port`` is 0). A port
        that cannot be bound is one ``RapidServeError`` line naming it and ``--http-port``."""
        settings = self._settings
        host = bare_host(settings.http_host or settings.host)
        names = (host, settings.http_port, "HTTP", "--http-port", "--http-address")
        if not self._shared_port:
            check_bindable(*names)
        if settings.http_tls is not None:
            self._ssl = server_ssl_context(settings.http_tls)
        self._server = _Server(
            self._handle,
            max_connections=settings.http_max_connections,
            first_request_s=settings.grpc_handshake_timeout_s,
            keepalive_timeout=settings.http_keepalive_timeout_s,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            read_bufsize=READ_CHUNK_BYTES,
            auto_decompress=False,  # RestApi inflates, bounded by the message limit (gzip bombs)
            lingering_time=0,  # a body not read (413, 403) is not drained: the connection closes
            access_log=None,
            logger=_wire_log,
        )
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                self._server,
                host or None,
                settings.http_port,
                ssl=self._ssl,
                ssl_handshake_timeout=settings.grpc_handshake_timeout_s if self._ssl else None,
                reuse_address=True,
                reuse_port=self._shared_port or None,
                family=socket.AF_UNSPEC,
            )
        except OSError:
            raise bind_error(*names) from None  # taken since the check
        port: int = self._listener.sockets[0].getsockname()[1]
        level = logging.DEBUG if self._shared_port else logging.INFO  # (the engine process says it once)
        log.log(level, "HTTP server listening on %s%s", host_port(host, port), " (TLS)" if self._ssl else "")
        return port

    def drain(self) -> None:
        """Stop taking connections; requests that come on open ones from now on get 503, but for
        health and metadata, which ``RestApi`` answers as draining (live 200, ready 400)."""
        self._draining = True
        self._api.drain()
        if self._listener is not None:
            self._listener.close()

    async def idle(self) -> None:
        """Return once every request accepted before ``drain`` is answered."""
        await self._idle.wait()

    async def stop(self) -> None:
        """Close every connection (after ``drain`` and ``idle``, or at once)."""
        self.drain()
        if self._server is not None:
            await self._server.shutdown(0.5)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)

    def reload_certificates(self) -> None:
        """New connections use the re-read files; a pair that does not load raises (the old one stays)."""
        tls = self._settings.http_tls
        if self._ssl is None or tls is None:
            return
        server_ssl_context(tls)  # checked on a context of its own first: the live one must not half-change
        self._ssl.load_cert_chain(tls.server_cert, tls.server_key)
        if tls.root_cert is not None:
            self._ssl.load_verify_locations(tls.root_cert)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request, counted as one call at the HTTP edge once its answer is ready, before it is
        sent (a client holding its answer finds it counted): ok when answered below 400."""
        start, counted = time.perf_counter(), False
        api = self._api.api_of(request.method, request.path)

        def count(status: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self._api.stats.record_call("http", api or "other", status < 400, time.perf_counter() - start)

        try:
            response = await self._dispatch(request, api, count)
            count(response.status)
            return response
        finally:
            count(500)  # raised or cancelled before an answer: a failed call

    async def _dispatch(
        self, request: web.BaseRequest, api: str | None, count: Callable[[int], None]
    ) -> web.StreamResponse:
        if self._server is not None:
            self._server.served(request.protocol)
        if self._draining and api not in ANSWERED_WHILE_DRAINING:
            return _answer(503, "the server is shutting down", close=True)
        denied = self._denied(api, request.headers.getall)
        if denied is not None:
            return _answer(403, denied, close=request.body_exists)
        if request.body_exists and (request.method in ("GET", "HEAD") or api in BODILESS_APIS):
            return _answer(400, f"a {request.method} {request.path} request takes no body", close=True)
        limit = self._limit_of(api, request.path)
        declared = request.content_length
        if declared is not None and declared > limit:
            self._refuse(api, TooLarge.reason)
            return _answer(413, _too_large(declared, limit), close=True)
        json_part = _json_part(request, api, declared)
        if json_part is not None and api == "inference" and json_part > MAX_JSON_BYTES:
            self._refuse(api, TooLarge.reason)
            return _answer(413, _json_too_large(json_part), close=True)
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._serve(request, api, limit, _reservation(api, limit, declared, json_part), count)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _serve(
        self, request: web.BaseRequest, api: str | None, limit: int, reserve: int, count: Callable[[int], None]
    ) -> web.StreamResponse:
        admission = self._admission_of(api) if request.body_exists else None
        held = 0
        try:
            if admission is not None:
                body, held = await admission.read(lambda: _read_body(request, limit), len, None, reserve)
            elif request.body_exists:
                body = await asyncio.wait_for(_read_body(request, limit), self._settings.grpc_request_read_timeout_s)
            else:
                body = b""
        except (asyncio.TimeoutError, RapidServeError) as exc:
            # a body that did not come in time is 408 (the budget's own message names the gRPC side)
            late = isinstance(exc, (asyncio.TimeoutError, DeadlineExceeded))
            error = _late() if late else exc
            assert isinstance(error, RapidServeError)
            self._refuse(api, error.reason)
            return _answer(408 if late else http_status_of(error), message_of(error), close=True)
        try:
            rest = RestRequest(
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers={name.lower(): value for name, value in request.headers.items()},
                body=body,
                deadline=None,
                max_body_bytes=limit,
            )
            del body
            try:
                answer: RestResponse = await self._api.handle(rest)
            except Exception as exc:  # RestApi answers bad input itself: this is a bug, logged
                return _answer(500, unexpected(f"HTTP {request.method} {request.path}", exc))
        finally:
            if admission is not None:
                admission.release(held)
        response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        del answer
        if self._draining:
            response.force_close()
        count(response.status)
        await self._write(request, response)
        return response

    async def _write(self, request: web.BaseRequest, response: web.Response) -> None:
        """Send the answer here, bounded by the read timeout: a client that does not read it loses
        its connection, and the server the answer's memory."""

        async def send() -> None:
            await response.prepare(request)
            await response.write_eof()

        try:
            await asyncio.wait_for(send(), self._settings.grpc_request_read_timeout_s)
        except asyncio.TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            log.info(
                "HTTP %s %s: the client did not read its answer in time; connection closed",
                request.method,
                request.path,
            )
            raise asyncio.CancelledError from None

    def _denied(self, api: str | None, values: Callable[..., list[str]]) -> str | None:
        """Why a request to ``api`` is refused by ``--http-restricted-api``, or None."""
        required = self._required.get(api) if api is not None else None
        if required is None:
            return None
        header, value = required
        if matches((given.encode("utf-8", "surrogateescape") for given in values(header, [])), value):
            return None
        return f"This API is restricted: the '{api}' API needs the header '{header}' with this server's value"

    def _refuse(self, api: str | None, reason: str) -> None:
        if api == "inference" and self._refused is not None:
            self._refused(reason)


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes; a chunked body is cut off as soon as it is over."""
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise TooLarge(_too_large(size, limit, sent=True))
        chunks.append(chunk)
    return b"".join(chunks)


def _json_part(request: web.BaseRequest, api: str | None, declared: int | None) -> int | None:
    """The bytes of a plain body's JSON part (all of it, unless the binary extension's header says
    less); None for a chunked or compressed body, known only once inflated."""
    if declared is None or request.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    given = request.headers.get(JSON_LENGTH_HEADER) if api == "inference" else None
    if given is not None and given.strip().isdigit():
        return min(int(given), declared)
    return declared


def _reservation(api: str | None, limit: int, declared: int | None, json_part: int | None) -> int:
    """What a request's body can hold once read and parsed: its bytes, and its JSON part as Python
    objects (up to ``JSON_EXPANSION`` times its bytes)."""
    if declared is not None and json_part is not None:
        return declared + (JSON_EXPANSION - 1) * json_part
    json_bound = MAX_JSON_BYTES if api == "inference" else limit
    return limit + (JSON_EXPANSION - 1) * min(json_bound, limit)


def _json_too_large(size: int) -> str:
    return (
        f"the JSON part of the request has {size} bytes; the server parses at most {MAX_JSON_BYTES}: "
        "send large tensors as binary data (binary_data_size)"
    )


def _too_large(size: int, limit: int, sent: bool = False) -> str:
    what = f"more than {limit}" if sent else str(size)
    return (
        f"the request body has {what} bytes; this endpoint takes at most {limit} "
        "(--grpc-max-message-bytes is the server's message limit)"
    )


def _late() -> DeadlineExceeded:
    return DeadlineExceeded(
        "the request body did not arrive in time (--grpc-request-read-timeout-secs); "
        "the client sent its headers but not all of its body"
    )


def _answer(status: int, message: str, close: bool = False) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps({"error": message}).encode(), content_type="application/json"
    )
    if close:
        response.force_close()
    return response


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A TLS server context from the files (TLS 1.2 and up); mutual: a client certificate signed by
    the root CA is required. Raises ValueError naming the files when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.server_cert, tls.server_key)
        if tls.root_cert is not None:
            context.load_verify_locations(tls.root_cert)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"{tls.server_cert}, {tls.server_key}: not a matching PEM certificate and key ({exc})"
        ) from None
    if tls.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Server(web.Server):
    """aiohttp's server with two bounds it lacks: connections open at once, and the time a new
    connection may take to send its first request's headers (aiohttp waits for them forever)."""

    def __init__(self, handler: Any, *, max_connections: int, first_request_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._max_connections = max_connections
        self._first_request_s = first_request_s
        self._open: dict[RequestHandler, bool] = {}  # connection -> has sent a request

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._open) >= self._max_connections:
            transport.abort()  # (its handler's connection_lost cleans up)
            return
        self._open[handler] = False
        self._loop.call_later(self._first_request_s, self._silent, handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)
        super().connection_lost(handler, exc)

    def served(self, handler: Any) -> None:
        if handler in self._open:
            self._open[handler] = True

    def _silent(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if self._open.get(handler) is False:
            transport.abort()

    @property
    def open_connections(self) -> int:
        return len(self._open)
