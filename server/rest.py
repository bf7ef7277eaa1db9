"""The KServe v2 REST API with Triton's extensions, independent of any HTTP server library.

The HTTP server builds a ``RestRequest``, awaits ``RestApi.handle`` and writes the ``RestResponse``. Every
endpoint goes to the same model manager, model versions (statistics, cache, batcher) and errors as
the gRPC servicer; answers that both edges give are built once (``rapidserve.server.replies``) and
rendered as JSON here. Errors answer ``{"error": "..."}`` with the status of ``http_status_of``.
Endpoints, as Triton routes them (src/http_server.cc):

    GET  /v2/health/live, /v2/health/ready           200, or 400 when not (empty body)
    GET  /v2                                          server metadata
    GET  /v2/models/{m}[/versions/{v}]                model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready          200, or 400 {"error": "Model version not ready"}
    GET  /v2/models/{m}[/versions/{v}]/config         the ModelConfig as JSON
    GET  /v2/models[/{m}[/versions/{v}]]/stats        the statistics extension's JSON
    POST /v2/models/{m}[/versions/{v}]/infer          JSON tensors and binary tensor data
    POST /v2/repository/index                         [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{m}/load, /unload      {"parameters": {...}}

An unknown path answers 404, a known one with another method 405, a repository name in the path 501
(Triton's "'repository_name' specification is not supported"), an unknown Content-Encoding 501.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rapidserve.common.errors import shown
from rapidserve.server import rest_codec
from rapidserve.server.compression import Unsupported, compress, decompress, response_encoding
from rapidserve.server.errors import EngineError, InvalidRequest, RapidServeError, TooLarge, Unavailable
from rapidserve.server.manager import ModelManager
from rapidserve.server.model import ModelVersion
from rapidserve.server.replies import as_json, load_arguments, model_metadata, server_metadata
from rapidserve.server.stats import ServerStats
from rapidserve.server.status import http_status_of, message_of, unexpected

__all__ = ["RestApi", "RestRequest", "RestResponse"]

# bodies (and answers) larger than this are parsed, decoded, encoded and compressed in a worker thread
OFF_LOOP_BYTES = 64 * 1024
SHUTTING_DOWN = "the server is shutting down"
_SUMMED_ELEMENTS = 1024  # a BYTES output of more elements is encoded off the loop without measuring it
_JSON = {"Content-Type": "application/json"}


@dataclass(slots=True)
class RestRequest:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes  # as received: still compressed when Content-Encoding says so
    deadline: float | None = None  # time.monotonic() after which the client no longer waits
    max_body_bytes: int | None = None  # the most the body may hold once decompressed; None: max_message_bytes


@dataclass(slots=True)
class RestResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(document: Any, status: int = 200) -> RestResponse:
    return RestResponse(status, json.dumps(document, separators=(",", ":")).encode("utf-8"), dict(_JSON))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> RestResponse:
    response = json_response({"error": message}, status)
    response.headers.update(headers or {})
    return response


@dataclass(frozen=True, slots=True)
class _Route:
    api: str  # Triton's restricted-API group
    method: str
    handler: Callable[..., Awaitable[RestResponse]]
    args: tuple[str, ...]


_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(ready|infer|config|stats))?")
_REPOSITORY = re.compile(r"/v2/repository(?:/([^/]+))?/(?:index|models/([^/]+)/(load|unload))")
_MODEL_KINDS = {
    None: ("metadata", "GET"),
    "ready": ("health", "GET"),
    "infer": ("inference", "POST"),
    "config": ("model-config", "GET"),
    "stats": ("statistics", "GET"),
}


class RestApi:
    """The endpoints over one model manager; ``ready`` is the server's readiness (ServerReady's)."""

    def __init__(
        self,
        manager: ModelManager,
        stats: ServerStats,
        *,
        ready: Callable[[], bool],
        max_message_bytes: int,
        server_name: str = "rapidserve",
    ) -> None:
        self._manager = manager
        self.stats = stats  # inference requests that named no loaded model
        self._ready = ready
        self.max_message_bytes = max_message_bytes
        self._server_name = server_name
        self.draining = False

    def drain(self) -> None:
        """Shutting down: readiness answers 400 and new inference requests 503."""
        self.draining = True

    def api_of(self, method: str, path: str) -> str | None:
        """Triton's restricted-API group of the endpoint at ``path``; None for an unknown path."""
        route = self._route(path)
        return None if route is None else route.api

    async def handle(self, request: RestRequest) -> RestResponse:
        """The answer to one request; never raises for anything a caller sends."""
        route = self._route(request.path)
        if route is None:
            return error_response(404, "Not Found")
        if request.method != route.method:
            return error_response(405, "Method Not Allowed", {"Allow": route.method})
        try:
            return await route.handler(request, *route.args)
        except Unsupported as exc:
            return error_response(501, message_of(exc), {"Accept-Encoding": "gzip, deflate"})
        except RapidServeError as exc:
            return error_response(http_status_of(exc), message_of(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return error_response(500, unexpected(f"HTTP {route.api}", exc))

    # -- routing -------------------------------------------------------------------------------

    def _route(self, path: str) -> _Route | None:
        if path == "/v2":
            return _Route("metadata", "GET", self._server_metadata, ())
        if path in ("/v2/health/live", "/v2/health/ready"):
            return _Route("health", "GET", self._health, (path.rpartition("/")[2],))
        if path == "/v2/models/stats":
            return _Route("statistics", "GET", self._statistics, ("", ""))
        match = _MODEL.fullmatch(path)
        if match is not None:
            name, version, kind = match.groups()
            api, method = _MODEL_KINDS[kind]
            handler = {
                None: self._model_metadata,
                "ready": self._model_ready,
                "infer": self._infer,
                "config": self._model_config,
                "stats": self._statistics,
            }[kind]
            return _Route(api, method, handler, (name, version or ""))  # the path is already percent-decoded
        match = _REPOSITORY.fullmatch(path)
        if match is not None:
            repository, name, action = match.groups()
            if action is None:
                return _Route("model-repository", "POST", self._index, (repository,))
            handler = self._load if action == "load" else self._unload
            return _Route("model-repository", "POST", handler, (repository, name))
        return None

    # -- health and metadata -------------------------------------------------------------------

    async def _health(self, request: RestRequest, kind: str) -> RestResponse:
        up = kind == "live" or (self._ready() and not self.draining)
        return RestResponse(200 if up else 400)

    async def _server_metadata(self, request: RestRequest) -> RestResponse:
        return json_response(as_json(server_metadata(self._server_name)))

    async def _model_metadata(self, request: RestRequest, name: str, version: str) -> RestResponse:
        return json_response(as_json(model_metadata(self._manager, name, version)))

    async def _model_ready(self, request: RestRequest, name: str, version: str) -> RestResponse:
        if self._manager.is_ready(name, version):
            return RestResponse(200)
        return error_response(400, "Model version not ready")

    async def _model_config(self, request: RestRequest, name: str, version: str) -> RestResponse:
        return json_response(as_json(self._manager.get(name, version).config))

    async def _statistics(self, request: RestRequest, name: str, version: str) -> RestResponse:
        return json_response(as_json(await self._manager.statistics(name, version)))

    # -- inference -----------------------------------------------------------------------------

    async def _infer(self, request: RestRequest, name: str, version: str) -> RestResponse:
        if self.draining:
            self.stats.failed(Unavailable.reason)
            raise Unavailable(SHUTTING_DOWN)
        model = self._model_for(name, version)
        try:
            if _heavy(request):  # inflate, parse and convert with the event loop free meanwhile
                with model.held():
                    decoded, choice = await asyncio.to_thread(self._decode, model, request, version)
            else:
                decoded, choice = self._decode(model, request, version)
        except RapidServeError as exc:
            model.rejected(exc)
            raise
        response = await model.infer(decoded)
        if _output_bytes(response.outputs.values()) > OFF_LOOP_BYTES:
            answer = await asyncio.to_thread(_encoded, response, choice)
        else:
            answer = _encoded(response, choice)
        if len(answer.body) > self.max_message_bytes:
            raise self._too_large(model, len(answer.body))
        encoding = response_encoding(request.headers.get("accept-encoding", ""))
        if encoding == "identity":
            return answer
        if len(answer.body) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(_compressed, answer, encoding)
        return _compressed(answer, encoding)

    def _too_large(self, model: ModelVersion, size: int) -> EngineError:
        """An answer larger than the server sends, counted against the model (gRPC's InferencePath.too_large)."""
        error = EngineError(
            f"model '{model.name}' produced a response of {size} bytes, more than the server sends "
            f"({self.max_message_bytes}, --grpc-max-message-bytes); ask for fewer outputs or a smaller batch"
        )
        model.rejected(error)
        return error

    def _model_for(self, name: str, version: str) -> ModelVersion:
        """The version a request names; failures count without a model label (as on gRPC)."""
        try:
            return self._manager.get(name, version)
        except RapidServeError as exc:
            self.stats.failed(exc.reason)
            raise

    def _decode(self, model: ModelVersion, request: RestRequest, version: str) -> tuple[Any, rest_codec.OutputChoice]:
        """``version`` as the path gave it ("" for the latest), so that a request sent on to an engine
        process is served by whichever version is the latest when it arrives there, as on gRPC."""
        body = self._body(request)
        header, binary = rest_codec.split_body(body, request.headers.get(rest_codec.HEADER_LENGTH))
        if len(header) > rest_codec.MAX_JSON_BYTES:  # parsed JSON holds many times its bytes in Python objects
            raise TooLarge(
                f"the JSON part of the request has {len(header)} bytes, more than {rest_codec.MAX_JSON_BYTES}; "
                "send large tensors as binary data (binary_data_size)"
            )
        document = rest_codec.parse_json(header, "inference request")
        return rest_codec.decode_infer_request(document, binary, model.spec, model.name, version, request.deadline)

    def _body(self, request: RestRequest) -> bytes | memoryview:
        limit = self.max_message_bytes if request.max_body_bytes is None else request.max_body_bytes
        return decompress(request.body, request.headers.get("content-encoding", ""), limit)

    # -- model repository ----------------------------------------------------------------------

    async def _document(self, request: RestRequest, what: str) -> dict[str, Any]:
        """A control request's JSON body ({} when empty), parsed off the loop when large."""
        if _heavy(request):
            document = await asyncio.to_thread(self._parse, request, what)
        else:
            document = self._parse(request, what)
        return document

    def _parse(self, request: RestRequest, what: str) -> dict[str, Any]:
        body = self._body(request)
        if not body:
            return {}
        document = rest_codec.parse_json(body, what)
        if not isinstance(document, dict):
            raise InvalidRequest(f"the {what} body must be a JSON object")
        return document

    async def _index(self, request: RestRequest, repository: str | None) -> RestResponse:
        if repository is not None:
            return _no_repository_names()
        document = await self._document(request, "repository index")
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidRequest("Invalid value for 'ready': expected a boolean")
        entries = []
        for entry in await self._manager.listing(ready_only=ready):
            item = {"name": entry.name}
            if entry.version:
                item["version"] = entry.version
            item["state"] = entry.state
            if entry.reason:
                item["reason"] = entry.reason
            entries.append(item)
        return json_response(entries)

    async def _load(self, request: RestRequest, repository: str | None, name: str) -> RestResponse:
        if repository is not None:
            return _no_repository_names()
        self._manager.check_load_allowed()  # before a caller's body is parsed
        document = await self._document(request, "load")
        parameters = _parameters_of(document)
        config, files = load_arguments(parameters.items(), len(parameters))
        for key, value in (("config", config), *((f"file:{path}", data) for path, data in files)):
            if not isinstance(value, str):
                raise InvalidRequest(f"load parameter '{shown(key)}' must be a string")
        if sum(len(data) for _, data in files) > OFF_LOOP_BYTES:
            uploads = await asyncio.to_thread(_base64_files, files)
        else:
            uploads = _base64_files(files)
        await self._manager.load(name, config_json=config, files=uploads)
        return RestResponse(200, b"", {})

    async def _unload(self, request: RestRequest, repository: str | None, name: str) -> RestResponse:
        if repository is not None:
            return _no_repository_names()
        document = await self._document(request, "unload")
        dependents = _parameters_of(document).get("unload_dependents", False)
        if not isinstance(dependents, bool):
            raise InvalidRequest("Unable to parse 'unload_dependents': expected a boolean")
        await self._manager.unload(name)
        return RestResponse(200, b"", {})


def _heavy(request: RestRequest) -> bool:
    """Whether a body is to be inflated and parsed off the event loop: a large one, or a compressed
    one (which may inflate to the message limit)."""
    encoding = request.headers.get("content-encoding", "")
    return len(request.body) > OFF_LOOP_BYTES or (encoding not in ("", "identity") and bool(request.body))


def _output_bytes(outputs: Iterable[np.ndarray[Any, Any]]) -> int:
    """About how many bytes the outputs hold: BYTES ones by their strings' lengths (nbytes counts pointers);
    a BYTES output of many elements counts as large without summing them (it is written an element at a time)."""
    total = 0
    for array in outputs:
        if array.dtype.kind != "O":
            total += array.nbytes
        elif array.size > _SUMMED_ELEMENTS:
            return OFF_LOOP_BYTES + 1
        else:
            total += sum(len(item) for item in array.flat if isinstance(item, (bytes, str)))
    return total


def _encoded(response: Any, choice: rest_codec.OutputChoice) -> RestResponse:
    encoded = rest_codec.encode_infer_response(response, choice)
    headers = {"Content-Type": encoded.content_type}
    if encoded.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(encoded.header_length)
    return RestResponse(200, encoded.body, headers)


def _compressed(answer: RestResponse, encoding: str) -> RestResponse:
    answer.body = compress(answer.body, encoding)
    answer.headers["Content-Encoding"] = encoding
    return answer


def _parameters_of(document: dict[str, Any]) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be a JSON object")
    return parameters


def _base64_files(files: list[tuple[str, str]]) -> dict[str, bytes]:
    """The ``file:`` parameters' contents, which travel base64-encoded in the JSON body."""
    decoded: dict[str, bytes] = {}
    for path, text in files:
        try:
            decoded[path] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"load parameter 'file:{shown(path)}' is not valid base64") from None
    return decoded


def _no_repository_names() -> RestResponse:
    return error_response(501, "'repository_name' specification is not supported")
