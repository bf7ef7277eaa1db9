"""``rapidserve serve``: its options, the settings they make, and the run of the server until a signal."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidserve._options import choice, env, env_default, flag, frontends, size

__all__ = ["CommandError", "add_arguments", "serve", "settings_of"]

log = logging.getLogger("rapidserve")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class CommandError(Exception):
    """A failure the user can act on: the command prints its message on one line and exits non-zero."""


def add_arguments(serve: argparse.ArgumentParser) -> None:
    # Options that may be given several times read their environment variable only when no flag
    # gives them: a flag on the command line replaces the environment, it never adds to it.
    serve.add_argument(
        "--model-repository",
        action="append",
        default=None,
        help="Triton-layout model repository (repeatable); without one, the built-in demo",
    )
    serve.add_argument("--host", default=env("host", "0.0.0.0"), help="address of the gRPC port")
    _number(serve, "grpc-port", int, 8001, "the gRPC port (0: any free port)")
    _number(serve, "metrics-port", int, 8002, "Prometheus metrics at http://HOST:PORT/metrics (0: any free port)")
    serve.add_argument(
        "--metrics-host",
        default=env("metrics-host"),
        help="address of the metrics port (default: --host), e.g. 127.0.0.1 to keep /metrics off the network",
    )
    serve.add_argument(
        "--no-metrics",
        action="store_true",
        default=env_default("no-metrics", flag, False),
        help="serve no /metrics endpoint (statistics are still recorded for the ModelStatistics RPC)",
    )
    modes = ("none", "explicit", "poll")
    serve.add_argument(
        "--model-control-mode",
        choices=modes,
        type=choice(*modes),
        default=env_default("model-control-mode", choice(*modes), "none"),
        help="none: load every model at start; explicit: load the --load-model ones and take load/unload "
        "calls; poll: also reload what changes in the repository",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=None,
        help="model to load at start in explicit mode (repeatable; '*' = all)",
    )
    _bool_option(
        serve,
        "exit-on-error",
        "exit (status 1) when a model fails to load at start; false keeps serving the others, live but not ready",
        default="true",
    )
    _number(serve, "repository-poll-secs", float, 15, "seconds between repository scans in poll mode")
    _number(serve, "model-load-thread-count", int, 4, "threads that load models in parallel")
    _number(serve, "exit-timeout-secs", float, 30, "on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    batching = ("adaptive", "fixed")
    serve.add_argument(
        "--batching-mode",
        choices=batching,
        type=choice(*batching),
        default=env_default("batching-mode", choice(*batching), "adaptive"),
        help="adaptive (the default): wait for a fuller batch only while more requests are expected in time; "
        "fixed: Triton's behaviour, always wait out max_queue_delay_microseconds",
    )
    _number(serve, "frontends", frontends, "1", "front-end processes sharing the gRPC and HTTP ports, each decoding, "
            "validating and encoding on its own core, in front of this process's models (auto: one per core, at most "
            "8; 1: everything in one process)")  # fmt: skip
    _number(serve, "frontend-shm-bytes", size, "256MiB", "with --frontends above 1, the shared memory that tensors "
            "travel through, per front end and direction (taken only as used)")  # fmt: skip
    _number(serve, "cache-size", size, "256MiB", "bytes for the prediction cache of models with response_cache "
            "{ enable: true } (suffixes like 512KiB, 256MiB, 1GB; 0 disables it)")  # fmt: skip
    serve.add_argument("--cache-redis", default=env("cache-redis"), metavar="URL",
                       help="a Redis that every replica naming it shares as the cache's second level: "
                       "redis://HOST:PORT/DB, rediss:// for TLS, a password as redis://:PASSWORD@HOST (needs the "
                       "redis extra)")  # fmt: skip
    _number(serve, "cache-redis-ttl-secs", int, 300, "seconds an answer stays in the Redis cache level")
    _number(serve, "cache-redis-timeout-ms", float, 5, "the longest a request waits for Redis, then it computes "
            "(counted as an error); Redis failing (refused, reset, 1 s without a reply) is skipped for a while")  # fmt: skip
    serve.add_argument(
        "--log-level",
        type=choice(*LOG_LEVELS, upper=True),
        choices=LOG_LEVELS,
        default=env_default("log-level", choice(*LOG_LEVELS, upper=True), "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (any case)",
    )

    tls = serve.add_argument_group("TLS (Triton's flags; certificates are re-read on SIGHUP)")
    _bool_option(tls, "grpc-use-ssl", "serve gRPC over TLS (needs --grpc-server-cert and --grpc-server-key)")
    _bool_option(tls, "grpc-use-ssl-mutual", "TLS that also requires a client certificate signed by --grpc-root-cert")
    tls.add_argument("--grpc-server-cert", type=Path, default=env("grpc-server-cert"), metavar="PEM",
                     help="the server's certificate chain")  # fmt: skip
    tls.add_argument("--grpc-server-key", type=Path, default=env("grpc-server-key"), metavar="PEM",
                     help="the server's private key")  # fmt: skip
    tls.add_argument(
        "--grpc-root-cert", type=Path, default=env("grpc-root-cert"), metavar="PEM", help="CA for client certificates"
    )

    _http_arguments(serve)

    access = serve.add_argument_group("access control")
    access.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=None,
        metavar="PROTOCOLS:KEY=VALUE",
        help="require the header triton-grpc-protocol-KEY: VALUE for the comma-separated protocols (health, "
        "metadata, inference, shared-memory, model-config, model-repository, statistics, trace, logging); "
        "VALUE @FILE reads the value from FILE (repeatable, one group per protocol; in the environment variable, "
        "groups are separated by ';')",
    )
    _bool_option(
        access,
        "allow-model-upload",
        "let RepositoryModelLoad bring model files (file:<version>/<name>); only ONNX models unless "
        "--allow-code-models-upload",
    )
    _bool_option(
        access,
        "allow-code-models-upload",
        "with --allow-model-upload, also accept uploads of formats that run code when loaded (TorchScript, "
        ".pt2 programs, TensorRT plans): only for callers you would give a shell",
    )
    _number(access, "max-upload-bytes", size, "1GiB", "the most bytes of files one RepositoryModelLoad may bring")

    limits = serve.add_argument_group("limits")
    number = functools.partial(_number, limits)
    number("grpc-max-message-bytes", size, "64MiB", "the largest request or response message, on gRPC and HTTP "
           "alike (raise it for big tensors); a larger request is refused before its body is read "
           "(RESOURCE_EXHAUSTED; HTTP 413)")  # fmt: skip
    number("max-inflight-bytes", size, "1GiB", "request bytes admitted at once across all gRPC and HTTP calls, at "
           "least twice --grpc-max-message-bytes; over it RESOURCE_EXHAUSTED (HTTP 503); with --frontends N "
           "each front end takes 1/N of it. 0: no budget (requests are read as they come: cheaper per call, no "
           "bound on memory)")  # fmt: skip
    number("grpc-request-read-timeout-secs", float, 30, "a call's request message (gRPC) or body (HTTP, else 408) must "
           "arrive within this many seconds")  # fmt: skip
    number("grpc-handshake-timeout-secs", float, 10, "close connections that have not finished the TLS and HTTP/2 "
           "handshake by then")  # fmt: skip
    number("grpc-max-concurrent-streams", int, 1024, "calls in flight on one connection")
    number("grpc-max-connection-idle-secs", float, 300, "close a connection that has had no call for this long")
    number("grpc-keepalive-time", int, 7_200_000, "ping an idle connection after this many ms")
    number("grpc-keepalive-timeout", int, 20_000, "close it if the ping is not answered within this many ms")
    _bool_option(limits, "grpc-keepalive-permit-without-calls", "allow keepalive pings on connections with no calls")
    number("grpc-http2-max-pings-without-data", int, 2, "pings the server sends with no data in between")
    number("grpc-http2-min-recv-ping-interval-without-data", int, 300_000,
           "a client ping sooner than this many ms after the last is a strike")  # fmt: skip
    number("grpc-http2-max-ping-strikes", int, 2, "strikes before the connection is closed with GOAWAY (0: no limit)")


def _http_arguments(serve: argparse.ArgumentParser) -> None:
    """The KServe v2 HTTP/REST port: Triton's names where Triton has the flag (it has no HTTP TLS; those
    flags mirror the gRPC ones, and may name the same files)."""
    http = serve.add_argument_group("HTTP/REST (KServe v2, Triton's extensions)")
    _number(http, "http-port", int, 8000, "the HTTP port (0: any free port)")
    http.add_argument(
        "--no-http",
        action="store_true",
        default=env_default("no-http", flag, False),
        help="serve no HTTP/REST endpoint (gRPC only)",
    )
    http.add_argument("--http-address", default=env("http-address"), help="address of the HTTP port (default: --host)")
    _bool_option(http, "http-use-ssl", "serve HTTPS (needs --http-server-cert and --http-server-key)")
    _bool_option(
        http, "http-use-ssl-mutual", "HTTPS that also requires a client certificate signed by --http-root-cert"
    )
    http.add_argument("--http-server-cert", type=Path, default=env("http-server-cert"), metavar="PEM",
                      help="the HTTPS server's certificate chain (may be the gRPC one)")  # fmt: skip
    http.add_argument("--http-server-key", type=Path, default=env("http-server-key"), metavar="PEM",
                      help="the HTTPS server's private key")  # fmt: skip
    http.add_argument("--http-root-cert", type=Path, default=env("http-root-cert"), metavar="PEM",
                      help="CA for HTTPS client certificates")  # fmt: skip
    http.add_argument(
        "--http-restricted-api",
        action="append",
        default=None,
        metavar="APIS:KEY=VALUE",
        help="require the header KEY: VALUE for the comma-separated APIs (the --grpc-restricted-protocol names); "
        "others get 403 before their body is read. VALUE @FILE reads it from FILE (repeatable, one group per API; "
        "in the environment variable, groups are separated by ';')",
    )
    _number(http, "http-keepalive-timeout-secs", float, 75, "close a keep-alive connection idle for this long")
    _number(http, "http-max-connections", int, 4096, "HTTP connections open at once; more are closed as they come")


def _tls_of(args: argparse.Namespace, prefix: str) -> Any:
    """TlsSettings from the ``--{prefix}-use-ssl*`` flags, or None; ValueError names the missing flag."""
    from rapidserve.server.settings import TlsSettings

    value = functools.partial(getattr, args)
    attr = prefix.replace("-", "_")
    use, mutual = value(f"{attr}_use_ssl"), value(f"{attr}_use_ssl_mutual")
    cert, key, root = value(f"{attr}_server_cert"), value(f"{attr}_server_key"), value(f"{attr}_root_cert")
    if not (use or mutual):
        return None
    if cert is None or key is None:
        raise ValueError(f"--{prefix}-use-ssl needs --{prefix}-server-cert and --{prefix}-server-key")
    if mutual and root is None:
        raise ValueError(f"--{prefix}-use-ssl-mutual needs --{prefix}-root-cert (the CA client certificates chain to)")
    return TlsSettings(cert, key, root, mutual)


def _restrictions(args: argparse.Namespace, name: str) -> tuple[Any, ...]:
    """The groups of ``--{name}`` (or its variable, groups separated by ';'), checked."""
    from rapidserve.server.access import check_groups, parse_restriction

    try:
        groups = tuple(parse_restriction(text) for text in _env_list(getattr(args, name.replace("-", "_")), name, ";"))
        check_groups(groups, f"--{name}")
    except (OSError, ValueError) as exc:
        raise ValueError(f"--{name}: {exc}") from None
    return groups


def _number(group: Any, name: str, kind: Callable[[Any], Any], default: Any, help: str) -> None:
    """A numeric option (a count, seconds, or bytes with ``size``) whose default comes from its
    environment variable, else ``default`` (shown as written: 256MiB rather than its bytes)."""
    group.add_argument(
        f"--{name}", type=kind, default=env_default(name, kind, default), help=f"{help} (default: {default})"
    )


def _bool_option(group: Any, name: str, help: str, default: str = "false") -> None:
    group.add_argument(
        f"--{name}",
        nargs="?",
        const=True,
        type=flag,
        default=env_default(name, flag, default),
        metavar="BOOL",
        help=f"{help} (default: {default})",
    )


def _env_list(value: list[str] | None, name: str, separator: str = ",") -> list[str]:
    """A repeatable option: the flags given, else its environment variable (values separated by
    ``separator``: ``;`` where a value has commas of its own, as restriction groups do)."""
    return value if value is not None else list(env(name, [], many=True, separator=separator))


def settings_of(args: argparse.Namespace) -> tuple[Any, bool]:
    """The server's settings from the parsed flags, and whether they serve the demo; ValueError says
    which flag is wrong."""
    from rapidserve.server.settings import INT32_MAX, ServerSettings, UploadPolicy

    repositories_given = _env_list(args.model_repository, "model-repository")
    demo = not repositories_given
    if demo:
        from rapidserve.server.demo import demo_repository

        repositories: tuple[Path, ...] = (demo_repository(),)
    else:
        repositories = tuple(Path(p) for p in repositories_given)
        missing = [str(p) for p in repositories if not p.is_dir()]
        if missing:
            raise ValueError(f"model repository not found (not a directory): {', '.join(missing)}")
    for flag_name in ("grpc-port", "metrics-port", "http-port"):
        port = getattr(args, flag_name.replace("-", "_"))
        if not 0 <= port <= 65535:
            raise ValueError(f"--{flag_name} must be a port number from 0 to 65535, got {port}")
    tls, http_tls = _tls_of(args, "grpc"), _tls_of(args, "http")
    restrictions = _restrictions(args, "grpc-restricted-protocol")
    http_restrictions = _restrictions(args, "http-restricted-api")
    for flag_name, value in (("grpc-max-message-bytes", args.grpc_max_message_bytes),
                             ("grpc-max-concurrent-streams", args.grpc_max_concurrent_streams)):  # fmt: skip
        if not 0 < value <= INT32_MAX:
            raise ValueError(f"--{flag_name} must be between 1 and {INT32_MAX} (gRPC's limit), got {value}")
    for flag_name in ("grpc-request-read-timeout-secs", "grpc-handshake-timeout-secs", "grpc-max-connection-idle-secs",
                      "http-keepalive-timeout-secs"):  # fmt: skip
        if not getattr(args, flag_name.replace("-", "_")) > 0:
            raise ValueError(f"--{flag_name} must be more than 0")
    if args.http_max_connections < 1:
        raise ValueError(f"--http-max-connections must be at least 1, got {args.http_max_connections}")
    if args.model_load_thread_count < 1:
        raise ValueError(f"--model-load-thread-count must be at least 1, got {args.model_load_thread_count}")
    if args.max_inflight_bytes and args.max_inflight_bytes < 2 * args.grpc_max_message_bytes:
        raise ValueError(
            "--max-inflight-bytes must be 0 (no budget) or at least twice --grpc-max-message-bytes (a message "
            "being read, and its hand-over copy)"
        )
    if args.frontends > 1:
        if args.frontend_shm_bytes < args.grpc_max_message_bytes:
            raise ValueError(
                "--frontend-shm-bytes must be at least --grpc-max-message-bytes (a request or answer of the "
                "largest size must fit)"
            )
        if args.max_inflight_bytes and args.max_inflight_bytes < args.frontends * 2 * args.grpc_max_message_bytes:
            raise ValueError(
                f"--max-inflight-bytes must be 0 or at least {args.frontends} x twice --grpc-max-message-bytes with "
                f"--frontends {args.frontends} (each front end takes 1/N of it)"
            )
    if args.cache_redis:
        from rapidserve.server.cache_l2 import check_url

        check_url(args.cache_redis)
        if args.cache_redis_ttl_secs < 1 or not args.cache_redis_timeout_ms > 0:
            raise ValueError("--cache-redis-ttl-secs must be at least 1 and --cache-redis-timeout-ms more than 0")
    if args.allow_code_models_upload and not args.allow_model_upload:
        raise ValueError("--allow-code-models-upload needs --allow-model-upload")
    settings = ServerSettings(
        model_repositories=repositories,
        host=args.host,
        grpc_port=args.grpc_port,
        model_control_mode=args.model_control_mode,
        load_models=tuple(_env_list(args.load_model, "load-model")),
        repository_poll_secs=args.repository_poll_secs,
        model_load_threads=args.model_load_thread_count,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        grace_period_s=args.exit_timeout_secs,
        batching_mode=args.batching_mode,
        cache_size_bytes=args.cache_size,
        cache_redis_url=args.cache_redis or None,
        cache_redis_ttl_s=args.cache_redis_ttl_secs,
        cache_redis_timeout_ms=args.cache_redis_timeout_ms,
        metrics_port=args.metrics_port,
        metrics_enabled=not args.no_metrics,
        metrics_host=args.metrics_host,
        tls=tls,
        restricted_protocols=restrictions,
        uploads=UploadPolicy(args.allow_model_upload, args.allow_code_models_upload, args.max_upload_bytes),
        grpc_handshake_timeout_s=args.grpc_handshake_timeout_secs,
        grpc_keepalive_time_ms=args.grpc_keepalive_time,
        grpc_keepalive_timeout_ms=args.grpc_keepalive_timeout,
        grpc_keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
        grpc_http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
        grpc_http2_min_recv_ping_interval_without_data_ms=args.grpc_http2_min_recv_ping_interval_without_data,
        grpc_http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
        grpc_max_concurrent_streams=args.grpc_max_concurrent_streams,
        grpc_max_connection_idle_s=args.grpc_max_connection_idle_secs,
        grpc_request_read_timeout_s=args.grpc_request_read_timeout_secs,
        http_enabled=not args.no_http,
        http_port=args.http_port,
        http_host=args.http_address,
        http_tls=http_tls,
        http_restricted_api=http_restrictions,
        http_keepalive_timeout_s=args.http_keepalive_timeout_secs,
        http_max_connections=args.http_max_connections,
        frontends=args.frontends,
        frontend_shm_bytes=args.frontend_shm_bytes,
    )
    return settings, demo


async def serve(args: argparse.Namespace, settings: Any, demo: bool) -> int:
    """Start the server, wait for SIGTERM or SIGINT, drain and stop. A start that fails, or (with
    --exit-on-error) a model that fails to load at start, raises CommandError after a stop."""
    from rapidserve.server.errors import RapidServeError
    from rapidserve.server.frontend.engine import make_server

    _raise_open_file_limit()
    server = make_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
    try:
        await server.start()
    except (OSError, RuntimeError, ValueError, RapidServeError) as exc:
        await server.stop(0)
        raise CommandError(f"cannot start: {exc}") from exc
    failed = server.manager.startup_failures()
    if failed and args.exit_on_error:
        await server.stop(0)
        _exit_if_loads_abandoned(server, _failures(failed))
        raise CommandError(_failures(failed))
    if demo:
        _demo_hint(args.host, server.port, server.http_port)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f s)", settings.grace_period_s)
    await server.stop()
    _exit_if_loads_abandoned(server)
    return 0


def _failures(failed: list[tuple[str, str]]) -> str:
    first, reason = failed[0]
    more = f" (and {len(failed) - 1} more models)" if len(failed) > 1 else ""
    return (
        f"model '{first}' failed to load: {reason}{more}; exiting as --exit-on-error is true "
        "(--exit-on-error=false serves the other models, live but not ready)"
    )


def _exit_if_loads_abandoned(server: Any, error: str = "") -> None:
    """Exit now (status 1 with ``error``, else 0) if loads are still running: a loader thread cannot be
    stopped, and Python would wait for it at exit."""
    if server.abandoned_loads:
        log.error("exiting with model loads still running: %s", ", ".join(server.abandoned_loads))
        logging.shutdown()
        if error:
            print(f"rapidserve serve: error: {error}", file=sys.stderr, flush=True)
        os._exit(1 if error else 0)


def _demo_hint(host: str, port: int, http_port: int = 0) -> None:
    from rapidserve.server.ports import host_port

    host = "localhost" if host in ("0.0.0.0", "::", "[::]") else host
    rest = f"\n  curl http://{host_port(host, http_port)}/v2/models/digits" if http_port else ""
    log.info(
        "serving the demo model 'digits' (8x8 digit images, 64 FP32 pixels 0..16 -> label). Try:\n"
        "  rapidserve infer --url %s:%d digits --batch-size 4\n"
        '  python -c "from rapidserve import Client; import numpy as np; '
        "print(Client('%s:%d').infer('digits', {'pixels': np.zeros((1, 64), np.float32)}))\"%s",
        host,
        port,
        host,
        port,
        rest,
    )


def _raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, so that a flood of idle connections
    (closed after --grpc-handshake-timeout-secs) leaves room for real clients."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_loop(main: Any) -> int:
    """Run the server on uvloop where it is installed (it cuts the event loop's per-call cost)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: int = uvloop.run(main)
    return result
