"""The standard gRPC health service (``grpc.health.v1.Health``) from our own descriptors.

Check answers the status set for a service name, and NOT_FOUND for a name never set; Watch sends the
current status (SERVICE_UNKNOWN for such a name) and then every change, until the call ends. The
server sets ``""`` and the inference service, both following ServerReady. Watchers share one event,
so a caller naming services that do not exist leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from rapidserve import protos

__all__ = ["MAX_REQUEST_BYTES", "MAX_WATCHERS", "HealthService"]

# Watch streams open at once; more are refused (RESOURCE_EXHAUSTED) rather than held
MAX_WATCHERS = 1024
# A health request names one service (fully-qualified gRPC service names are far shorter); a larger
# one is refused unparsed, so open watchers hold at most MAX_WATCHERS x this much
MAX_REQUEST_BYTES = 1024

_Status = int  # a protos.HealthCheckResponse.ServingStatus value


class HealthService:
    def __init__(self) -> None:
        self._statuses: dict[str, _Status] = {}
        self._changed = asyncio.Event()  # set, then replaced, at every change
        self.watchers = 0

    def set(self, service: str, status: _Status) -> None:
        """Record ``status`` for ``service``; watchers hear of it if it changed."""
        if self._statuses.get(service) == status:
            return
        self._statuses[service] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self, service: str) -> _Status | None:
        return self._statuses.get(service)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return protos.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if self.watchers >= MAX_WATCHERS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} health watchers are open; retry later"
            )
        self.watchers += 1
        try:
            sent: _Status | None = None
            while True:
                changed = self._changed  # taken before reading, so no change is missed
                status = self._statuses.get(request.service, protos.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != sent:
                    yield protos.HealthCheckResponse(status=status)
                    sent = status
                await changed.wait()
        finally:
            self.watchers -= 1
