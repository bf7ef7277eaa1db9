"""Access control by protocol group: Triton's ``--grpc-restricted-protocol=<protocols>:<key>=<value>``
(and ``--http-restricted-api``, whose groups are parsed and compared here too; there the header is ``<key>``).

A call to a restricted protocol must carry the header ``triton-grpc-protocol-<key>`` with exactly
``<value>`` (compared in constant time), or it ends PERMISSION_DENIED before its request is read.
Protocols without a group stay open. The protocol of each RPC is Triton's; server reflection counts as
``metadata``, and the standard gRPC health service as ``health``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "HEADER_PREFIX",
    "PROTOCOLS",
    "Restriction",
    "RestrictionInterceptor",
    "check_groups",
    "matches",
    "parse_restriction",
    "protocol_of",
]

HEADER_PREFIX = "triton-grpc-protocol-"
PROTOCOLS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

_INFERENCE_RPCS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
_SERVICES = {
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "metadata",
    "grpc.reflection.v1.ServerReflection": "metadata",
}

Restriction = tuple[tuple[str, ...], str, str]  # (protocols, header key without the prefix, value)


def protocol_of(method: str) -> str | None:
    """The protocol group of a full method path (``/inference.GRPCInferenceService/ModelInfer``)."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    if service == "inference.GRPCInferenceService":
        return _INFERENCE_RPCS.get(rpc)
    return _SERVICES.get(service)


def parse_restriction(text: str) -> Restriction:
    """``inference,health:key=value`` -> ((protocols), key, value). A value ``@FILE`` is read from
    FILE (trailing newline stripped), so that the secret never shows in a process listing."""
    protocols, sep, header = text.partition(":")
    key, eq, value = header.partition("=")
    if not sep or not eq or not key.strip():
        raise ValueError(f"expected PROTOCOLS:KEY=VALUE, got {text!r}")
    names = tuple(p.strip() for p in protocols.split(",") if p.strip())
    unknown = [p for p in names if p not in PROTOCOLS]
    if not names or unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; expected {', '.join(PROTOCOLS)}")
    key = key.strip().lower()
    if any(c.isspace() or c in ":=" for c in key) or not key.isascii():
        raise ValueError(f"header key {key!r} must be plain ASCII without spaces")
    if value.startswith("@"):
        value = Path(value[1:]).read_text(encoding="utf-8").rstrip("\r\n")
    if not value:
        raise ValueError(f"empty value for header '{key}' of protocols {', '.join(names)}")
    return names, key, value


def check_groups(groups: Iterable[Restriction], flag: str = "--grpc-restricted-protocol") -> None:
    """Each protocol may belong to one group only (as in Triton)."""
    seen: set[str] = set()
    for protocols, _, _ in groups:
        for protocol in protocols:
            if protocol in seen:
                raise ValueError(f"protocol '{protocol}' is in more than one {flag} group")
            seen.add(protocol)


class RestrictionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to restricted protocols that lack their header, before the request is read."""

    def __init__(self, groups: Sequence[Restriction]) -> None:
        check_groups(groups)
        self._required: dict[str, tuple[str, bytes]] = {}
        for protocols, key, value in groups:
            for protocol in protocols:
                self._required[protocol] = (HEADER_PREFIX + key, value.encode())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        protocol = protocol_of(details.method)
        required = self._required.get(protocol) if protocol is not None else None
        if required is None or _has(details.invocation_metadata, *required):
            return await continuation(details)
        return _denied(f"the '{protocol}' protocol needs the header '{required[0]}' with this server's value")


def _has(metadata: Any, header: str, value: bytes) -> bool:
    given = (v if isinstance(v, bytes) else str(v).encode() for k, v in metadata or () if k == header)
    return matches(given, value)


def matches(given: Iterable[bytes], value: bytes) -> bool:
    """Whether one of the header values ``given`` is ``value``, compared in constant time (every value
    is compared: no early exit)."""
    found = False
    for data in given:
        found |= hmac.compare_digest(data, value)
    return found


def _denied(message: str) -> grpc.RpcMethodHandler:
    # A stream-unary handler never reads the request: a refused caller cannot make the server buffer it.
    async def deny(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    return grpc.stream_unary_rpc_method_handler(deny)
