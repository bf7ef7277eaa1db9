"""The ``rapidserve`` command: ``serve``, ``infer``, ``bench``, ``prepare`` and ``health``.

Every option can also come from an environment variable named ``RAPIDSERVE_`` + the option's name in
upper case with dashes as underscores (``--grpc-port`` -> ``RAPIDSERVE_GRPC_PORT``); a flag on the
command line wins. List options take comma-separated values from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("rapidserve")


def _env(name: str, default: Any = None, *, many: bool = False, separator: str = ",") -> Any:
    value = os.environ.get("RAPIDSERVE_" + name.upper().replace("-", "_"))
    if value is None:
        return default
    return [v.strip() for v in value.split(separator) if v.strip()] if many else value


def _size(text: str) -> int:
    from rapidserve.server.settings import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(text: str) -> bool:
    """Triton's boolean flag values: ``--grpc-use-ssl`` alone, or ``=true|false|1|0``."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_option(group: Any, name: str, help: str) -> None:
    group.add_argument(
        f"--{name}", nargs="?", const=True, type=_flag, default=_flag(_env(name, "false")), metavar="BOOL", help=help
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over gRPC (KServe v2, Triton-compatible)")
    _serve_arguments(serve)

    infer = commands.add_parser("infer", help="send one request and print the outputs")
    infer.add_argument("model")
    infer.add_argument("--url", default=_env("url", "localhost:8001"))
    infer.add_argument("--model-version", default="")
    infer.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)"
    )
    infer.add_argument("--inputs", type=Path, metavar="FILE.npz", help="inputs from an .npz, one array per input")
    infer.add_argument("--batch-size", type=int, default=1, help="batch size of generated random inputs")
    infer.add_argument("--output", action="append", default=[], help="output to request (repeatable; default all)")
    infer.add_argument("--timeout-s", type=float, default=None)
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--log-level", default=_env("log-level", "WARNING"))
    from rapidserve.clients.connection import add_arguments as client_arguments

    client_arguments(infer, _env)

    bench = commands.add_parser("bench", help="load-test a model over gRPC: closed or open loop, perf_analyzer-style")
    from rapidserve.clients.bench import add_arguments as bench_arguments

    bench_arguments(bench)

    prepare = commands.add_parser(
        "prepare", help="turn a PyTorch model into optimized, validated, benchmarked engines in a model repository"
    )
    from rapidserve.engines.prepare.cli import add_arguments

    add_arguments(prepare)

    health = commands.add_parser(
        "health", help="exit 0 if the server's gRPC health service says SERVING (container health checks)"
    )
    health.add_argument("--url", default=_env("url", "localhost:8001"))
    health.add_argument("--timeout-s", type=float, default=3.0)
    health.add_argument("--log-level", default=_env("log-level", "WARNING"))
    client_arguments(health, _env)
    return parser


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    # Options that may be given several times read their environment variable only when no flag
    # gives them: a flag on the command line replaces the environment, it never adds to it.
    serve.add_argument(
        "--model-repository",
        action="append",
        default=None,
        help="Triton-layout model repository (repeatable); without one, the built-in demo",
    )
    serve.add_argument("--host", default=_env("host", "0.0.0.0"), help="address of the gRPC port (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, default=int(_env("grpc-port", 8001)))
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("metrics-port", 8002)),
        help="Prometheus metrics at http://HOST:PORT/metrics (0: any free port)",
    )
    serve.add_argument(
        "--metrics-host",
        default=_env("metrics-host"),
        help="address of the metrics port (default: --host), e.g. 127.0.0.1 to keep /metrics off the network",
    )
    serve.add_argument(
        "--no-metrics",
        action="store_true",
        default=_env("no-metrics", "") not in ("", "0", "false"),
        help="serve no /metrics endpoint (statistics are still recorded for the ModelStatistics RPC)",
    )
    serve.add_argument(
        "--model-control-mode", choices=("none", "explicit", "poll"), default=_env("model-control-mode", "none")
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=None,
        help="model to load at start in explicit mode (repeatable; '*' = all)",
    )
    serve.add_argument("--repository-poll-secs", type=float, default=float(_env("repository-poll-secs", 15)))
    serve.add_argument("--model-load-thread-count", type=int, default=int(_env("model-load-thread-count", 4)))
    serve.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=float(_env("exit-timeout-secs", 30)),
        help="on SIGTERM/SIGINT, how long in-flight requests may take to finish",
    )
    serve.add_argument(
        "--batching-mode",
        choices=("adaptive", "fixed"),
        default=_env("batching-mode", "adaptive"),
        help="adaptive (default): wait for a fuller batch only while more requests are expected in time; "
        "fixed: Triton's behaviour, always wait out max_queue_delay_microseconds",
    )
    serve.add_argument(
        "--cache-size",
        type=_size,
        default=_size(_env("cache-size", "256MiB")),
        help="bytes for the prediction cache of models with response_cache { enable: true } "
        "(suffixes like 512KiB, 256MiB, 1GB; 0 disables it; default 256MiB)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("log-level", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"),
    )

    tls = serve.add_argument_group("TLS (Triton's flags; certificates are re-read on SIGHUP)")
    _bool_option(tls, "grpc-use-ssl", "serve gRPC over TLS (needs --grpc-server-cert and --grpc-server-key)")
    _bool_option(tls, "grpc-use-ssl-mutual", "TLS that also requires a client certificate signed by --grpc-root-cert")
    tls.add_argument("--grpc-server-cert", type=Path, default=_env("grpc-server-cert"), metavar="PEM")
    tls.add_argument("--grpc-server-key", type=Path, default=_env("grpc-server-key"), metavar="PEM")
    tls.add_argument(
        "--grpc-root-cert", type=Path, default=_env("grpc-root-cert"), metavar="PEM", help="CA for client certificates"
    )

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
    _number(access, "max-upload-bytes", _size, "1GiB", "the most bytes of files one RepositoryModelLoad may bring")

    limits = serve.add_argument_group("limits")
    number = functools.partial(_number, limits)
    number("grpc-max-message-bytes", _size, "64MiB", "the largest request or response message (raise it for big "
           "tensors); a larger request is refused RESOURCE_EXHAUSTED before its body is read")  # fmt: skip
    number("max-inflight-bytes", _size, "1GiB", "request bytes admitted at once across all calls, at least twice "
           "--grpc-max-message-bytes; over it RESOURCE_EXHAUSTED. 0: no budget (requests are read as they come: "
           "cheaper per call, no bound on memory)")  # fmt: skip
    number("grpc-request-read-timeout-secs", float, 30, "a call's request message must arrive within this many seconds")
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


def _number(group: Any, name: str, kind: Callable[[Any], Any], default: Any, help: str) -> None:
    """A numeric option (a count, seconds, or bytes with ``_size``) whose default comes from its
    environment variable, else ``default``."""
    group.add_argument(f"--{name}", type=kind, default=kind(_env(name, default)), help=f"{help} (default {default})")


def _env_list(value: list[str] | None, name: str, separator: str = ",") -> list[str]:
    """A repeatable option: the flags given, else its environment variable (values separated by
    ``separator``: ``;`` where a value has commas of its own, as restriction groups do)."""
    return value if value is not None else list(_env(name, [], many=True, separator=separator))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _run_loop(_serve(args))
    if args.command == "health":
        return _health(args)
    if args.command == "bench":
        from rapidserve.clients.bench import run as bench

        return bench(args)
    if args.command == "prepare":
        from rapidserve.engines.prepare.cli import run

        return run(args)
    return _infer(args)


def _health(args: argparse.Namespace) -> int:
    """The standard gRPC health check (service ""), which follows ServerReady."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rapidserve.clients.connection import channel, client_options, hint, tls

    try:
        options = client_options(args)
        headers = tuple(options.pop("headers").items())
        security = tls(**options)
        opened = channel(args.url, security, [])
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1  # (a container health check reserves 2)
    with opened:
        try:
            reply = health_pb2_grpc.HealthStub(opened).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout_s, metadata=headers or None
            )
        except grpc.RpcError as exc:
            details = exc.details() or ""
            print(f"unhealthy: {exc.code().name}: {details}{hint(details, security)}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


async def _serve(args: argparse.Namespace) -> int:
    from rapidserve.server.app import InferenceServer
    from rapidserve.server.errors import RapidServeError

    try:
        settings, demo = _settings(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    _raise_open_file_limit()
    server = InferenceServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
    try:
        await server.start()
    except (OSError, RuntimeError, ValueError, RapidServeError) as exc:
        log.error("cannot start: %s", exc)
        await server.stop(0)
        return 1
    if demo:
        host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        log.info(
            "serving the demo model 'digits' (8x8 digit images, 64 FP32 pixels 0..16 -> label). Try:\n"
            "  rapidserve infer --url %s:%d digits --batch-size 4\n"
            '  python -c "from rapidserve import Client; import numpy as np; '
            "print(Client('%s:%d').infer('digits', {'pixels': np.zeros((1, 64), np.float32)}))\"",
            host,
            server.port,
            host,
            server.port,
        )
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f s)", settings.grace_period_s)
    await server.stop()
    if server.abandoned_loads:  # a loader thread cannot be stopped, and Python would wait for it at exit
        log.error("exiting with model loads still running: %s", ", ".join(server.abandoned_loads))
        logging.shutdown()
        os._exit(0)
    return 0


def _settings(args: argparse.Namespace) -> tuple[Any, bool]:
    """The server's settings from the parsed flags; ValueError says which flag is wrong."""
    from rapidserve.server.access import check_groups, parse_restriction
    from rapidserve.server.settings import INT32_MAX, ServerSettings, TlsSettings, UploadPolicy

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
    tls = None
    if args.grpc_use_ssl or args.grpc_use_ssl_mutual:
        if args.grpc_server_cert is None or args.grpc_server_key is None:
            raise ValueError("--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key")
        if args.grpc_use_ssl_mutual and args.grpc_root_cert is None:
            raise ValueError("--grpc-use-ssl-mutual needs --grpc-root-cert (the CA client certificates chain to)")
        tls = TlsSettings(args.grpc_server_cert, args.grpc_server_key, args.grpc_root_cert, args.grpc_use_ssl_mutual)
    try:
        restrictions = tuple(
            parse_restriction(text)
            for text in _env_list(args.grpc_restricted_protocol, "grpc-restricted-protocol", separator=";")
        )
        check_groups(restrictions)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--grpc-restricted-protocol: {exc}") from None
    for flag, value in (("grpc-max-message-bytes", args.grpc_max_message_bytes),
                        ("grpc-max-concurrent-streams", args.grpc_max_concurrent_streams)):  # fmt: skip
        if not 0 < value <= INT32_MAX:
            raise ValueError(f"--{flag} must be between 1 and {INT32_MAX} (gRPC's limit), got {value}")
    for flag in ("grpc-request-read-timeout-secs", "grpc-handshake-timeout-secs", "grpc-max-connection-idle-secs"):
        if not getattr(args, flag.replace("-", "_")) > 0:
            raise ValueError(f"--{flag} must be more than 0")
    if args.max_inflight_bytes and args.max_inflight_bytes < 2 * args.grpc_max_message_bytes:
        raise ValueError(
            "--max-inflight-bytes must be 0 (no budget) or at least twice --grpc-max-message-bytes (a message "
            "being read, and its hand-over copy)"
        )
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
    )
    return settings, demo


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


def _run_loop(main: Any) -> int:
    """Run the server on uvloop where it is installed (it cuts the event loop's per-call cost)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: int = uvloop.run(main)
    return result


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from rapidserve.clients.client import Client, InferenceServerError
    from rapidserve.clients.connection import client_options

    try:
        client = Client(args.url, timeout_s=args.timeout_s, **client_options(args))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            inputs = _read_inputs(args)
            if not inputs:
                inputs = _random_inputs(client.model_metadata(args.model, args.model_version), args)
            outputs = client.infer(args.model, inputs, args.output, version=args.model_version)
        except InferenceServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    with np.printoptions(precision=4, suppress=True, threshold=200):
        for name, array in outputs.items():
            print(f"{name} {array.dtype} {list(array.shape)}\n{array}")
    return 0


def _read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    inputs: dict[str, Any] = {}
    if args.inputs:
        with np.load(args.inputs, allow_pickle=False) as data:
            inputs.update({name: data[name] for name in data.files})
    for item in args.input:
        name, sep, file = item.partition("=")
        if not sep:
            raise SystemExit(f"--input expects NAME=FILE.npy, got {item!r}")
        inputs[name] = np.load(file, allow_pickle=False)
    return inputs


def _random_inputs(metadata: Any, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from rapidserve.common.datatypes import numpy_dtype

    rng = np.random.default_rng(args.seed)
    inputs = {}
    for spec in metadata.inputs:
        shape = tuple(args.batch_size if (i == 0 and d < 0) else (1 if d < 0 else d) for i, d in enumerate(spec.shape))
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype == "BYTES":
            array = np.array([str(v).encode() for v in rng.integers(0, 100, int(np.prod(shape)))], dtype=object)
            inputs[spec.name] = array.reshape(shape)
        elif dtype.kind == "f" or spec.datatype == "BF16":
            inputs[spec.name] = (rng.random(shape, dtype=np.float32) * 16).astype(dtype)
        else:
            inputs[spec.name] = rng.integers(0, 2 if dtype.kind == "b" else 16, shape).astype(dtype)
    return inputs


if __name__ == "__main__":
    raise SystemExit(main())
