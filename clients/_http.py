"""HTTP/1.1 transports for the clients' ``http://`` and ``https://`` URLs: one request in, status, headers
and body out. Sync: the standard library's ``http.client`` over keep-alive connections (one per thread
in use at a time, idle ones reused). asyncio: aiohttp's client (its connection pool, keep-alive).
Failures to connect, TLS failures and timeouts become ``InferenceServerError`` (UNAVAILABLE,
DEADLINE_EXCEEDED) as grpc reports them; an answer larger than ``max_message_bytes`` is refused."""

from __future__ import annotations

import asyncio
import http.client
import select
import ssl as _ssl
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from rapidserve.clients._rest import Endpoint
from rapidserve.clients.connection import Headers, Tls, http_ssl_context
from rapidserve.clients.types import InferenceServerError

__all__ = ["Answer", "AsyncTransport", "SyncTransport", "check_http_headers"]

# set by the transport from the request itself; a caller's copy would contradict it
_OWN_HEADERS = {
    "content-length",
    "inference-header-content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "expect",
}


def check_http_headers(headers: Headers) -> Headers:
    for name, _ in headers:
        if name in _OWN_HEADERS:
            raise ValueError(f"header '{name}' is set by the HTTP client itself")
    return headers


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def header_length(self) -> int | None:
        value = self.headers.get("inference-header-content-length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return -1  # (refused by the decoder as outside the body)


def _unreachable(endpoint: Endpoint, exc: BaseException, tls: Tls | None) -> InferenceServerError:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, _ssl.SSLError) or (tls is not None and "EOF" in reason):
        reason = f"TLS handshake failed: {reason}"
    return InferenceServerError(grpc.StatusCode.UNAVAILABLE, f"cannot reach {endpoint.authority}: {reason}")


def _too_large(size: int, limit: int, what: str = "answer") -> InferenceServerError:
    return InferenceServerError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"the {what} has {size} bytes, more than max_message_bytes ({limit})"
    )


_IDEMPOTENT = frozenset({"GET", "HEAD"})


def _stale(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection has something to read: the server's close (or data nobody asked for),
    so a request written to it would be lost. Checked before writing, when sending elsewhere is safe."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _HTTPSConnection(http.client.HTTPSConnection):
    """Verifies the server's certificate against ``target_name`` rather than the host it connects to."""

    def __init__(self, *args: Any, target_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._target_name = target_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._target_name)  # type: ignore[attr-defined]


class SyncTransport:
    """Requests over keep-alive connections: an idle one is reused, a new one opened when all are busy
    (calls from several threads). A request is sent once more, on a fresh connection, only when that
    cannot run it twice: its reused connection was closed before it was written, or it is a GET/HEAD."""

    def __init__(self, endpoint: Endpoint, tls: Tls | None, headers: Headers, max_message_bytes: int) -> None:
        if endpoint.tls and tls is None:
            tls = Tls()
        self._endpoint, self._tls = endpoint, tls
        self._context = http_ssl_context(tls) if tls is not None else None
        self._headers = {"Host": endpoint.authority, **dict(check_http_headers(headers))}
        self._limit = max_message_bytes
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                if not self._idle:
                    break
                connection = self._idle.pop()
            if not _stale(connection):
                return connection, True
            connection.close()
        host, port = self._endpoint.host, self._endpoint.port
        if self._context is None:
            return http.client.HTTPConnection(host, port), False
        target = (self._tls.target_name if self._tls is not None else None) or host
        return _HTTPSConnection(host, port, context=self._context, target_name=target), False

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        if self._closed:
            raise InferenceServerError(grpc.StatusCode.CANCELLED, "the client is closed")
        if len(body) > self._limit:
            raise _too_large(len(body), self._limit, "request")
        all_headers = {**self._headers, **(headers or {})}
        while True:
            connection, reused = self._connection()
            connection.timeout = timeout_s
            if connection.sock is not None:
                connection.sock.settimeout(timeout_s)
            sent = False
            try:
                connection.request(method, self._endpoint.prefix + path, body, all_headers)
                sent = True
                response = connection.getresponse()
                answer = self._read(response)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                connection.close()
                if reused and (not sent or method in _IDEMPOTENT):
                    continue  # the server closed it while idle, or running it twice does no harm
                if sent:
                    raise InferenceServerError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{self._endpoint.authority} closed the connection before answering; "
                        "the request may have run, so it was not sent again",
                    ) from None
                raise _unreachable(self._endpoint, exc, self._tls) from None
            except TimeoutError:
                connection.close()
                raise InferenceServerError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise _unreachable(self._endpoint, exc, self._tls) from None
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                with self._lock:
                    self._idle.append(connection)
            return answer

    def _read(self, response: http.client.HTTPResponse) -> Answer:
        length = response.getheader("content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            raise _too_large(int(length), self._limit)
        body = response.read(self._limit + 1)
        if len(body) > self._limit:
            raise _too_large(len(body), self._limit)
        if not response.isclosed():
            response.read()  # (nothing left: lets the connection be reused)
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class AsyncTransport:
    """Requests through one aiohttp session (made on the first call, inside the running loop)."""

    def __init__(self, endpoint: Endpoint, tls: Tls | None, headers: Headers, max_message_bytes: int) -> None:
        try:
            import aiohttp  # noqa: F401  (refused here, not at the first call)
        except ImportError:
            raise ImportError("an http:// URL in AsyncClient needs aiohttp: pip install aiohttp") from None
        if endpoint.tls and tls is None:
            tls = Tls()
        self._endpoint, self._tls = endpoint, tls
        self._context = http_ssl_context(tls) if tls is not None else None
        self._base = f"{'https' if endpoint.tls else 'http'}://{endpoint.authority}{endpoint.prefix}"
        # aiohttp would ask for compressed answers, which only cost the server CPU
        self._headers = {"Accept-Encoding": "identity", **dict(check_http_headers(headers))}
        self._limit = max_message_bytes
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, ssl=self._context if self._context is not None else False)
        return aiohttp.ClientSession(connector=connector, headers=self._headers, skip_auto_headers=("User-Agent",))

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        import aiohttp

        if len(body) > self._limit:
            raise _too_large(len(body), self._limit, "request")
        if self._session is None:
            self._session = self._open()
        server_hostname = self._tls.target_name if self._tls is not None else None
        try:
            async with self._session.request(
                method,
                self._base + path,
                data=body,
                headers=headers,
                server_hostname=server_hostname,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if response.content_length is not None and response.content_length > self._limit:
                    raise _too_large(response.content_length, self._limit)
                if response.content_length is not None:
                    data = await response.read()
                else:
                    parts, size = [], 0
                    async for chunk in response.content.iter_chunked(1 << 16):
                        parts.append(chunk)
                        size += len(chunk)
                        if size > self._limit:
                            raise _too_large(size, self._limit)
                    data = b"".join(parts)
                return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, data)
        except asyncio.TimeoutError:
            raise InferenceServerError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except aiohttp.ClientConnectorError as exc:
            raise _unreachable(self._endpoint, exc.os_error, self._tls) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(self._endpoint, exc, self._tls) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
