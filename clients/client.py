"""Python clients for any KServe v2 server (rapidserve, Triton): numpy in, numpy out, over gRPC or HTTP.

``Client`` is synchronous; ``AsyncClient`` is for asyncio and by default multiplexes concurrent
``infer`` calls over one persistent ``ModelStreamInfer`` stream, which costs the server about a third
of a unary call's CPU. Every failure raises ``InferenceServerError`` carrying the gRPC status code.
Both speak plaintext or TLS (mutual TLS too), with tritonclient's option names, and can send headers
with every call (e.g. the ``triton-grpc-protocol-<key>`` a server's restricted protocols ask for).

A URL that starts with ``http://`` or ``https://`` speaks the KServe v2 REST protocol instead (tensors
as Triton's binary tensor data, both ways), with the same methods, results and errors
(``rapidserve.clients._http_api``); ``https://`` is TLS with the same options.

Several gRPC servers (replicas), as ``"host1:8001,host2:8001"`` or a list, are called in turn: each call
goes to the next server, as gRPC's ``round_robin`` policy does, so statistics and model control reach one
replica each (use one client per server for those); ``AsyncClient`` keeps a stream per server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rapidserve import protos
from rapidserve.clients._http_api import AsyncHttpApi, HttpApi, is_http_url
from rapidserve.clients._multiplexer import Multiplexer, grpc_error
from rapidserve.clients.connection import channel, check_headers, servers, tls
from rapidserve.clients.types import Arrays, InferenceServerError, ModelMetadata
from rapidserve.common import codec
from rapidserve.common.types import ParamValue, TensorSpec

__all__ = ["AsyncClient", "Client", "InferenceServerError", "ModelMetadata"]

INT32_MAX = 2**31 - 1


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def _stubs(channel: Any) -> dict[str, Any]:
    stubs = {}
    for method in protos.SERVICE.methods:
        request = protos.message_class(method.input_type)
        response = protos.message_class(method.output_type)
        factory = channel.stream_stream if method.client_streaming else channel.unary_unary
        stubs[method.name] = factory(
            protos.method_path(method.name),
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
    return stubs


def _metadata(response: Any) -> ModelMetadata:
    def specs(tensors: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

    return ModelMetadata(
        response.name, tuple(response.versions), response.platform, specs(response.inputs), specs(response.outputs)
    )


def _grpc_only(binary_data: bool) -> None:
    """Options that only HTTP has are refused for a gRPC address rather than ignored."""
    if not binary_data:
        raise ValueError("binary_data=False (JSON tensors) applies to http:// and https:// URLs only")


def _load_request(model: str, config_json: str | None, files: Mapping[str, bytes] | None) -> Any:
    request = protos.RepositoryModelLoadRequest(model_name=model)
    if config_json:
        request.parameters["config"].string_param = config_json
    for path, data in (files or {}).items():
        request.parameters[f"file:{path}"].bytes_param = data
    return request


class Client:
    """Synchronous client. ``timeout_s`` (per client, or per call) becomes the gRPC deadline.

    TLS: ``ssl=True`` verifies the server's certificate against ``root_certificates`` (a PEM file;
    default: the system's CAs) and, for mutual TLS, presents ``certificate_chain`` with its
    ``private_key`` (PEM files, read once here); ``ssl_target_name`` is the name the server's
    certificate must carry when it is not the URL's host. ``headers`` go with every call as gRPC
    metadata (text values; names are lower-cased). A bad option raises ``ValueError`` here.

    ``url`` ``http://host:8000`` (or ``https://``) calls the server's HTTP/REST endpoint instead: the
    same methods, results and errors; ``timeout_s`` is then the socket timeout and the request's
    ``timeout`` parameter, and keep-alive connections are reused between calls. Tensors travel as
    Triton's binary tensor data both ways; ``binary_data=False`` sends and asks for JSON ``data`` instead.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "localhost:8001",
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = INT32_MAX,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        ssl_target_name: str | None = None,
        headers: Mapping[str, str] | None = None,
        binary_data: bool = True,
    ) -> None:
        self._tls = tls(ssl, root_certificates, private_key, certificate_chain, ssl_target_name)
        self._metadata = check_headers(headers) or None
        self._timeout_s = timeout_s
        urls = servers(url)
        self._http = (
            HttpApi(urls[0], self._tls, self._metadata or (), timeout_s, max_message_bytes, binary_data)
            if is_http_url(urls[0])
            else _grpc_only(binary_data)
        )
        if self._http is None:
            self._channels = [channel(u, self._tls, _channel_options(max_message_bytes)) for u in urls]
            self._stubs = [_stubs(c) for c in self._channels]
            self._turn = itertools.count()  # call i goes to server i mod n

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        else:
            for grpc_channel in self._channels:
                grpc_channel.close()

    def _call(self, rpc: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return self._stubs[next(self._turn) % len(self._stubs)][rpc](
                request, timeout=timeout_s if timeout_s is not None else self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise grpc_error(exc, self._tls) from None

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str] = (),
        *,
        version: str = "",
        timeout_s: float | None = None,
        request_id: str = "",
        parameters: dict[str, ParamValue] | None = None,
    ) -> Arrays:
        """Run one request; returns the outputs by name (all of them unless ``outputs`` names some)."""
        if self._http is not None:
            return self._http.infer(model, inputs, outputs, version, timeout_s, request_id, parameters)
        request = codec.encode_request(
            model, dict(inputs), outputs, model_version=version, request_id=request_id, parameters=parameters
        )
        return codec.decode_response(self._call("ModelInfer", request, timeout_s))

    def is_server_live(self) -> bool:
        if self._http is not None:
            return self._http.is_server_live()
        return bool(self._call("ServerLive", protos.ServerLiveRequest()).live)

    def is_server_ready(self) -> bool:
        if self._http is not None:
            return self._http.is_server_ready()
        return bool(self._call("ServerReady", protos.ServerReadyRequest()).ready)

    def is_model_ready(self, model: str, version: str = "") -> bool:
        if self._http is not None:
            return self._http.is_model_ready(model, version)
        return bool(self._call("ModelReady", protos.ModelReadyRequest(name=model, version=version)).ready)

    def server_metadata(self) -> Any:
        if self._http is not None:
            return self._http.server_metadata()
        return self._call("ServerMetadata", protos.ServerMetadataRequest())

    def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        if self._http is not None:
            return self._http.model_metadata(model, version)
        return _metadata(self._call("ModelMetadata", protos.ModelMetadataRequest(name=model, version=version)))

    def model_config(self, model: str, version: str = "") -> Any:
        """The model's ``ModelConfig`` protobuf, as the server completed it."""
        if self._http is not None:
            return self._http.model_config(model, version)
        return self._call("ModelConfig", protos.ModelConfigRequest(name=model, version=version)).config

    def model_statistics(self, model: str = "", version: str = "") -> Any:
        if self._http is not None:
            return self._http.model_statistics(model, version)
        return self._call("ModelStatistics", protos.ModelStatisticsRequest(name=model, version=version))

    def repository_index(self, ready_only: bool = False) -> Any:
        if self._http is not None:
            return self._http.repository_index(ready_only)
        return self._call("RepositoryIndex", protos.RepositoryIndexRequest(ready=ready_only)).models

    def load_model(
        self,
        model: str,
        config_json: str | None = None,
        files: Mapping[str, bytes] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Load or reload a model; ``files`` maps ``<version>/<file name>`` to model file bytes
        (``config_json`` is then required), like tritonclient's ``load_model``."""
        if self._http is not None:
            return self._http.load_model(model, config_json, files, timeout_s)
        self._call("RepositoryModelLoad", _load_request(model, config_json, files), timeout_s)

    def unload_model(self, model: str, timeout_s: float | None = None) -> None:
        if self._http is not None:
            return self._http.unload_model(model, timeout_s)
        self._call("RepositoryModelUnload", protos.RepositoryModelUnloadRequest(model_name=model), timeout_s)


class AsyncClient:
    """asyncio client. With ``streaming=True`` (the default) ``infer`` calls share one persistent
    ``ModelStreamInfer`` stream, matched to their answers by request id; ``streaming=False`` makes
    each ``infer`` a unary call. Use as ``async with AsyncClient(url) as client``.

    ``ssl``, ``root_certificates``, ``private_key``, ``certificate_chain``, ``ssl_target_name`` and
    ``headers`` as for ``Client``; the headers go with every unary call and with the stream.
    An ``http://`` or ``https://`` URL calls the HTTP/REST endpoint as for ``Client`` (``streaming`` then
    does not apply: concurrent calls each use a keep-alive connection of aiohttp's pool).
    """

    def __init__(
        self,
        url: str | Sequence[str] = "localhost:8001",
        *,
        timeout_s: float | None = None,
        streaming: bool = True,
        max_message_bytes: int = INT32_MAX,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        ssl_target_name: str | None = None,
        headers: Mapping[str, str] | None = None,
        binary_data: bool = True,
    ) -> None:
        self._tls = tls(ssl, root_certificates, private_key, certificate_chain, ssl_target_name)
        self._metadata = check_headers(headers) or None
        self._timeout_s = timeout_s
        urls = servers(url)
        self._http = (
            AsyncHttpApi(urls[0], self._tls, self._metadata or (), timeout_s, max_message_bytes, binary_data)
            if is_http_url(urls[0])
            else _grpc_only(binary_data)
        )
        if self._http is None:
            self._channels = [channel(u, self._tls, _channel_options(max_message_bytes), aio=True) for u in urls]
            self._stubs = [_stubs(c) for c in self._channels]
            self._turn = itertools.count()  # call i goes to server i mod n
        self._streaming = streaming
        self._streams: list[Multiplexer | None] = [None] * len(urls)  # one per server, opened when first used

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            return
        for stream in self._streams:
            if stream is not None:
                await stream.close()
        for grpc_channel in self._channels:
            await grpc_channel.close()

    async def _call(self, rpc: str, request: Any, timeout_s: float | None = None, server: int | None = None) -> Any:
        """``rpc`` on ``server`` (an index), by default the next server in turn."""
        if server is None:
            server = next(self._turn) % len(self._stubs)
        try:
            return await self._stubs[server][rpc](
                request, timeout=timeout_s if timeout_s is not None else self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise grpc_error(exc, self._tls) from None

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str] = (),
        *,
        version: str = "",
        timeout_s: float | None = None,
        request_id: str = "",
        parameters: dict[str, ParamValue] | None = None,
    ) -> Arrays:
        if self._http is not None:
            return await self._http.infer(model, inputs, outputs, version, timeout_s, request_id, parameters)
        request = codec.encode_request(
            model, dict(inputs), outputs, model_version=version, request_id=request_id, parameters=parameters
        )
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        if not self._streaming:
            return codec.decode_response(await self._call("ModelInfer", request, timeout))
        if timeout is not None and "timeout" not in request.parameters:
            # a stream has no per-message deadline: the server reads this one as the request's
            request.parameters["timeout"].int64_param = max(int(timeout * 1e6), 1)
        server = next(self._turn) % len(self._stubs)
        stream = self._streams[server]
        if stream is None or stream.broken:
            stub = self._stubs[server]["ModelStreamInfer"]
            stream = self._streams[server] = Multiplexer(stub, self._metadata, self._tls)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            return codec.decode_response(await stream.send(request, timeout))
        except InferenceServerError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                self._streaming = False  # the server has no ModelStreamInfer: unary from now on
            elif not stream.status_lost:
                raise
            # Lost: the stream ended at once, before any answer, and grpc.aio hid the server's status.
            # Asked again unary, on the same server, within what is left of the timeout (a request the
            # server did read before ending the stream may run twice: inference has no side effects).
        if deadline is not None:
            timeout = deadline - loop.time()
            if timeout <= 0:
                raise InferenceServerError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            if (parameters or {}).get("timeout") is None:
                del request.parameters["timeout"]
        return codec.decode_response(await self._call("ModelInfer", request, timeout, server))  # (its turn still)

    async def is_server_live(self) -> bool:
        if self._http is not None:
            return await self._http.is_server_live()
        return bool((await self._call("ServerLive", protos.ServerLiveRequest())).live)

    async def is_server_ready(self) -> bool:
        if self._http is not None:
            return await self._http.is_server_ready()
        return bool((await self._call("ServerReady", protos.ServerReadyRequest())).ready)

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        if self._http is not None:
            return await self._http.is_model_ready(model, version)
        return bool((await self._call("ModelReady", protos.ModelReadyRequest(name=model, version=version))).ready)

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        if self._http is not None:
            return await self._http.model_metadata(model, version)
        return _metadata(await self._call("ModelMetadata", protos.ModelMetadataRequest(name=model, version=version)))

    async def model_config(self, model: str, version: str = "") -> Any:
        if self._http is not None:
            return await self._http.model_config(model, version)
        return (await self._call("ModelConfig", protos.ModelConfigRequest(name=model, version=version))).config

    async def load_model(
        self, model: str, config_json: str | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        if self._http is not None:
            return await self._http.load_model(model, config_json, files)
        await self._call("RepositoryModelLoad", _load_request(model, config_json, files))

    async def unload_model(self, model: str) -> None:
        if self._http is not None:
            return await self._http.unload_model(model)
        await self._call("RepositoryModelUnload", protos.RepositoryModelUnloadRequest(model_name=model))
