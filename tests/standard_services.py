"""Clients of the standard gRPC health and reflection services made from rapidserve's own messages and
grpc's plain channel API, so the tests need neither grpcio-health-checking nor grpcio-reflection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from rapidserve import protos


def health_check(channel: grpc.Channel) -> Any:
    """``channel``'s Health/Check, called as ``check(protos.HealthCheckRequest(...), timeout=...)``."""
    return channel.unary_unary(
        f"/{protos.HEALTH_SERVICE_NAME}/Check",
        request_serializer=protos.HealthCheckRequest.SerializeToString,
        response_deserializer=protos.HealthCheckResponse.FromString,
    )


def health_watch(channel: grpc.Channel) -> Any:
    """``channel``'s Health/Watch: a call that returns an iterator of HealthCheckResponse."""
    return channel.unary_stream(
        f"/{protos.HEALTH_SERVICE_NAME}/Watch",
        request_serializer=protos.HealthCheckRequest.SerializeToString,
        response_deserializer=protos.HealthCheckResponse.FromString,
    )


def reflect(
    channel: grpc.Channel, requests: Iterable[Any], version: str = "v1alpha", timeout: float = 10
) -> Iterator[Any]:
    """One ServerReflectionInfo stream carrying ``requests``; yields the responses."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
        response_deserializer=protos.ServerReflectionResponse.FromString,
    )
    return call(iter(requests), timeout=timeout)
