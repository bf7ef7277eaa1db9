"""The gRPC server: the inference service, health checking and reflection on one ``grpc.aio`` server.

Lifecycle: ``start()`` binds the port (ServerLive answers from here), loads the models, then marks the
server ready; ``stop()`` refuses new calls, lets in-flight ones finish within the grace period, then
unloads the models.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from rapidserve import protos
from rapidserve.server.cache import PredictionCache
from rapidserve.server.manager import ModelManager
from rapidserve.server.servicer import InferenceServicer, deserializer, serialize
from rapidserve.server.settings import ServerSettings
from rapidserve.server.stats import ServerStats

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)

_UNARY = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


class InferenceServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.manager = ModelManager(
            list(settings.model_repositories),
            control_mode=settings.model_control_mode,
            load_models=settings.load_models,
            poll_secs=settings.repository_poll_secs,
            load_threads=settings.model_load_threads,
            batching_mode=settings.batching_mode,
            cache=PredictionCache(settings.cache_size_bytes) if settings.cache_size_bytes > 0 else None,
            on_change=self._readiness_changed,
        )
        self._health_updates: set[asyncio.Task[None]] = set()
        self._server: grpc.aio.Server | None = None
        self._follow_readiness = False  # health tracks ServerReady once the startup models are in
        self._health = health_aio.HealthServicer()
        self.stats = ServerStats()
        self._metrics: Any = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        limit = self.settings.grpc_max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ]
        )
        server.add_generic_rpc_handlers((_inference_handler(InferenceServicer(self.manager, stats=self.stats)),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        _register_health_descriptor()
        reflection.enable_server_reflection(
            (protos.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
            pool=protos.POOL,
        )
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.grpc_port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.grpc_port}")
        await self._set_health(False)
        self._server = server
        await server.start()
        log.info("gRPC server listening on %s:%d", self.settings.host, self.port)
        if self.settings.metrics_enabled:
            from rapidserve.server.metrics import MetricsServer  # prometheus_client loads only when used

            self._metrics = MetricsServer(self.manager, self.stats)
            self.metrics_port = await self._metrics.start(self.settings.host, self.settings.metrics_port)
            log.info("Prometheus metrics at http://%s:%d/metrics", self.settings.host, self.metrics_port)
        await self.manager.start()
        self._follow_readiness = True
        await self._set_health(self.manager.ready)
        if self.manager.ready:
            log.info("server ready")
        else:
            log.error("not every startup model loaded: the server stays live but not ready")

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self._follow_readiness = False  # the unloads below must not turn health back on
        await self._set_health(False)
        if self._server is not None:
            await self._server.stop(grace)
        await self.manager.stop()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)

    def _readiness_changed(self) -> None:
        """Models were loaded or unloaded: the health service follows ServerReady."""
        if not self._follow_readiness:
            return
        task = asyncio.ensure_future(self._set_health(self.manager.ready))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", protos.SERVICE_NAME):
            await self._health.set(service, status)


def _inference_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    def serializers(rpc: str) -> dict[str, Any]:
        method = protos.SERVICE.methods_by_name[rpc]
        request = protos.message_class(method.input_type)
        response = protos.message_class(method.output_type)
        serializer = serialize if rpc in ("ModelInfer", "ModelStreamInfer") else response.SerializeToString
        return {"request_deserializer": deserializer(request), "response_serializer": serializer}

    handlers = {rpc: grpc.unary_unary_rpc_method_handler(getattr(servicer, rpc), **serializers(rpc)) for rpc in _UNARY}
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, **serializers("ModelStreamInfer")
    )
    return grpc.method_handlers_generic_handler(protos.SERVICE_NAME, handlers)


def _register_health_descriptor() -> None:
    """Reflection reads our private pool; give it the health service's file so it can describe it."""
    proto = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(proto)
    try:
        protos.POOL.FindFileByName(proto.name)
    except KeyError:
        protos.POOL.Add(proto)
