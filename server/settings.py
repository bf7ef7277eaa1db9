"""Server settings: one typed object, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServerSettings", "TlsSettings", "UploadPolicy", "parse_bytes"]

INT32_MAX = 2**31 - 1
MiB, GiB = 2**20, 2**30


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS on the gRPC port (Triton's ``--grpc-use-ssl*`` flags) or the HTTP port (``--http-use-ssl*``).
    The files are read at start and again on ``InferenceServer.reload_certificates()`` (SIGHUP)."""

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None  # CA that client certificates must chain to (mutual TLS)
    mutual: bool = False  # require and verify a client certificate


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """What ``RepositoryModelLoad`` may bring with it. By default nothing: a caller can only (re)load
    models already in the repository. Formats that run code when loaded (TorchScript, torch.export
    programs, TensorRT plans, anything torch unpickles) need their own opt-in."""

    allow_files: bool = False
    allow_code_models: bool = False
    max_bytes: int = GiB  # all files of one load together


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model_repositories: tuple[Path, ...]
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # 0 picks a free port (tests)
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
    model_load_threads: int = 4
    # the largest request or response message; over it a request is refused before its body is read
    grpc_max_message_bytes: int = 64 * MiB
    # request bytes admitted at once across all models and calls; over it RESOURCE_EXHAUSTED (0: no budget)
    max_inflight_bytes: int = GiB
    grace_period_s: float = 30.0
    batching_mode: str = "adaptive"  # adaptive | fixed (Triton's exact behaviour); a model may override
    cache_size_bytes: int = 256 * 2**20  # server-wide prediction cache; 0 disables it
    # a Redis shared by replicas as the cache's second level (redis:// or rediss:// URL); None: none
    cache_redis_url: str | None = None
    cache_redis_ttl_s: int = 300
    cache_redis_timeout_ms: float = 5.0
    metrics_port: int = 8002  # Prometheus /metrics; 0 picks a free port (tests)
    metrics_enabled: bool = True
    metrics_host: str | None = None  # None: the same address as the gRPC port (``host``)
    tls: TlsSettings | None = None
    # (protocols, header, value) groups of --grpc-restricted-protocol; see rapidserve.server.access
    restricted_protocols: tuple[tuple[tuple[str, ...], str, str], ...] = ()
    uploads: UploadPolicy = field(default_factory=UploadPolicy)
    # connections: a peer that has not finished the TLS/HTTP/2 handshake by then is closed
    grpc_handshake_timeout_s: float = 10.0
    grpc_keepalive_time_ms: int = 7_200_000  # Triton's defaults for its --grpc-keepalive-* flags
    grpc_keepalive_timeout_ms: int = 20_000
    grpc_keepalive_permit_without_calls: bool = False
    grpc_http2_max_pings_without_data: int = 2
    grpc_http2_min_recv_ping_interval_without_data_ms: int = 300_000
    grpc_http2_max_ping_strikes: int = 2
    grpc_max_concurrent_streams: int = 1024  # per connection
    # a connection with no call for this long is closed (GOAWAY; clients reconnect when they need to)
    grpc_max_connection_idle_s: float = 300.0
    # a request's message must arrive within this long of its call starting (bounds slow senders)
    grpc_request_read_timeout_s: float = 30.0
    # The KServe v2 HTTP/REST port (Triton's 8000; 0 picks a free port). It shares the message limit,
    # the in-flight budget and the read timeout above with gRPC.
    http_enabled: bool = True
    http_port: int = 8000
    http_host: str | None = None  # None: the same address as the gRPC port (``host``)
    http_tls: TlsSettings | None = None
    # (apis, header, value) groups of --http-restricted-api; the header is KEY itself (Triton's)
    http_restricted_api: tuple[tuple[tuple[str, ...], str, str], ...] = ()
    http_keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this long
    http_max_connections: int = 4096  # connections open at once; more are closed as they arrive
    # front-end processes (gRPC and HTTP edge) in front of this one, the engine process; 1: none, all in one
    frontends: int = 1
    # per front end and direction, the shared memory that tensors travel through (taken only as used)
    frontend_shm_bytes: int = 256 * MiB


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes. Raises ValueError naming the units."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number) :].lower()
    if unit not in _UNITS or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"not a size: {text!r}; use bytes or a suffix like 512KiB, 256MiB, 1GB")
    return int(float(number) * _UNITS[unit])
