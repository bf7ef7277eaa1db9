"""One load point of ``rapidserve bench``: its connections, transport and payloads in one process, or
split across worker processes that start together and whose windows are added up. Over gRPC (HTTP/2,
``transports``) or over HTTP/1.1 (``http_transport``), with the same load loops and statistics. Over gRPC
the load may be spread round-robin over several servers (replicas), request by request."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve.clients._h2grpc import Connection
from rapidserve.clients._http1 import Http1Connection
from rapidserve.clients._rest import parse_url
from rapidserve.clients.bench.http_transport import HttpUnary
from rapidserve.clients.bench.payloads import HttpTarget, Payloads
from rapidserve.clients.bench.transports import RoundRobin, Streams, Transport, Unary, close_all
from rapidserve.clients.connection import Headers, Tls, http_ssl_context
from rapidserve.clients.loadgen import LoadPoint, Measurement, Window, closed_loop, open_loop, summarize

__all__ = ["CONTEXTS_PER_CONNECTION", "Job", "connection_count", "measure"]


@dataclass
class Job:
    url: str  # one server, or (gRPC) several separated by commas, loaded round-robin
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
    http: HttpTarget | None = None  # set: the URL is http(s):// and requests go over HTTP/1.1


CONTEXTS_PER_CONNECTION = 6  # perf_analyzer's clients share one gRPC connection per 6 (seen with `ss`)


def connection_count(job: Job) -> int:
    if job.http is not None:  # HTTP/1.1 carries one request at a time: one per request in flight
        return int(job.level) if job.mode == "concurrency" else job.connections or 1
    if job.connections:
        return job.connections
    return max(1, math.ceil(job.level / CONTEXTS_PER_CONNECTION)) if job.mode == "concurrency" else 1


async def _run_job(job: Job) -> LoadPoint:
    payloads = Payloads(job.model, job.version, job.batches, job.duplicate_ratio, job.seed, job.http)
    if job.http is not None:
        endpoint = parse_url(job.url)
        tls = job.tls if job.tls is not None or not endpoint.tls else Tls()
        context = http_ssl_context(tls) if tls is not None else None

        def connect_http() -> Awaitable[Http1Connection]:
            hostname = tls.target_name if tls is not None else None
            return Http1Connection.open(endpoint.host, endpoint.port, context, hostname)

        transport = await HttpUnary.open(connect_http, connection_count(job), job.timeout_s)
        await asyncio.sleep(max(job.start_at - time.time(), 0))
        return await _drive(job, payloads, transport)
    context = job.tls.ssl_context() if job.tls is not None else None
    hostname = job.tls.target_name if job.tls is not None else None
    urls = job.url.split(",")
    # each server gets its share of the connections and streams (at least one of each)
    per_server = math.ceil(connection_count(job) / len(urls))
    streams = max(1, math.ceil(job.level / 2)) if job.mode == "concurrency" else 16  # 2 in flight each
    connections: list[Connection] = []
    servers: list[tuple[list[Connection], Callable[[], Awaitable[Connection]]]] = []
    try:
        for url in urls:

            def connect(url: str = url) -> Awaitable[Connection]:
                return Connection.open(url, ssl=context, server_hostname=hostname, headers=job.headers)

            own = [await connect() for _ in range(per_server)]
            connections += own
            servers.append((own, connect))
        await asyncio.sleep(max(job.start_at - time.time(), 0))
        transports: list[Transport] = [
            await Streams.open(own, math.ceil(streams / len(urls)))
            if job.streaming
            else Unary(own, connect, job.timeout_s)
            for own, connect in servers
        ]
        return await _drive(job, payloads, transports[0] if len(transports) == 1 else RoundRobin(transports))
    finally:
        await close_all(connections)


async def _drive(job: Job, payloads: Payloads, transport: Transport) -> LoadPoint:
    """The load loop of ``job`` over ``transport``, which is closed at the end."""
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
