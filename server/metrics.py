"""Prometheus metrics: ``/metrics`` on its own port, every family on one injected ``CollectorRegistry``.

The event loop records into plain objects (``ModelStats`` per version, ``ServerStats``, the cache's
``CacheStats``); this module turns them into metric families when Prometheus scrapes. A scrape runs
in prometheus_client's HTTP thread: it asks the event loop for a copy of the numbers (so it never
reads a half-updated record), then builds the families in its own thread.

Names carry the prefix ``rapidserve_``; labels are ``model`` and ``version``, plus ``reason`` on
failures and ``quantile`` on the percentile summaries. Requests naming no loaded model are counted
with empty ``model`` and ``version`` labels. The calls at the protocol edges are labelled
``protocol``, ``endpoint`` and ``outcome`` instead (no model). ``docs/metrics.md`` maps each family
to Triton's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rapidserve.server.gpu_metrics import GpuCollector
from rapidserve.server.manager import ModelManager
from rapidserve.server.ports import bind_error
from rapidserve.server.stats import QUANTILES, Histogram, LatencyWindow, ServerStats

__all__ = ["MetricsServer", "RapidServeCollector", "Snapshot", "take_snapshot"]

log = logging.getLogger(__name__)

T = TypeVar("T")
LABELS = ["model", "version"]
CALL_LABELS = ["protocol", "endpoint"]
SNAPSHOT_TIMEOUT_S = 3.0  # under Prometheus's usual scrape timeout; the process metrics still answer
# every version reports these from zero, so that rate() and increase() see the first failure
MODEL_FAILURE_REASONS = (
    "invalid", "rejected", "too_large", "timeout", "cancelled", "engine_error", "unavailable", "internal"
)  # fmt: skip

# (attribute of ModelStats, family name, help) for the histograms
_HISTOGRAMS = (
    ("request_seconds", "rapidserve_request_duration_seconds",
     "Server-side duration of successful inference requests (cache hits included), seconds."),
    ("queue_seconds", "rapidserve_queue_duration_seconds",
     "Time requests waited in the batcher's queue before their batch started, seconds."),
    ("compute_input_seconds", "rapidserve_compute_input_duration_seconds",
     "Per execution (batch): time to assemble the batch's inputs, seconds."),
    ("compute_infer_seconds", "rapidserve_compute_infer_duration_seconds",
     "Per execution (batch): time the engine ran, seconds."),
    ("compute_output_seconds", "rapidserve_compute_output_duration_seconds",
     "Per execution (batch): time to split the outputs back to the requests, seconds."),
    ("batch_size", "rapidserve_batch_size", "Batch size (inferences) of each execution."),
)  # fmt: skip


@dataclass(slots=True)
class VersionSnapshot:
    name: str
    version: str
    counters: dict[str, float]
    failures: dict[str, int]
    histograms: dict[str, tuple[tuple[float, ...], list[int], float]]  # attribute -> (bounds, counts, sum)
    windows: dict[str, tuple[LatencyWindow, dict[int, int]]]  # attribute -> (window, its merged counts)
    pending: int
    running: int
    load_seconds: float


@dataclass(slots=True)
class Snapshot:
    versions: list[VersionSnapshot] = field(default_factory=list)
    server_failures: dict[str, int] = field(default_factory=dict)
    ready: list[tuple[str, str, bool]] = field(default_factory=list)  # (model, version, ready)
    cache: dict[str, float] | None = None
    calls: dict[tuple[str, str, bool], int] = field(default_factory=dict)
    call_seconds: dict[tuple[str, str], tuple[tuple[float, ...], list[int], float]] = field(default_factory=dict)


def take_snapshot(manager: ModelManager, server: ServerStats) -> Snapshot:
    """Copy every number a scrape needs; runs on the event loop, so the copy is consistent."""
    snapshot = Snapshot(
        server_failures=dict(server.failures),
        calls=dict(server.calls),
        call_seconds={key: _copy(histogram) for key, histogram in server.call_seconds.items()},
    )
    for model in manager.loaded():
        stats = model.stats
        snapshot.versions.append(
            VersionSnapshot(
                name=model.name,
                version=str(model.version),
                counters={
                    "success": stats.success.count,
                    "inference": stats.inference_count + stats.shared_inferences,
                    "execution": stats.execution_count,
                    "cache_hit": stats.cache_hit.count,
                    "cache_miss": stats.cache_miss.count,
                    "cache_join": stats.cache_joins,
                },
                failures=dict(stats.failures),
                histograms={attr: _copy(getattr(stats, attr)) for attr, _, _ in _HISTOGRAMS},
                windows={
                    "request_seconds": (stats.request_window, stats.request_window.counts()),
                    "queue_seconds": (stats.queue_window, stats.queue_window.counts()),
                },
                pending=model.pending_requests,
                running=model.executions_in_flight,
                load_seconds=model.load_seconds,
            )
        )
    snapshot.ready = manager.states()
    cache = manager.cache
    if cache is not None:
        snapshot.cache = {
            "bytes": cache.used_bytes,
            "capacity": cache.capacity_bytes,
            "entries": len(cache),
            "evictions": cache.stats.evictions,
        }
        if cache.shared is not None:
            shared = cache.shared.stats
            snapshot.cache.update(l2_hits=shared.hits, l2_misses=shared.misses, l2_errors=shared.errors)
    return snapshot


def _copy(histogram: Histogram) -> tuple[tuple[float, ...], list[int], float]:
    return histogram.bounds, list(histogram.counts), histogram.sum


class RapidServeCollector(Collector):
    """Builds rapidserve's metric families from a snapshot taken when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        """The families' names and types, without asking the event loop (registration calls this)."""
        yield from self._families(Snapshot(cache={"bytes": 0, "capacity": 0, "entries": 0, "evictions": 0}))

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._snapshot()
        except Exception as exc:  # the event loop did not answer in time, or is gone
            log.warning("metrics scrape without rapidserve's families: %s: %s", type(exc).__name__, exc)
            return
        yield from self._families(snap)

    def _families(self, snap: Snapshot) -> Iterator[Metric]:
        counters = {
            "success": CounterMetricFamily(
                "rapidserve_request_success", "Successful inference requests (cache hits included).", labels=LABELS
            ),
            "inference": CounterMetricFamily(
                "rapidserve_inference",
                "Inferences: batch elements of successful requests, cache hits included.",
                labels=LABELS,
            ),
            "execution": CounterMetricFamily(
                "rapidserve_execution", "Model executions (batches run by an engine).", labels=LABELS
            ),
            "cache_hit": CounterMetricFamily(
                "rapidserve_cache_hit", "Requests answered by the prediction cache.", labels=LABELS
            ),
            "cache_miss": CounterMetricFamily(
                "rapidserve_cache_miss", "Requests to a cached model that the cache could not answer.", labels=LABELS
            ),
            "cache_join": CounterMetricFamily(
                "rapidserve_cache_join",
                "Cache misses that waited for an identical request's computation (single-flight).",
                labels=LABELS,
            ),
        }
        failures = CounterMetricFamily(
            "rapidserve_request_failure",
            "Failed inference requests by reason: invalid, rejected (queue full), timeout, cancelled, "
            "engine_error, unavailable, not_found, internal. Requests naming no loaded model have empty "
            "model and version labels.",
            labels=[*LABELS, "reason"],
        )
        histograms = {attr: HistogramMetricFamily(name, doc, labels=LABELS) for attr, name, doc in _HISTOGRAMS}
        summaries = {
            "request_seconds": Metric(
                "rapidserve_request_latency_seconds",
                "Percentiles of successful requests' durations over the last minute; count and sum since start.",
                "summary",
            ),
            "queue_seconds": Metric(
                "rapidserve_queue_latency_seconds",
                "Percentiles of queue waits over the last minute; count and sum since start.",
                "summary",
            ),
        }
        pending = GaugeMetricFamily(
            "rapidserve_queue_pending_requests", "Requests waiting in the batcher's queue.", labels=LABELS
        )
        running = GaugeMetricFamily("rapidserve_executions_in_flight", "Batches executing now.", labels=LABELS)
        load = GaugeMetricFamily(
            "rapidserve_model_load_duration_seconds", "How long the version took to load.", labels=LABELS
        )
        for v in snap.versions:
            labels = [v.name, v.version]
            for key, family in counters.items():
                family.add_metric(labels, v.counters[key])
            for reason in sorted({*MODEL_FAILURE_REASONS, *v.failures}):
                failures.add_metric([*labels, reason], v.failures.get(reason, 0))
            for attr, (bounds, counts, total) in v.histograms.items():
                histograms[attr].add_metric(labels, _buckets(bounds, counts), total)
            for attr, (window, merged) in v.windows.items():
                _, counts, total = v.histograms[attr]
                _add_summary(summaries[attr], labels, window.quantiles(QUANTILES, merged), sum(counts), total)
            pending.add_metric(labels, v.pending)
            running.add_metric(labels, v.running)
            load.add_metric(labels, v.load_seconds)
        for reason, count in sorted(snap.server_failures.items()):
            failures.add_metric(["", "", reason], count)
        ready = GaugeMetricFamily(
            "rapidserve_model_ready",
            "1 for each loaded, ready version; 0 for a model that is not (version empty).",
            labels=LABELS,
        )
        for name, version, is_ready in snap.ready:
            ready.add_metric([name, version], 1.0 if is_ready else 0.0)
        yield from counters.values()
        yield failures
        yield from histograms.values()
        yield from summaries.values()
        yield from (pending, running, load, ready)
        yield from _call_families(snap)
        if snap.cache is not None:
            yield GaugeMetricFamily(
                "rapidserve_cache_bytes", "Bytes held by the prediction cache.", snap.cache["bytes"]
            )
            yield GaugeMetricFamily(
                "rapidserve_cache_capacity_bytes", "The prediction cache's size limit.", snap.cache["capacity"]
            )
            yield GaugeMetricFamily(
                "rapidserve_cache_entries", "Entries in the prediction cache.", snap.cache["entries"]
            )
            yield CounterMetricFamily(
                "rapidserve_cache_eviction", "Entries evicted to make room (all models).", snap.cache["evictions"]
            )
            if "l2_errors" in snap.cache:
                yield from _shared_families(snap.cache)


def _shared_families(cache: dict[str, float]) -> Iterator[Metric]:
    """The Redis cache level's lookups (all models), and its errors: each a request computed instead."""
    yield CounterMetricFamily(
        "rapidserve_cache_l2_hits", "Lookups answered by the shared (Redis) cache level.", cache["l2_hits"]
    )
    yield CounterMetricFamily(
        "rapidserve_cache_l2_misses", "Lookups the shared (Redis) cache level could not answer.", cache["l2_misses"]
    )
    yield CounterMetricFamily(
        "rapidserve_cache_l2_errors",
        "Lookups and stores of the shared (Redis) cache level that failed, came too late or were not sent "
        "(too many under way), and stored values that did not decode.",
        cache["l2_errors"],
    )


def _call_families(snap: Snapshot) -> Iterator[Metric]:
    """Calls at the protocol edges: a counter by outcome (both outcomes of every protocol and endpoint
    seen, from 0) and a histogram of the successful ones' durations."""
    calls = CounterMetricFamily(
        "rapidserve_call",
        "Calls answered at the protocol edges, by protocol (grpc, http), endpoint (Triton's API group: "
        "inference, health, metadata, ...) and outcome (success, failure).",
        labels=[*CALL_LABELS, "outcome"],
    )
    for protocol, endpoint in sorted({key[:2] for key in snap.calls}):
        for outcome, ok in (("success", True), ("failure", False)):
            calls.add_metric([protocol, endpoint, outcome], snap.calls.get((protocol, endpoint, ok), 0))
    durations = HistogramMetricFamily(
        "rapidserve_call_duration_seconds",
        "Duration of successful calls at the protocol edges, from the request's arrival to its answer, seconds.",
        labels=CALL_LABELS,
    )
    for (protocol, endpoint), (bounds, counts, total) in sorted(snap.call_seconds.items()):
        durations.add_metric([protocol, endpoint], _buckets(bounds, counts), total)
    yield calls
    yield durations


def _add_summary(family: Metric, labels: list[str], quantiles: dict[float, float], count: int, total: float) -> None:
    """One labelled summary: a sample per quantile (none while the window is empty), then count and sum."""
    names = dict(zip(LABELS, labels, strict=True))
    for q, value in sorted(quantiles.items()):
        family.add_sample(family.name, {**names, "quantile": floatToGoString(q)}, value)
    family.add_sample(family.name + "_count", names, count)
    family.add_sample(family.name + "_sum", names, total)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last."""
    out: list[tuple[str, float]] = []
    seen = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        seen += count
        out.append((floatToGoString(bound), seen))
    return out


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` on the event loop from another thread and wait for its result."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result(timeout_s)


class MetricsServer:
    """Serves ``/metrics`` over HTTP from prometheus_client's server thread."""

    def __init__(
        self,
        manager: ModelManager,
        server_stats: ServerStats,
        registry: CollectorRegistry | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ):
        """``refresh``, where given, is awaited on the event loop before each scrape's copy (the engine
        process gathers its front ends' records into ``server_stats`` there)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._refresh = refresh
        self._manager = manager
        self._server_stats = server_stats
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Register the collectors and bind ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        manager, stats, refresh = self._manager, self._server_stats, self._refresh

        def snapshot() -> Snapshot:
            if refresh is not None:
                asyncio.run_coroutine_threadsafe(refresh(), loop).result(SNAPSHOT_TIMEOUT_S)
            return _on_loop(loop, lambda: take_snapshot(manager, stats), SNAPSHOT_TIMEOUT_S)

        self.registry.register(RapidServeCollector(snapshot))
        ProcessCollector(namespace="rapidserve", registry=self.registry)
        gpus = GpuCollector()
        gpus.probe()  # at start, so that a scrape never logs why there are no GPU metrics
        self.registry.register(gpus)
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError:
            raise bind_error(host, port, "metrics", "--metrics-port", "--metrics-host") from None
        self.port = int(self._http.server_port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
