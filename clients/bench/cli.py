"""``rapidserve bench``'s command line: its options, the inputs it sends, the sweep over load points,
and what it reports. Checks that can fail (TLS, the model's metadata, the libraries ``--plot`` and the
HTTP/2 client need) run before the first load point. ``--protocol http`` (or an ``http://`` URL) loads
the server's HTTP/REST endpoint instead, with Triton's binary tensor data extension.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rapidserve._options import positive, positive_list
from rapidserve.clients._h2grpc import check_hpack
from rapidserve.clients._rest import parse_url, timeout_us
from rapidserve.clients.bench.jobs import Job, measure
from rapidserve.clients.bench.payloads import HttpTarget
from rapidserve.clients.bench.report import plot, print_table, require_matplotlib, write_rows
from rapidserve.clients.bench.server_stats import ServerStats
from rapidserve.clients.client import Client, InferenceServerError
from rapidserve.clients.connection import add_arguments as client_arguments
from rapidserve.clients.connection import client_options, tls
from rapidserve.clients.loadgen import Measurement
from rapidserve.common.datatypes import DATATYPES

__all__ = ["add_arguments", "run"]


def _inputs(client: Client, args: argparse.Namespace) -> tuple[list[dict[str, np.ndarray[Any, Any]]], int]:
    """The request batches to send, and the batch size of each."""
    metadata = client.model_metadata(args.model, args.model_version)
    try:
        batching = client.model_config(args.model, args.model_version).max_batch_size > 0
    except InferenceServerError as exc:  # a server without the configuration extension (MLServer)
        if exc.code != grpc.StatusCode.UNIMPLEMENTED and exc.http_status != 404:
            raise
        batching = all(t.shape and t.shape[0] == -1 for t in metadata.inputs)
    shapes = dict(_shape(s) for s in args.shape)
    if args.input_data not in ("random", "zero"):
        path = Path(args.input_data)
        if path.suffix == ".npy":
            if len(metadata.inputs) != 1:
                raise ValueError(f"{path} holds one array but the model takes {len(metadata.inputs)} inputs; use .npz")
            arrays = {metadata.inputs[0].name: np.load(path)}
        else:
            with np.load(path) as data:
                arrays = {t.name: data[t.name] for t in metadata.inputs}
        rows = len(next(iter(arrays.values())))
        size = args.batch_size if batching else rows
        batches = [{n: a[i : i + size] for n, a in arrays.items()} for i in range(0, rows - size + 1, size)]
        return batches or [arrays], size if batching else 1
    rng = np.random.default_rng(args.seed)
    batch: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in metadata.inputs:
        dims = list(shapes.get(tensor.name, tensor.shape))
        if batching and tensor.name not in shapes:
            dims[0] = args.batch_size
        if any(d < 0 for d in dims):
            raise ValueError(f"input '{tensor.name}' has dims {tensor.shape}: give --shape {tensor.name}:D1,D2,...")
        dtype = DATATYPES[tensor.datatype]
        if args.input_data == "zero" or dtype.kind == "O":
            batch[tensor.name] = np.zeros(dims, dtype if dtype.kind != "O" else np.object_)
            if dtype.kind == "O":
                batch[tensor.name][...] = b"0"
        elif dtype.kind == "f":
            batch[tensor.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            batch[tensor.name] = rng.integers(0, 2, dims).astype(dtype)
        else:
            batch[tensor.name] = rng.integers(0, 100, dims).astype(dtype)
    return [batch], args.batch_size if batching else 1


def _shape(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.rpartition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"--shape wants NAME:D1,D2,..., got {text!r}")
    return name, [int(d) for d in dims.split(",") if d]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument(
        "--url", help="the server: HOST:PORT (default localhost:8001, or localhost:8000 with --protocol http) or "
        "an http:// or https:// URL; over gRPC, several servers (replicas) as HOST:PORT,HOST:PORT,... share the "
        "load round-robin, request by request"
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=("grpc", "http"), help="gRPC (HTTP/2) or the HTTP/REST endpoint over HTTP/1.1 "
        "keep-alive connections, one per request in flight (default: http for an http(s):// URL, else grpc)"
    )  # fmt: skip
    parser.add_argument("--model-version", default="")
    parser.add_argument(
        "--streaming", action="store_true", help="send over ModelStreamInfer streams (one per 2 requests in flight)"
    )
    loads = parser.add_mutually_exclusive_group()
    loads.add_argument(
        "--concurrency",
        type=positive_list(int),
        metavar="N1,N2",
        help="closed loop: comma-separated levels (default 1)",
    )
    loads.add_argument(
        "--request-rate", type=positive_list(float), metavar="R1,R2", help="open loop: comma-separated requests/s"
    )
    parser.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals (default constant gaps)")
    parser.add_argument(
        "--max-p99-ms", type=positive(float), help="stop the sweep at the first point whose p99 exceeds this"
    )
    parser.add_argument("-b", "--batch-size", type=positive(int), default=1)
    parser.add_argument("--shape", action="append", default=[], help="NAME:D1,D2 for inputs with free dims")
    parser.add_argument("--input-data", default="random", help="random, zero, or a .npy/.npz file")
    parser.add_argument("--duplicate-ratio", type=float, help="fraction of requests repeating a recent input")
    parser.add_argument("--measurement-interval", type=positive(int), default=2000, metavar="MS")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--stability-percentage", type=float, default=10.0)
    parser.add_argument("--max-trials", type=positive(int), default=10)
    parser.add_argument(
        "--workers", type=positive(int), default=1, help="client processes (when one core cannot keep up)"
    )
    parser.add_argument(
        "--connections",
        type=positive(int),
        help="HTTP/2 connections per worker (default: one per 6 requests in flight in a closed loop, as "
        "perf_analyzer's clients share them; 1 in an open loop); over HTTP/1.1, the connections an open loop "
        "starts with (more open when all are busy)",
    )
    parser.add_argument("--timeout-s", type=positive(float), help="per-request deadline (unary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results as .csv or .json (by extension)")
    parser.add_argument("--plot", type=Path, help="a PNG of latency percentiles against throughput")
    parser.add_argument("--quiet", action="store_true", help="no per-window progress")
    parser.add_argument("--log-level", default="WARNING")
    client_arguments(parser)


def _resolve_url(args: argparse.Namespace) -> str:
    """The URL to load, with its protocol settled: ``--protocol http`` makes a bare HOST:PORT an http://
    URL (https:// with TLS options); an http(s):// URL with ``--protocol grpc`` is a usage error. Several
    comma-separated gRPC servers stay a comma-separated list, with no empty entry."""
    url = args.url or ("localhost:8000" if args.protocol == "http" else "localhost:8001")
    if "," in url:
        servers = [part.strip() for part in url.split(",")]
        if not all(servers):
            raise ValueError(f"--url {url}: an empty entry in the list of servers")
        if args.protocol == "http" or any(s.startswith(("http://", "https://")) for s in servers):
            raise ValueError("several servers in --url: over gRPC only (HOST:PORT,HOST:PORT,...)")
        return ",".join(servers)
    is_http = url.startswith(("http://", "https://"))
    if args.protocol == "grpc" and is_http:
        raise ValueError(f"--protocol grpc with the URL {url}: give HOST:PORT")
    if args.protocol == "http" and not is_http:
        url = f"{'https' if args.ssl or args.root_certificates or args.ssl_target_name else 'http'}://{url}"
    if url.startswith(("http://", "https://")) and args.streaming:
        raise ValueError("--streaming is a gRPC feature (ModelStreamInfer): not with --protocol http")
    return url


def run(args: argparse.Namespace) -> int:
    if args.duplicate_ratio is not None and not 0 <= args.duplicate_ratio <= 1:
        print("error: --duplicate-ratio must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        url = args.url = _resolve_url(args)
        http = url.startswith(("http://", "https://"))
        if not http:
            check_hpack()
        if args.plot:
            require_matplotlib()
        options = client_options(args)
        security = tls(**{k: v for k, v in options.items() if k != "headers"})
        if security is not None and not http:
            security.ssl_context()  # the HTTP/2 connections' (made in each worker): refused here if it cannot be
        target = None
        if http:
            endpoint = parse_url(url)
            headers = tuple(options["headers"].items())
            target = HttpTarget(endpoint.authority, endpoint.prefix, headers, timeout_us(args.timeout_s))
        with Client(url.split(",")[0], timeout_s=30, **options) as client:  # replicas serve the same models
            batches, batch_size = _inputs(client, args)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = "request_rate" if args.request_rate else "concurrency"
    levels = args.request_rate or args.concurrency or [1]
    measurement = Measurement(
        window_s=args.measurement_interval / 1000,
        warmup_s=args.warmup_s,
        stability=args.stability_percentage / 100,
        max_windows=max(args.max_trials, 3),
    )
    stats = ServerStats(url, args.model, args.model_version, options)
    rows: list[dict[str, Any]] = []
    for level in levels:
        job = Job(url, args.model, args.model_version, batches, args.streaming, mode, level, measurement,
                  args.duplicate_ratio, args.poisson, args.timeout_s, args.seed, args.quiet, batch_size,
                  connections=args.connections, tls=security, headers=tuple(options["headers"].items()),
                  http=target)  # fmt: skip
        stats.start()
        try:
            summary = measure(job, args.workers)
        except OSError as exc:  # (ConnectionError, ssl.SSLError, TimeoutError)
            print(
                f"error: cannot open an {'HTTP/1.1' if http else 'HTTP/2'} connection to {url}: {exc}", file=sys.stderr
            )
            return 1
        row = {"mode": mode, "protocol": "http" if http else "grpc",
               "concurrency": int(level) if mode == "concurrency" else "",
               "request_rate": level if mode == "request_rate" else "", **summary, **stats.delta()}  # fmt: skip
        rows.append(row)
        _warn(row, args)
        if args.max_p99_ms is not None:
            row["met_p99_bound"] = bool(row["p99_ms"] <= args.max_p99_ms)
            if not row["met_p99_bound"]:
                break
    print_table(rows, args)
    if args.max_p99_ms is not None:
        met = [r for r in rows if r["met_p99_bound"]]
        best = f"{met[-1]['request_rate'] or met[-1]['concurrency']:g}" if met else "none"
        print(
            f"highest {'rate' if mode == 'request_rate' else 'concurrency'} with p99 <= {args.max_p99_ms:g} ms: {best}"
        )
    if args.out:
        write_rows(rows, args.out)
    if args.plot:
        plot(rows, args.plot, mode)
    return 0


def _warn(row: dict[str, Any], args: argparse.Namespace) -> None:
    if row["client_cpu_max"] > 0.9:
        print(f"warning: the client used {row['client_cpu_max']:.0%} of a core at this load point: it may be the "
              "bottleneck; add --workers", file=sys.stderr)  # fmt: skip
    if row["mode"] == "request_rate" and row["send_lag_p99_ms"] > 1:
        print(f"warning: the client sent up to {row['send_lag_p99_ms']:.1f} ms late (p99): latencies include "
              "its own lag", file=sys.stderr)  # fmt: skip
    if not row["stable"]:
        print(
            "warning: no three windows agreed within the stability band; figures are from the last three",
            file=sys.stderr,
        )
