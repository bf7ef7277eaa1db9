"""The gRPC server: the inference service, health checking and reflection on one ``grpc.aio`` server.

Lifecycle: ``start()`` binds the port (ServerLive answers from here), loads the models, then marks the
server ready; ``stop()`` refuses new calls, lets in-flight ones finish within the grace period, then
unloads the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from rapidserve import protos
from rapidserve.server.access import RestrictionInterceptor
from rapidserve.server.admission import Admission
from rapidserve.server.cache import PredictionCache
from rapidserve.server.health import HealthService
from rapidserve.server.manager import ModelManager
from rapidserve.server.ports import bare_host, bind_error, check_bindable, host_port
from rapidserve.server.reflection import Reflection
from rapidserve.server.servicer import InferenceServicer
from rapidserve.server.settings import ServerSettings, TlsSettings
from rapidserve.server.stats import ServerStats
from rapidserve.server.transport import CONTROL_REQUEST_BYTES, health_handler, inference_handler

__all__ = ["InferenceServer"]

# Health requests are tiny: room for a few of the largest messages at once keeps probes answering even
# while someone sends them large bodies (which cost at most this many messages of memory), and a
# health request whose body has not come in this many seconds gives its room back.
HEALTH_BUDGET_MESSAGES = 8
HEALTH_READ_S = 2.0

log = logging.getLogger(__name__)


def build_manager(settings: ServerSettings, on_change: Callable[[], None] | None = None) -> ModelManager:
    """The model manager the settings describe (in the one process, or in the engine process)."""
    return ModelManager(
        list(settings.model_repositories),
        control_mode=settings.model_control_mode,
        load_models=settings.load_models,
        poll_secs=settings.repository_poll_secs,
        load_threads=settings.model_load_threads,
        batching_mode=settings.batching_mode,
        cache=_cache(settings),
        on_change=on_change,
        uploads=settings.uploads,
        max_message_bytes=settings.grpc_max_message_bytes,
        # the names are what RepositoryIndex and metadata tell: not to callers those are closed to
        name_loaded_models=not any(
            {"metadata", "model-repository"} & set(protocols)
            for protocols, _, _ in (*settings.restricted_protocols, *settings.http_restricted_api)
        ),
    )


def _cache(settings: ServerSettings) -> PredictionCache | None:
    """The prediction cache: the in-process LRU (of size 0 when only Redis is asked for), and Redis behind it."""
    if settings.cache_redis_url is None:
        return PredictionCache(settings.cache_size_bytes) if settings.cache_size_bytes > 0 else None
    from rapidserve.server.cache_l2 import SharedCache

    shared = SharedCache(settings.cache_redis_url, settings.cache_redis_ttl_s, settings.cache_redis_timeout_ms / 1000)
    return PredictionCache(settings.cache_size_bytes, shared)


class InferenceServer:
    """The whole server in one process; or, given the ``manager`` of a front-end process
    (``frontend.remote.RemoteManager``), one of the front ends that share the ports."""

    def __init__(self, settings: ServerSettings, manager: Any = None) -> None:
        self.settings = settings
        self.frontend = manager is not None  # ports shared with the other front ends; /metrics is the engine's
        self.manager = manager if manager is not None else build_manager(settings, self._readiness_changed)
        if manager is not None:
            manager.on_change = self._readiness_changed
        self._server: grpc.aio.Server | None = None
        self._follow_readiness = False  # health tracks ServerReady once the startup models are in
        self._health = HealthService()
        self.stats = ServerStats()
        self._metrics: Any = None
        self._certificates: _Certificates | None = None
        self._servicer: InferenceServicer | None = None
        self.admissions: tuple[Admission | None, Admission | None] = (None, None)
        self.abandoned_loads: list[str] = []  # model loads still running when stop() gave up on them
        self._http: Any = None  # rapidserve.server.http.HttpServer once started
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0

    async def start(self) -> None:
        settings = self.settings
        interceptors = [RestrictionInterceptor(settings.restricted_protocols)] if settings.restricted_protocols else []
        server = grpc.aio.server(options=grpc_server_options(settings, self.frontend), interceptors=interceptors)
        admission = health = None  # no budget: requests are read as they come
        if settings.max_inflight_bytes:
            limits = (settings.grpc_max_message_bytes, settings.grpc_request_read_timeout_s)
            admission = Admission(settings.max_inflight_bytes, *limits)
            # health checks read from a budget of their own: a probe must not wait behind inference data
            health_limits = (settings.grpc_max_message_bytes, min(settings.grpc_request_read_timeout_s, HEALTH_READ_S))
            health = Admission(
                HEALTH_BUDGET_MESSAGES * settings.grpc_max_message_bytes, *health_limits, "the health budget"
            )
        self.admissions = (admission, health)  # (inference and the rest, health checks); None: no budget
        self._servicer = InferenceServicer(
            self.manager, stats=self.stats, admission=admission, max_response_bytes=settings.grpc_max_message_bytes
        )
        services = (protos.SERVICE_NAME, protos.HEALTH_SERVICE_NAME, *protos.REFLECTION_SERVICE_NAMES)
        server.add_generic_rpc_handlers(
            (
                inference_handler(self._servicer, admission, health, _load_request_bytes(settings)),
                health_handler(self._health, health),
                *Reflection(protos.FILES, services, admission).handlers(),
            )
        )
        self.port = self._bind(server)
        self._set_health(False)
        self._server = server
        await server.start()
        log.log(
            logging.DEBUG if self.frontend else logging.INFO,
            "gRPC server listening on %s%s",
            host_port(settings.host, self.port),
            " (TLS)" if settings.tls else "",
        )
        if settings.http_enabled:
            self.http_port = await self._start_http(admission, health)
        if settings.metrics_enabled and not self.frontend:
            from rapidserve.server.metrics import MetricsServer  # prometheus_client loads only when used

            self._metrics = MetricsServer(self.manager, self.stats)
            metrics_host = bare_host(settings.metrics_host or settings.host)
            self.metrics_port = await self._metrics.start(metrics_host, settings.metrics_port)
            log.info("Prometheus metrics at http://%s/metrics", host_port(metrics_host, self.metrics_port))
        await self.manager.start()
        self._follow_readiness = True
        self._set_health(self.manager.ready)
        if self.frontend:
            return  # (readiness is the engine process's to report)
        if self.manager.ready:
            log.info("server ready")
        else:
            log.error("not every startup model loaded: the server stays live but not ready")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: readiness and health go NOT_SERVING first; new calls and new requests on open streams
        get UNAVAILABLE (HTTP: the port closes, requests on open connections get 503); requests already
        accepted finish (within the grace period), then the models are unloaded. Returns as soon as the
        last accepted request is answered."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self._follow_readiness = False  # the unloads below must not turn health back on
        if self._servicer is not None:
            self._servicer.drain()
        self._set_health(False)  # (health Watch streams hear it)
        if self._http is not None:
            self._http.drain()
        if self._server is not None:
            # the servicer refuses new inference requests from now on; gRPC is stopped once, after the
            # accepted ones are answered (two overlapping stops can crash gRPC's core)
            accepted = [self._servicer.idle()] if self._servicer is not None else []
            if self._http is not None:
                accepted.append(self._http.idle())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*accepted), grace)
            await self._server.stop(0)  # what is left (health Watch, reflection) need not finish
        if self._http is not None:
            await self._http.stop()
        self.abandoned_loads = await self.manager.stop(max(deadline - time.monotonic(), 1.0))
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)

    def reload_certificates(self) -> None:
        """Re-read the TLS certificate and key files (SIGHUP); connections made from now on use them.
        Files that do not load are logged and the server keeps the certificates it has."""
        reloads = [("gRPC", self._certificates.reload)] if self._certificates is not None else []
        if self._http is not None and self.settings.http_tls is not None:
            reloads.append(("HTTP", self._http.reload_certificates))
        if not reloads:
            log.info("SIGHUP: no TLS configured, nothing to reload")
        for port, reload in reloads:
            try:
                reload()
            except (OSError, ValueError) as exc:
                log.error("%s TLS certificates not reloaded, the previous ones stay in use: %s", port, exc)
            else:
                log.info("%s TLS certificates reloaded; new connections use them", port)

    async def _start_http(self, admission: Admission | None, health: Admission | None) -> int:
        """Serve KServe v2 REST on the HTTP port, over the same manager, statistics and budgets as gRPC."""
        from rapidserve.server.http import HttpServer  # aiohttp loads only when HTTP is served
        from rapidserve.server.rest import RestApi

        settings = self.settings
        servicer = self._servicer
        api = RestApi(
            self.manager,
            self.stats,
            ready=lambda: self.manager.ready and not (servicer is not None and servicer.draining),
            max_message_bytes=settings.grpc_max_message_bytes,
        )
        load_limit = _http_load_request_bytes(settings)

        def limit_of(name: str | None, path: str) -> int:
            if name == "inference":
                return settings.grpc_max_message_bytes
            return load_limit if name == "model-repository" and path.endswith("/load") else CONTROL_REQUEST_BYTES

        self._http = HttpServer(
            api,
            settings,
            limit_of=limit_of,
            admission_of=lambda name: health if name == "health" else admission,
            refused=self.stats.failed,
            shared_port=self.frontend,
        )
        return int(await self._http.start())

    def _readiness_changed(self) -> None:
        """Models were loaded or unloaded: the health service follows ServerReady."""
        if not self._follow_readiness:
            return
        self._set_health(self.manager.ready)

    def _set_health(self, ready: bool) -> None:
        status = protos.HealthCheckResponse.SERVING if ready else protos.HealthCheckResponse.NOT_SERVING
        for service in ("", protos.SERVICE_NAME):
            self._health.set(service, status)

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind the gRPC port; a port that cannot be bound is one line naming it and the flag that moves it."""
        settings = self.settings
        names = (settings.host, settings.grpc_port, "gRPC", "--grpc-port", "--host")
        if not self.frontend:  # (a front end's port is already held by the engine process, for it to share)
            check_bindable(*names)
        address = host_port(settings.host, settings.grpc_port)
        try:
            if settings.tls is not None:
                self._certificates = _Certificates(settings.tls)
                port = server.add_secure_port(address, self._certificates.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio 1.60+ raises where older releases returned 0
            port = 0
        if port == 0:
            raise bind_error(*names)  # taken since the check
        return port


def _load_request_bytes(settings: ServerSettings) -> int:
    """The most a RepositoryModelLoad request may be: its config (at most 1 MiB), and its files where
    the server takes uploads."""
    uploads = settings.uploads.max_bytes if settings.uploads.allow_files else 0
    return min(2 * 2**20 + uploads, settings.grpc_max_message_bytes)


def _http_load_request_bytes(settings: ServerSettings) -> int:
    """A load's body over HTTP: its JSON config, and its files base64-encoded where uploads are allowed."""
    uploads = settings.uploads.max_bytes if settings.uploads.allow_files else 0
    return min(2 * 2**20 + uploads * 4 // 3 + 4, settings.grpc_max_message_bytes)


def grpc_server_options(settings: ServerSettings, shared_port: bool = False) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the server's limits and keepalive policy. ``shared_port``: one of
    several front-end processes on the port (SO_REUSEPORT, the engine process checked it was free)."""
    limit = settings.grpc_max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),  # checked from the message's length prefix, unread
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", int(shared_port)),  # otherwise a second server on a busy port must fail, not share it
        ("grpc.server_handshake_timeout_ms", max(int(settings.grpc_handshake_timeout_s * 1000), 1)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", max(int(settings.grpc_max_connection_idle_s * 1000), 1)),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", settings.grpc_http2_max_pings_without_data),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.grpc_http2_min_recv_ping_interval_without_data_ms),
        ("grpc.http2.max_ping_strikes", settings.grpc_http2_max_ping_strikes),
        # Without BDP probing a call's flow-control window opens only while the server is reading its
        # message, so requests the server has not admitted yet cannot fill its memory.
        ("grpc.http2.bdp_probe", 0),
    ]


class _Certificates:
    """The server's TLS credentials, swapped without a restart: gRPC asks ``_fetch`` at every new
    handshake (on one of its own threads), and gets the new configuration once after a reload."""

    def __init__(self, tls: TlsSettings) -> None:
        self._tls = tls
        self._initial = self._configuration()
        self._pending: Any = None
        self._lock = threading.Lock()  # reload() on the loop, _fetch() on gRPC's threads

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self._tls.mutual
        )

    def reload(self) -> None:
        configuration = self._configuration()
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> Any:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _configuration(self) -> Any:
        """The files, checked the way a TLS library will use them: the key must match the certificate
        (a half-done rotation is refused here rather than by every handshake)."""
        tls = self._tls
        key, cert = tls.server_key.read_bytes(), tls.server_cert.read_bytes()
        root = tls.root_cert.read_bytes() if tls.root_cert is not None else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(tls.server_cert, tls.server_key)
            if root is not None:
                context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"{tls.server_cert}, {tls.server_key}: not a matching PEM certificate and key ({exc})"
            ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)
