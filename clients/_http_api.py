"""The clients' calls over the KServe v2 REST protocol: what ``Client`` and ``AsyncClient`` do for an
``http://`` or ``https://`` URL. Each call is described once (method, path, body, how its answer reads)
and sent by a sync or an asyncio transport, so the two clients cannot drift apart. Results and errors
are the gRPC client's: numpy outputs, ``ModelMetadata``, the same protobuf messages (parsed from the
JSON answers), ``InferenceServerError`` with a gRPC code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import grpc
import numpy as np

from rapidserve import protos
from rapidserve.clients._http import Answer, AsyncTransport, SyncTransport
from rapidserve.clients._rest import (
    decode_infer,
    encode_infer,
    error_of,
    index_of,
    load_body,
    metadata_of,
    model_path,
    parse_url,
    proto_of,
    timeout_us,
)
from rapidserve.clients.connection import Headers, Tls
from rapidserve.clients.types import Arrays, InferenceServerError, ModelMetadata
from rapidserve.common.errors import InvalidTensor
from rapidserve.common.types import ParamValue

__all__ = ["AsyncHttpApi", "HttpApi", "is_http_url"]

T = TypeVar("T")


def is_http_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Answer], T]
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _ok(answer: Answer) -> Answer:
    if answer.status != 200:
        raise error_of(answer.status, answer.body)
    return answer


def _flag(answer: Answer) -> bool:
    """A ready/live answer: 200 yes; 400 (Triton's "not ready"), 404 (no such model) or 503 (shutting down)
    no, as the gRPC answers say; anything else is an error."""
    if answer.status in (400, 404, 503):
        return False
    return _ok(answer).status == 200


def _decoded(read: Callable[[Answer], T]) -> Callable[[Answer], T]:
    def checked(answer: Answer) -> T:
        try:
            return read(_ok(answer))
        except InvalidTensor as exc:
            raise InferenceServerError(grpc.StatusCode.INTERNAL, f"the server's answer is malformed: {exc}") from None

    return checked


def _infer(
    model: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str],
    version: str,
    timeout_s: float | None,
    request_id: str,
    parameters: dict[str, ParamValue] | None,
    binary: bool,
) -> _Call[Arrays]:
    params = dict(parameters or {})
    timeout = timeout_us(timeout_s)
    if timeout is not None and "timeout" not in params:
        params["timeout"] = timeout  # HTTP carries no deadline: the server reads this one as the request's
    body = encode_infer(inputs, outputs, request_id=request_id, parameters=params, binary=binary)
    read = _decoded(lambda a: decode_infer(a.body, a.header_length()))
    return _Call("POST", model_path(model, version, "infer"), read, body.body, body.headers())


def _get(path: str, read: Callable[[Answer], T]) -> _Call[T]:
    return _Call("GET", path, read)


def _live() -> _Call[bool]:
    return _get("/v2/health/live", _flag)


def _ready() -> _Call[bool]:
    return _get("/v2/health/ready", _flag)


def _model_ready(model: str, version: str) -> _Call[bool]:
    return _get(model_path(model, version, "ready"), _flag)


def _server_metadata() -> _Call[Any]:
    return _get("/v2", _decoded(lambda a: proto_of(a.body, protos.ServerMetadataResponse)))


def _model_metadata(model: str, version: str) -> _Call[ModelMetadata]:
    return _get(model_path(model, version), _decoded(lambda a: metadata_of(a.body)))


def _model_config(model: str, version: str) -> _Call[Any]:
    return _get(model_path(model, version, "config"), _decoded(lambda a: proto_of(a.body, protos.ModelConfig)))


def _statistics(model: str, version: str) -> _Call[Any]:
    path = model_path(model, version, "stats") if model else "/v2/models/stats"
    return _get(path, _decoded(lambda a: proto_of(a.body, protos.ModelStatisticsResponse)))


def _index(ready_only: bool) -> _Call[Any]:
    body = json.dumps({"ready": True} if ready_only else {}).encode()
    return _Call("POST", "/v2/repository/index", _decoded(lambda a: index_of(a.body)), body, _JSON)


def _load(model: str, config_json: str | None, files: Mapping[str, bytes] | None) -> _Call[None]:
    path = f"/v2/repository/models/{quote(model, safe='')}/load"
    return _Call("POST", path, _done, load_body(config_json, files), _JSON)


def _unload(model: str) -> _Call[None]:
    path = f"/v2/repository/models/{quote(model, safe='')}/unload"
    return _Call("POST", path, _done, b"{}", _JSON)


def _done(answer: Answer) -> None:
    _ok(answer)


_JSON = {"Content-Type": "application/json"}


def _past_deadline(exc: InferenceServerError, start: float, timeout_s: float | None) -> InferenceServerError:
    """A call that failed once its deadline had passed is DEADLINE_EXCEEDED, as over gRPC: the server's
    HTTP status cannot say it (it answers an expired request 503, as it does when unavailable)."""
    if timeout_s is None or exc.code == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() - start < timeout_s:
        return exc
    return InferenceServerError(grpc.StatusCode.DEADLINE_EXCEEDED, exc.message, exc.http_status)


class HttpApi:
    """The sync client's calls over HTTP/1.1 keep-alive connections."""

    def __init__(
        self,
        url: str,
        tls: Tls | None,
        headers: Headers,
        timeout_s: float | None,
        max_message_bytes: int,
        binary: bool = True,
    ) -> None:
        endpoint = parse_url(url)
        if tls is not None and not endpoint.tls:
            raise ValueError(f"TLS options with {url!r}: use an https:// URL")
        self._transport = SyncTransport(endpoint, tls, headers, max_message_bytes)
        self._timeout_s = timeout_s
        self._binary = binary

    def _send(self, call: _Call[T], timeout_s: float | None = None) -> T:
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        start = time.monotonic()
        try:
            return call.read(self._transport.request(call.method, call.path, call.body, call.headers, timeout))
        except InferenceServerError as exc:
            raise _past_deadline(exc, start, timeout) from None

    def close(self) -> None:
        self._transport.close()

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        version: str,
        timeout_s: float | None,
        request_id: str,
        parameters: dict[str, ParamValue] | None,
    ) -> Arrays:
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        return self._send(
            _infer(model, inputs, outputs, version, timeout, request_id, parameters, self._binary), timeout
        )

    def is_server_live(self) -> bool:
        return self._send(_live())

    def is_server_ready(self) -> bool:
        return self._send(_ready())

    def is_model_ready(self, model: str, version: str) -> bool:
        return self._send(_model_ready(model, version))

    def server_metadata(self) -> Any:
        return self._send(_server_metadata())

    def model_metadata(self, model: str, version: str) -> ModelMetadata:
        return self._send(_model_metadata(model, version))

    def model_config(self, model: str, version: str) -> Any:
        return self._send(_model_config(model, version))

    def model_statistics(self, model: str, version: str) -> Any:
        return self._send(_statistics(model, version))

    def repository_index(self, ready_only: bool) -> Any:
        return self._send(_index(ready_only))

    def load_model(
        self, model: str, config_json: str | None, files: Mapping[str, bytes] | None, timeout_s: float | None
    ) -> None:
        self._send(_load(model, config_json, files), timeout_s)

    def unload_model(self, model: str, timeout_s: float | None) -> None:
        self._send(_unload(model), timeout_s)


class AsyncHttpApi:
    """The asyncio client's calls over aiohttp's keep-alive connections (concurrent calls each take one)."""

    def __init__(
        self,
        url: str,
        tls: Tls | None,
        headers: Headers,
        timeout_s: float | None,
        max_message_bytes: int,
        binary: bool = True,
    ) -> None:
        endpoint = parse_url(url)
        if tls is not None and not endpoint.tls:
            raise ValueError(f"TLS options with {url!r}: use an https:// URL")
        self._transport = AsyncTransport(endpoint, tls, headers, max_message_bytes)
        self._timeout_s = timeout_s
        self._binary = binary

    async def _send(self, call: _Call[T], timeout_s: float | None = None) -> T:
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        start = time.monotonic()
        try:
            return call.read(await self._transport.request(call.method, call.path, call.body, call.headers, timeout))
        except InferenceServerError as exc:
            raise _past_deadline(exc, start, timeout) from None

    async def close(self) -> None:
        await self._transport.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        version: str,
        timeout_s: float | None,
        request_id: str,
        parameters: dict[str, ParamValue] | None,
    ) -> Arrays:
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        return await self._send(
            _infer(model, inputs, outputs, version, timeout, request_id, parameters, self._binary), timeout
        )

    async def is_server_live(self) -> bool:
        return await self._send(_live())

    async def is_server_ready(self) -> bool:
        return await self._send(_ready())

    async def is_model_ready(self, model: str, version: str) -> bool:
        return await self._send(_model_ready(model, version))

    async def model_metadata(self, model: str, version: str) -> ModelMetadata:
        return await self._send(_model_metadata(model, version))

    async def model_config(self, model: str, version: str) -> Any:
        return await self._send(_model_config(model, version))

    async def load_model(self, model: str, config_json: str | None, files: Mapping[str, bytes] | None) -> None:
        await self._send(_load(model, config_json, files))

    async def unload_model(self, model: str) -> None:
        await self._send(_unload(model))
