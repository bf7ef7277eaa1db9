"""``rapidserve bench``: load-test a KServe v2 gRPC server (rapidserve, Triton, anything that speaks it).

Requests are serialized once and sent as raw bytes over ``rapidserve.clients.h2grpc``, a lean HTTP/2
gRPC client that costs a fraction of grpcio's per call; answers are not decoded, only their status (a
stream's answers are parsed for their id and error).
Closed loop over a concurrency sweep, or open loop at fixed request rates, measured by
``rapidserve.clients.loadgen``; the server's own breakdown (queue, compute, batch size, cache hits)
comes from the statistics RPC, read before and after each load point. TLS (mutual too) and headers
apply to every connection, the bench's own and the ``Client`` that reads metadata and statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rapidserve import protos
from rapidserve.clients.client import Client, InferenceServerError
from rapidserve.clients.connection import Headers, Tls, client_options, tls
from rapidserve.clients.connection import add_arguments as client_arguments
from rapidserve.clients.h2grpc import Connection, Reply
from rapidserve.clients.loadgen import LoadPoint, Measurement, Window, closed_loop, open_loop, summarize
from rapidserve.common import codec
from rapidserve.common.datatypes import DATATYPES

__all__ = ["Payloads", "add_arguments", "run"]

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
HOT_SET = 256  # a duplicate repeats one of the last this-many distinct requests
COLUMNS = [
    "mode", "concurrency", "request_rate", "infer_per_s", "requests_per_s", "p50_ms", "p90_ms", "p95_ms",
    "p99_ms", "p999_ms", "mean_ms", "errors", "stable", "met_p99_bound", "client_cpu", "server_queue_us",
    "server_compute_input_us", "server_compute_infer_us", "server_compute_output_us", "server_avg_batch",
    "server_cache_hit_ratio",
]  # fmt: skip


class Payloads:
    """Serialized ModelInferRequests, built once. ``get(i)`` is request i: the data rows in turn, or
    with a duplicate ratio, a new distinct request (its first element set to a running number) or,
    with probability ``duplicate_ratio``, a repeat of a recent one."""

    def __init__(
        self,
        model: str,
        version: str,
        batches: list[dict[str, np.ndarray[Any, Any]]],
        duplicate_ratio: float | None = None,
        seed: int = 0,
    ) -> None:
        self._messages = [codec.encode_request(model, b, model_version=version).SerializeToString() for b in batches]
        self._ratio = duplicate_ratio
        self._rng = random.Random(seed)
        self._recent: list[bytes] = []
        if duplicate_ratio is not None:
            self._number_first_input(batches[0])

    def _number_first_input(self, batch: dict[str, np.ndarray[Any, Any]]) -> None:
        """Distinct requests carry a running number in the first one or two elements of the first input,
        as digits of a base every value of which the dtype holds exactly (2048 for FP16, 256 for UINT8)."""
        name, first = next(iter(batch.items()))
        if first.dtype.kind not in "iuf" or first.size == 0:
            raise ValueError(f"--duplicate-ratio numbers distinct requests in input '{name}', which needs numbers, "
                             f"not {first.dtype}")  # fmt: skip
        dtype = first.dtype
        if dtype.kind == "f":
            self._base = 2 ** (np.finfo(dtype).nmant + 1)
        else:
            info = np.iinfo(dtype)
            self._base = min(int(info.max), 2**31 - 1) + 1
        self._digits = min(first.size, 2)
        self._capacity = self._base**self._digits
        self._dtype = dtype
        # the first input's raw bytes come last but for the other inputs' (field 7, in input order)
        tail = sum(1 + len(protos.varint(a.nbytes)) + a.nbytes for a in batch.values())
        message = self._messages[0]
        offset = len(message) - tail + 1 + len(protos.varint(first.nbytes))
        width = self._digits * dtype.itemsize
        self._prefix, self._suffix = message[:offset], message[offset + width :]
        # a new place in the numbering on every run and worker, so an earlier run's requests miss the cache
        self._distinct = random.SystemRandom().randrange(self._capacity // 2)
        check = protos.ModelInferRequest.FromString(self.distinct())
        if check.raw_input_contents[0][:width] != self._digits_of(self._distinct).tobytes():
            raise AssertionError("the numbered request does not hold its number where expected")

    def _digits_of(self, number: int) -> np.ndarray[Any, Any]:
        return np.array([(number // self._base**i) % self._base for i in range(self._digits)], self._dtype)

    def distinct(self) -> bytes:
        self._distinct += 1
        if self._distinct == self._capacity:
            warning = (f"warning: {self._digits} {self._dtype} element(s) number only {self._capacity} distinct "
                       "requests; numbering starts over, so later 'distinct' ones repeat earlier ones")  # fmt: skip
            print(warning, file=sys.stderr)
        return self._prefix + self._digits_of(self._distinct % self._capacity).tobytes() + self._suffix

    def get(self, index: int) -> bytes:
        if self._ratio is None:
            return self._messages[index % len(self._messages)]
        if self._recent and self._rng.random() < self._ratio:
            return self._recent[self._rng.randrange(len(self._recent))]
        payload = self.distinct()
        self._recent.append(payload)
        if len(self._recent) > HOT_SET:
            self._recent.pop(0)
        return payload


class Unary:
    """ModelInfer calls, request i on connection i mod n. When the server closes a connection (a
    restart, a max connection age), the next call there opens a new one, as a gRPC channel would (at
    most one attempt per 100 ms)."""

    def __init__(
        self, connections: list[Connection], connect: Callable[[], Awaitable[Connection]], timeout_s: float | None
    ) -> None:
        self._connections = list(connections)
        self._connect = connect  # opens a new connection to the same server, as the first ones were
        self._path = protos.method_path("ModelInfer")
        self._timeout = timeout_s
        self._reconnecting: asyncio.Lock | None = None
        self._last_attempt = 0.0
        self._retired: list[Connection] = []  # replaced ones: the server may still be finishing calls there

    async def send(self, payload: bytes, index: int) -> str:
        slot = index % len(self._connections)
        connection = self._connections[slot]
        if connection.closed:
            connection = await self._reconnect(slot)
        return (await connection.unary(self._path, payload, self._timeout)).code.name

    async def _reconnect(self, slot: int) -> Connection:
        self._reconnecting = self._reconnecting or asyncio.Lock()
        async with self._reconnecting:
            if self._connections[slot].closed:  # (else another caller reconnected it meanwhile)
                await asyncio.sleep(max(self._last_attempt + 0.1 - time.monotonic(), 0))
                self._last_attempt = time.monotonic()
                with contextlib.suppress(OSError, asyncio.TimeoutError):  # else: UNAVAILABLE on the old one
                    fresh = await asyncio.wait_for(self._connect(), 5)
                    self._retired.append(self._connections[slot])
                    self._connections[slot] = fresh
            return self._connections[slot]

    async def close(self) -> None:
        await _close((*self._retired, *self._connections))


class Streams:
    """Requests over ``count`` ModelStreamInfer streams (request i on stream i mod count): a stream
    carries one write at a time, so one stream alone cannot keep a busy server fed."""

    def __init__(self, streams: list[_OneStream]) -> None:
        self._streams = streams

    @classmethod
    async def open(cls, connections: list[Connection], count: int = 1) -> Streams:
        """``count`` streams, stream k on connection k mod n (at most each one's MAX_CONCURRENT_STREAMS:
        streams never end, so more would wait forever)."""
        count = min(max(count, 1), sum(c.max_streams for c in connections))
        spread = [c for _, c in zip(range(count), itertools.cycle(connections))]
        return cls([await _OneStream.open(c) for c in spread])

    async def send(self, payload: bytes, index: int) -> str:
        return await self._streams[index % len(self._streams)].send(payload, index)

    async def close(self) -> None:
        for stream in self._streams:
            stream.close()


class _OneStream:
    """One ModelStreamInfer stream, answers matched by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._parse = protos.ModelStreamInferResponse.FromString
        self._broken = ""  # the stream's final status once it ended: later sends fail with it at once

    @classmethod
    async def open(cls, connection: Connection) -> _OneStream:
        self = cls()
        self._stream = await connection.stream(protos.method_path("ModelStreamInfer"), self._on_message)
        self._stream.status.add_done_callback(self._ended)
        return self

    def _on_message(self, data: bytes) -> None:
        response = self._parse(data)
        future = self._waiting.pop(response.infer_response.id, None)
        if future is None and response.error_message and self._waiting:
            # an error the server could not tie to a request (no id): charge it to the oldest one
            future = self._waiting.pop(next(iter(self._waiting)))
        if future is None or future.done():
            return
        if response.error_message:
            params = response.infer_response.parameters
            code = params["grpc_code"].int64_param if "grpc_code" in params else -1
            future.set_result(_CODE_NAMES.get(code, "UNKNOWN"))
        else:
            future.set_result("OK")

    def _ended(self, status: asyncio.Future[Reply]) -> None:
        code = grpc.StatusCode.CANCELLED if status.cancelled() else status.result().code
        self._broken = "UNAVAILABLE" if code == grpc.StatusCode.OK else code.name  # unanswered requests
        for future in self._waiting.values():
            if not future.done():
                future.set_result(self._broken)
        self._waiting.clear()

    async def send(self, payload: bytes, index: int) -> str:
        if self._broken:
            await asyncio.sleep(0)  # a closed loop must not spin without yielding
            return self._broken
        request_id = str(index)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        encoded = request_id.encode()
        self._stream.write(payload + b"\x1a" + protos.varint(len(encoded)) + encoded)  # id: the last one wins
        return await future

    def close(self) -> None:
        self._stream.cancel()


@dataclass
class Job:
    url: str
    model: str
    version: str
    batches: list[dict[str, np.ndarray[Any, Any]]]
    streaming: bool
    mode: str  # concurrency | request_rate
    level: float
    measurement: Measurement
    duplicate_ratio: float | None = None
    poisson: bool = False
    timeout_s: float | None = None
    seed: int = 0
    quiet: bool = False
    batch_size: int = 1
    start_at: float = 0.0  # wall-clock time to begin at (workers start together)
    connections: int | None = None  # None: one per 6 requests in flight (closed loop), as perf_analyzer
    tls: Tls | None = None
    headers: Headers = ()


CONTEXTS_PER_CONNECTION = 6  # perf_analyzer's clients share one gRPC connection per 6 (seen with `ss`)


def connection_count(job: Job) -> int:
    if job.connections:
        return job.connections
    return max(1, math.ceil(job.level / CONTEXTS_PER_CONNECTION)) if job.mode == "concurrency" else 1


async def _run_job(job: Job) -> LoadPoint:
    payloads = Payloads(job.model, job.version, job.batches, job.duplicate_ratio, job.seed)
    context = job.tls.ssl_context() if job.tls is not None else None
    hostname = job.tls.target_name if job.tls is not None else None

    def connect() -> Awaitable[Connection]:
        return Connection.open(job.url, ssl=context, server_hostname=hostname, headers=job.headers)

    connections = [await connect() for _ in range(connection_count(job))]
    try:
        await asyncio.sleep(max(job.start_at - time.time(), 0))
        streams = max(1, math.ceil(job.level / 2)) if job.mode == "concurrency" else 16  # 2 in flight each
        transport = (
            await Streams.open(connections, streams) if job.streaming else Unary(connections, connect, job.timeout_s)
        )
        get = payloads.get
        transport_send = transport.send

        async def send(index: int) -> str:
            return await transport_send(get(index), index)

        def progress(window: Window) -> None:
            if not job.quiet:
                lat = np.array(window.latencies) * 1000 if window.latencies else np.array([math.nan])
                print(f"  {job.mode} {job.level:g}: {window.rate() * job.batch_size:,.0f} infer/s, "
                      f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms",
                      file=sys.stderr, flush=True)  # fmt: skip

        try:
            if job.mode == "concurrency":
                return await closed_loop(send, int(job.level), job.measurement, progress, job.batch_size)
            return await open_loop(send, job.level, job.measurement, progress, job.poisson, job.seed, job.batch_size)
        finally:
            await transport.close()
    finally:
        await _close(connections)


async def _close(connections: Sequence[Connection]) -> None:
    """Close, and wait (not for long) until the sockets are closed."""
    for connection in connections:
        connection.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in connections)), 5)


def _worker(job: Job) -> LoadPoint:
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(_run_job(job))
    return uvloop.run(_run_job(job))


def measure(job: Job, workers: int = 1) -> dict[str, Any]:
    """One load point, split across ``workers`` processes; the merged summary."""
    if workers <= 1:
        point = _worker(job)
        return {**point.summary(), "stable": point.stable, "client_cpu_max": point.summary()["client_cpu"]}
    # every worker starts at the same moment and measures the same windows, so they can be added up
    fixed = Measurement(job.measurement.window_s, job.measurement.warmup_s, job.measurement.stability,
                        max_windows=job.measurement.max_windows, min_windows=job.measurement.max_windows)  # fmt: skip
    start_at = time.time() + 5.0  # spawning and importing take a few seconds
    shares = []
    for i in range(workers):
        level = job.level / workers if job.mode == "request_rate" else len(range(i, int(job.level), workers))
        shares.append(Job(**{**job.__dict__, "level": level, "seed": job.seed + i, "quiet": True,
                             "measurement": fixed, "start_at": start_at}))  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        points = pool.map(_worker, [s for s in shares if s.level > 0])
    merged = [_merge(same) for same in zip(*(p.windows[-3:] for p in points), strict=False)]
    summary = summarize(merged, job.batch_size)
    summary["stable"] = all(p.stable for p in points)
    summary["client_cpu_max"] = max(p.summary()["client_cpu"] for p in points)
    return summary


def _merge(windows: tuple[Window, ...]) -> Window:
    """The same window of several workers as one (their latencies and statuses together)."""
    statuses: Counter[str] = Counter()
    for w in windows:
        statuses.update(w.statuses)
    return Window(
        windows[0].seconds,
        [x for w in windows for x in w.latencies],
        statuses,
        [x for w in windows for x in w.send_lag],
        sum(w.cpu_seconds for w in windows),
    )


class ServerStats:
    """The statistics RPC before and after a load point: the server's side of it."""

    def __init__(self, url: str, model: str, version: str, options: dict[str, Any] | None = None) -> None:
        self._url, self._model, self._version = url, model, version
        self._options = options or {}  # Client's TLS and headers
        self._before: Any = None

    def _read(self) -> Any:
        try:
            with Client(self._url, timeout_s=10, **self._options) as client:
                return client.model_statistics(self._model, self._version).model_stats[0]
        except Exception:
            return None  # a server without the statistics extension

    def start(self) -> None:
        self._before = self._read()

    def delta(self) -> dict[str, Any]:
        after = self._read()
        if after is None or self._before is None:
            return {}
        a, b = after.inference_stats, self._before.inference_stats

        def per_request_us(name: str) -> float | None:
            count = getattr(a, name).count - getattr(b, name).count
            return (getattr(a, name).ns - getattr(b, name).ns) / count / 1000 if count else None

        executions = after.execution_count - self._before.execution_count
        hits = a.cache_hit.count - b.cache_hit.count
        lookups = hits + a.cache_miss.count - b.cache_miss.count
        return {
            "server_queue_us": per_request_us("queue"),
            "server_compute_input_us": per_request_us("compute_input"),
            "server_compute_infer_us": per_request_us("compute_infer"),
            "server_compute_output_us": per_request_us("compute_output"),
            "server_avg_batch": (after.inference_count - self._before.inference_count) / executions
            if executions
            else None,
            "server_cache_hit_ratio": hits / lookups if lookups else None,
        }


def _inputs(client: Client, args: argparse.Namespace) -> tuple[list[dict[str, np.ndarray[Any, Any]]], int]:
    """The request batches to send, and the batch size of each."""
    metadata = client.model_metadata(args.model, args.model_version)
    try:
        batching = client.model_config(args.model, args.model_version).max_batch_size > 0
    except InferenceServerError as exc:  # a server without the configuration extension (MLServer)
        if exc.code != grpc.StatusCode.UNIMPLEMENTED:
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
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model-version", default="")
    parser.add_argument(
        "--streaming", action="store_true", help="send over ModelStreamInfer streams (one per 2 requests in flight)"
    )
    loads = parser.add_mutually_exclusive_group()
    loads.add_argument("--concurrency", default=None, help="closed loop: comma-separated levels (default 1)")
    loads.add_argument("--request-rate", help="open loop: comma-separated requests/s")
    parser.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals (default constant gaps)")
    parser.add_argument("--max-p99-ms", type=float, help="stop the sweep at the first point whose p99 exceeds this")
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("--shape", action="append", default=[], help="NAME:D1,D2 for inputs with free dims")
    parser.add_argument("--input-data", default="random", help="random, zero, or a .npy/.npz file")
    parser.add_argument("--duplicate-ratio", type=float, help="fraction of requests repeating a recent input")
    parser.add_argument("--measurement-interval", type=int, default=2000, metavar="MS")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--stability-percentage", type=float, default=10.0)
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="client processes (when one core cannot keep up)")
    parser.add_argument(
        "--connections",
        type=int,
        help="HTTP/2 connections per worker (default: one per 6 requests in flight in a closed loop, as "
        "perf_analyzer's clients share them; 1 in an open loop)",
    )
    parser.add_argument("--timeout-s", type=float, help="per-request deadline (unary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results as .csv or .json (by extension)")
    parser.add_argument("--plot", type=Path, help="a PNG of latency percentiles against throughput")
    parser.add_argument("--quiet", action="store_true", help="no per-window progress")
    parser.add_argument("--log-level", default="WARNING")
    client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.duplicate_ratio is not None and not 0 <= args.duplicate_ratio <= 1:
        print("error: --duplicate-ratio must be between 0 and 1", file=sys.stderr)
        return 2
    if args.connections is not None and args.connections < 1:
        print("error: --connections must be at least 1", file=sys.stderr)
        return 2
    try:
        options = client_options(args)
        security = tls(**{k: v for k, v in options.items() if k != "headers"})
        if security is not None:
            security.ssl_context()  # the HTTP/2 connections' (made in each worker): refused here if it cannot be
        with Client(args.url, timeout_s=30, **options) as client:
            batches, batch_size = _inputs(client, args)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = "request_rate" if args.request_rate else "concurrency"
    levels = [float(x) for x in (args.request_rate or args.concurrency or "1").split(",")]
    if min(levels) <= 0:
        print(f"error: {mode.replace('_', ' ')} levels must be positive, got {levels}", file=sys.stderr)
        return 2
    measurement = Measurement(
        window_s=args.measurement_interval / 1000,
        warmup_s=args.warmup_s,
        stability=args.stability_percentage / 100,
        max_windows=max(args.max_trials, 3),
    )
    stats = ServerStats(args.url, args.model, args.model_version, options)
    rows: list[dict[str, Any]] = []
    for level in levels:
        job = Job(args.url, args.model, args.model_version, batches, args.streaming, mode, level, measurement,
                  args.duplicate_ratio, args.poisson, args.timeout_s, args.seed, args.quiet, batch_size,
                  connections=args.connections, tls=security, headers=tuple(options["headers"].items()))  # fmt: skip
        stats.start()
        try:
            summary = measure(job, args.workers)
        except OSError as exc:  # (ConnectionError, ssl.SSLError, TimeoutError)
            print(f"error: cannot open an HTTP/2 connection to {args.url}: {exc}", file=sys.stderr)
            return 1
        row = {"mode": mode, "concurrency": int(level) if mode == "concurrency" else "",
               "request_rate": level if mode == "request_rate" else "", **summary, **stats.delta()}  # fmt: skip
        rows.append(row)
        _warn(row, args)
        if args.max_p99_ms is not None:
            row["met_p99_bound"] = bool(row["p99_ms"] <= args.max_p99_ms)
            if not row["met_p99_bound"]:
                break
    _print_table(rows, args)
    if args.max_p99_ms is not None:
        met = [r for r in rows if r["met_p99_bound"]]
        best = f"{met[-1]['request_rate'] or met[-1]['concurrency']:g}" if met else "none"
        print(
            f"highest {'rate' if mode == 'request_rate' else 'concurrency'} with p99 <= {args.max_p99_ms:g} ms: {best}"
        )
    if args.out:
        _write(rows, args.out)
    if args.plot:
        _plot(rows, args.plot, mode)
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


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    level = "rate/s" if rows and rows[0]["mode"] == "request_rate" else "conc"
    header = [level, "infer/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "mean ms", "errors", "| queue us",
              "infer us", "batch", "cache hit", "| client cpu"]  # fmt: skip
    table = [header]
    for r in rows:
        errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        hit = r.get("server_cache_hit_ratio")
        table.append([
            _fmt(r["concurrency"] or r["request_rate"]), _fmt(r["infer_per_s"]), _fmt(r["p50_ms"]),
            _fmt(r["p90_ms"]), _fmt(r["p99_ms"]), _fmt(r["p999_ms"]), _fmt(r["mean_ms"]), errors,
            "| " + _fmt(r.get("server_queue_us"), 0), _fmt(r.get("server_compute_infer_us"), 0),
            _fmt(r.get("server_avg_batch"), 1), "-" if hit is None else f"{hit:.0%}", f"| {r['client_cpu']:.0%}",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    via = "ModelStreamInfer streams" if args.streaming else "unary ModelInfer"
    print(f"\n{args.model} at {args.url}, {via}, batch {args.batch_size} "
          "(server columns: its statistics over the whole load point, warm-up included)")  # fmt: skip
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    if path.suffix == ".json":
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        path.write_text(json.dumps(clean, indent=2, default=str) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "errors": json.dumps(row["errors"])})


def _plot(rows: list[dict[str, Any]], path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    throughput = [r["infer_per_s"] for r in rows]
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        axis.plot(throughput, [r[key] for r in rows], marker="o", label=label)
    for r in rows:
        axis.annotate(_fmt(r["concurrency"] or r["request_rate"]), (r["infer_per_s"], r["p50_ms"]),
                      textcoords="offset points", xytext=(3, -12), fontsize=8)  # fmt: skip
    axis.set_xlabel("throughput (inferences/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(f"latency percentiles vs throughput ({'concurrency' if mode == 'concurrency' else 'request rate'})")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
