"""The rapidserve command: serve, infer, bench, prepare and health.

Every option can also come from an environment variable named ``RAPIDSERVE_`` + the option's name in
upper case with dashes as underscores (``--grpc-port`` -> ``RAPIDSERVE_GRPC_PORT``); a flag on the
command line wins. List options take comma-separated values from the environment. A failure is one line
on stderr (``rapidserve <command>: error: ...``) and a non-zero exit; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rapidserve
from rapidserve import _serve
from rapidserve._options import HelpFormatter, bad_variable, choice, complete_help, env, env_default, flag
from rapidserve._serve import LOG_LEVELS, CommandError

__all__ = ["main"]

log = logging.getLogger("rapidserve")

_DESCRIPTION = (
    "A Triton-compatible (KServe v2) gRPC inference server: serve a model repository, call it, load-test it, "
    "or prepare optimized models. Every option also reads RAPIDSERVE_<OPTION> from the environment, "
    "e.g. RAPIDSERVE_GRPC_PORT for --grpc-port."
)

_URL_HELP = "the server's gRPC address HOST:PORT, or its HTTP/REST endpoint as http://HOST:PORT (https:// for TLS)"

_settings = _serve.settings_of  # the server's settings from parsed flags (tests build them this way)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidserve", description=_DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {rapidserve.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")

    _serve.add_arguments(command("serve", "serve a model repository over gRPC (KServe v2, Triton-compatible)"))

    infer = command("infer", "send one request and print the outputs")
    infer.add_argument("model", help="the model's name")
    infer.add_argument("--url", default=env("url", "localhost:8001"), help=_URL_HELP)
    infer.add_argument("--model-version", default="", help="the version to call (default: the server's choice)")
    infer.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)"
    )
    infer.add_argument("--inputs", type=Path, metavar="FILE.npz", help="inputs from an .npz, one array per input")
    infer.add_argument("--batch-size", type=int, default=1, help="batch size of generated random inputs")
    infer.add_argument("--output", action="append", default=[], help="output to request (repeatable; default all)")
    infer.add_argument("--timeout-s", type=float, default=None, help="deadline of the call in seconds (default: none)")
    infer.add_argument("--seed", type=int, default=0, help="seed of the generated random inputs")
    _log_level(infer)
    from rapidserve.clients.connection import add_arguments as client_arguments

    client_arguments(infer, env, env_default("ssl", flag, False))

    bench = command("bench", "load-test a model over gRPC or HTTP: closed or open loop, perf_analyzer-style")
    from rapidserve.clients.bench import add_arguments as bench_arguments

    bench_arguments(bench)

    prepare = command(
        "prepare", "turn a PyTorch model into optimized, validated, benchmarked engines in a model repository"
    )
    from rapidserve.engines.prepare.cli import add_arguments

    add_arguments(prepare)

    health = command(
        "health",
        "exit 0 if the server's gRPC health service says SERVING, or with an http:// URL if /v2/health/ready "
        "answers 200 (container health checks)",
    )
    health.add_argument("--url", default=env("url", "localhost:8001"), help=_URL_HELP)
    health.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check in seconds")
    _log_level(health)
    client_arguments(health, env, env_default("ssl", flag, False))
    complete_help(parser)
    return parser


def _log_level(parser: argparse.ArgumentParser) -> None:
    kind = choice(*LOG_LEVELS, upper=True)
    parser.add_argument(
        "--log-level", type=kind, choices=LOG_LEVELS, default=env_default("log-level", kind, "WARNING"),
        help="DEBUG, INFO, WARNING or ERROR (any case)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    bad = bad_variable(args)
    if bad is not None:
        return _usage_error(args.command, bad.message())
    level = str(getattr(args, "log_level", "WARNING")).upper()
    logging.basicConfig(
        level=level if level in LOG_LEVELS else "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"rapidserve {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place every failure becomes a line for the user
        print(f"rapidserve {args.command}: error: {_message(exc)}", file=sys.stderr)
        if _unexpected(exc):
            log.debug("traceback of the error above", exc_info=exc)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        try:
            settings, demo = _serve.settings_of(args)
        except ValueError as exc:
            return _usage_error(args.command, str(exc))
        return _serve.run_loop(_serve.serve(args, settings, demo))
    if args.command == "health":
        return _health(args)
    if args.command == "bench":
        from rapidserve.clients.bench import run as bench

        return bench(args)
    if args.command == "prepare":
        from rapidserve.engines.prepare.cli import run

        return run(args)
    return _infer(args)


def _usage_error(command: str, message: str) -> int:
    """A bad option value, from a flag's consequence or a variable: one line and status 2, as argparse
    gives for a bad flag (without its usage block, which would bury the line)."""
    print(f"rapidserve {command}: error: {message}", file=sys.stderr)
    return 2


def _unexpected(exc: BaseException) -> bool:
    """Not one of the failures a user can act on from its message alone (those carry no traceback)."""
    import grpc

    from rapidserve.clients.client import InferenceServerError
    from rapidserve.server.errors import RapidServeError

    expected = (CommandError, RapidServeError, OSError, grpc.RpcError, InferenceServerError)
    return not isinstance(exc, expected)


def _message(exc: BaseException) -> str:
    import grpc

    text = " ".join(str(exc).split())
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return f"{getattr(code, 'name', code)}: {' '.join((exc.details() or '').split())}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if _unexpected(exc):
        return f"unexpected {type(exc).__name__}: {text} (run with --log-level debug for the traceback)"
    return text


def _health(args: argparse.Namespace) -> int:
    """The standard gRPC health check (service ""), which follows ServerReady; over HTTP, ServerReady."""
    if args.url.startswith(("http://", "https://")):
        return _http_health(args)
    import grpc

    from rapidserve import protos
    from rapidserve.clients.connection import channel, client_options, hint, tls

    try:
        options = client_options(args)
        headers = tuple(options.pop("headers").items())
        security = tls(**options)
        opened = channel(args.url, security, [])
    except (OSError, ValueError) as exc:
        print(f"rapidserve health: error: {exc}", file=sys.stderr)
        return 1  # (a container health check reserves 2)
    check = opened.unary_unary(
        f"/{protos.HEALTH_SERVICE_NAME}/Check",
        request_serializer=protos.HealthCheckRequest.SerializeToString,
        response_deserializer=protos.HealthCheckResponse.FromString,
    )
    with opened:
        try:
            reply = check(protos.HealthCheckRequest(), timeout=args.timeout_s, metadata=headers or None)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            print(f"unhealthy: {exc.code().name}: {details}{hint(details, security)}", file=sys.stderr)
            return 1
    print(protos.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == protos.HealthCheckResponse.SERVING else 1


def _http_health(args: argparse.Namespace) -> int:
    """``GET /v2/health/ready``: 200 is SERVING, Triton's 400 NOT_SERVING; no answer is unhealthy."""
    from rapidserve.clients.client import Client, InferenceServerError
    from rapidserve.clients.connection import client_options

    try:
        client = Client(args.url, timeout_s=args.timeout_s, **client_options(args))
    except (OSError, ValueError) as exc:
        print(f"rapidserve health: error: {exc}", file=sys.stderr)
        return 1  # (a container health check reserves 2)
    with client:
        try:
            ready = client.is_server_ready()
        except InferenceServerError as exc:
            print(f"unhealthy: {exc.code.name}: {exc.message}", file=sys.stderr)
            return 1
    print("SERVING" if ready else "NOT_SERVING")
    return 0 if ready else 1


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from rapidserve.clients.client import Client, InferenceServerError
    from rapidserve.clients.connection import client_options

    try:
        client = Client(args.url, timeout_s=args.timeout_s, **client_options(args))
    except (OSError, ValueError) as exc:  # the TLS and header options: a usage error
        return _usage_error("infer", str(exc))
    with client:
        inputs = _read_inputs(args)
        try:
            if not inputs:
                inputs = _random_inputs(client.model_metadata(args.model, args.model_version), args)
            outputs = client.infer(args.model, inputs, args.output, version=args.model_version)
        except InferenceServerError as exc:
            print(f"rapidserve infer: error: {exc}", file=sys.stderr)
            return 1
    with np.printoptions(precision=4, suppress=True, threshold=200):
        for name, array in outputs.items():
            print(f"{name} {array.dtype} {list(array.shape)}\n{array}")
    return 0


def _read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The arrays of --inputs and --input; CommandError names the file that does not load."""
    import numpy as np

    inputs: dict[str, Any] = {}
    try:
        if args.inputs:
            with np.load(args.inputs, allow_pickle=False) as data:
                inputs.update({name: data[name] for name in data.files})
        for item in args.input:
            name, sep, file = item.partition("=")
            if not sep:
                raise CommandError(f"--input expects NAME=FILE.npy, got {item!r}")
            inputs[name] = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        where = getattr(exc, "filename", None) or "an input file"
        raise CommandError(f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}") from exc
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
