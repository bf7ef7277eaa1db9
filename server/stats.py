"""What the server records about requests: cumulative durations in the shape of the statistics
extension (ModelStatistics), failure counts by reason, Prometheus-style latency histograms and
sliding-window percentiles.

Everything here is updated on the event loop thread only, so plain integers suffice. Recording a
request costs a few dictionary and list updates (``benchmarks/metrics_overhead.py`` measures it);
the exporter (``rapidserve.server.metrics``) takes copies on the event loop and does the rest of its
work in its own thread.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS_S",
    "Duration",
    "Histogram",
    "LatencyWindow",
    "ModelStats",
    "ServerStats",
]

# Seconds: 50 us to 10 s, so that both a cache hit and a slow CNN batch land in a bucket of their own.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class Histogram:
    """Counts per bucket (``value <= bound``, plus one for +Inf) and the sum: Prometheus's histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class LatencyWindow:
    """Percentiles of the latencies recorded in the last ``window_s`` seconds, each within 1%.

    A sample is counted in a logarithmic bucket (bucket k holds (g^(k-1), g^k] with g = 1.01/0.99,
    the DDSketch construction), in the slot of the window it arrived in; whole slots expire as time
    moves on, so the window covers between ``window_s - window_s/slots`` and ``window_s`` seconds.
    Recording is one logarithm and one dictionary update; a quantile walks the distinct buckets (a
    few hundred at most between 1 us and 100 s), never the samples.
    """

    RELATIVE_ERROR = 0.01

    def __init__(self, window_s: float = 60.0, slots: int = 6, clock: Callable[[], float] = time.monotonic) -> None:
        gamma = (1 + self.RELATIVE_ERROR) / (1 - self.RELATIVE_ERROR)
        self._gamma = gamma
        self._inv_log_gamma = 1 / math.log(gamma)
        self._floor_key = math.ceil(math.log(1e-9) * self._inv_log_gamma)  # everything below 1 ns
        self._window_s = window_s
        self._slot_s = window_s / slots
        self._clock = clock
        self._current: dict[int, int] = {}
        self._current_end = -math.inf
        self._past: deque[tuple[float, dict[int, int]]] = deque()  # (end time, counts), oldest first

    def add(self, seconds: float) -> None:
        now = self._clock()
        if now >= self._current_end:
            self._rotate(now)
        key = math.ceil(math.log(seconds) * self._inv_log_gamma) if seconds > 1e-9 else self._floor_key
        counts = self._current
        counts[key] = counts.get(key, 0) + 1

    def counts(self) -> dict[int, int]:
        """The bucket counts of the samples still in the window, merged."""
        oldest_end = self._clock() - self._window_s  # a slot that ended before this is out of the window
        merged: dict[int, int] = {}
        slots = [counts for end, counts in (*self._past, (self._current_end, self._current)) if end > oldest_end]
        for counts in slots:
            for key, n in counts.items():
                merged[key] = merged.get(key, 0) + n
        return merged

    def quantiles(self, qs: Iterable[float] = QUANTILES, counts: dict[int, int] | None = None) -> dict[float, float]:
        """{q: latency in seconds} over the window (nearest rank); empty when no sample is in it."""
        merged = self.counts() if counts is None else counts
        total = sum(merged.values())
        if not total:
            return {}
        keys = sorted(merged)
        result: dict[float, float] = {}
        for q in sorted(qs):
            rank = q * (total - 1)
            seen = 0
            for key in keys:
                seen += merged[key]
                if seen > rank:
                    result[q] = 2 * self._gamma**key / (self._gamma + 1)
                    break
        return result

    def _rotate(self, now: float) -> None:
        if self._current:
            self._past.append((self._current_end, self._current))
        self._current = {}
        self._current_end = (now // self._slot_s + 1) * self._slot_s
        while self._past and self._past[0][0] <= now - self._window_s:
            self._past.popleft()


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


def _latency_histogram() -> Histogram:
    return Histogram(LATENCY_BUCKETS_S)


@dataclass(slots=True)
class ModelStats:
    """One model version's record. Field meanings follow Triton's statistics extension: ``success``
    and ``queue`` include cache hits (with no queue time), ``compute_*``, ``inference_count`` and
    ``execution_count`` do not; ``compute_*`` count once per request, each with its batch's time."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    cache_joins: int = 0  # misses that waited for an identical computation instead of running one
    shared_inferences: int = 0  # batch elements answered without an execution: cache hits, single-flight joins
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by reason (RapidServeError.reason)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # for Prometheus: seconds per successful request, per queued request, per execution
    request_seconds: Histogram = field(default_factory=_latency_histogram)
    queue_seconds: Histogram = field(default_factory=_latency_histogram)
    compute_input_seconds: Histogram = field(default_factory=_latency_histogram)
    compute_infer_seconds: Histogram = field(default_factory=_latency_histogram)
    compute_output_seconds: Histogram = field(default_factory=_latency_histogram)
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    request_window: LatencyWindow = field(default_factory=LatencyWindow)
    queue_window: LatencyWindow = field(default_factory=LatencyWindow)

    def succeeded(self, ns: int) -> None:
        self.success.add(ns)
        seconds = ns * 1e-9
        self.request_seconds.observe(seconds)
        self.request_window.add(seconds)

    def failed(self, reason: str, ns: int = 0) -> None:
        self.fail.add(ns)
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def queued(self, ns: int) -> None:
        """A request left the queue for an execution after ``ns``."""
        self.queue.add(ns)
        seconds = ns * 1e-9
        self.queue_seconds.observe(seconds)
        self.queue_window.add(seconds)

    def cache_hit_served(self, ns: int, batch_size: int) -> None:
        self.cache_hit.add(ns)
        self.shared_served(ns, batch_size)

    def shared_served(self, ns: int, batch_size: int) -> None:
        """A request answered by another's computation (a cache hit, or a join of an identical
        request in flight): a success and inferences, with no queue time and no execution."""
        self.queue.add(0)
        self.shared_inferences += batch_size
        self.last_inference_ms = int(time.time() * 1000)
        self.succeeded(ns)

    def record_execution(self, requests: int, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.inference_count += batch_size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        self.compute_input_seconds.observe(input_ns * 1e-9)
        self.compute_infer_seconds.observe(infer_ns * 1e-9)
        self.compute_output_seconds.observe(output_ns * 1e-9)
        self.batch_size.observe(batch_size)
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)


@dataclass(slots=True)
class ServerStats:
    """Server-wide records. ``failures``: inference requests that reached no model version (unknown
    model or version, model not loaded), by reason, without a model label, so that clients cannot
    grow label sets. ``calls`` and ``call_seconds``: every call at the protocol edges (gRPC, HTTP) by
    protocol and endpoint, so that the two front ends can be compared on the same traffic."""

    failures: dict[str, int] = field(default_factory=dict)
    calls: dict[tuple[str, str, bool], int] = field(default_factory=dict)  # (protocol, endpoint, ok) -> count
    call_seconds: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # successful calls only

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def expect_calls(self, protocol: str, endpoint: str) -> None:
        """Report ``endpoint``'s calls from zero before the first one comes, so that rate() and
        histogram_quantile() over a window see that first call (a series born with it would not)."""
        for ok in (True, False):
            self.calls.setdefault((protocol, endpoint, ok), 0)
        self.call_seconds.setdefault((protocol, endpoint), Histogram(LATENCY_BUCKETS_S))

    def snapshot(self) -> tuple[Any, ...]:
        """Plain copies of the records (for another process to add up with ``add``)."""
        histograms = {key: (h.bounds, list(h.counts), h.sum) for key, h in self.call_seconds.items()}
        return dict(self.failures), dict(self.calls), histograms

    def add(self, snapshot: tuple[Any, ...]) -> None:
        """Add another process's records (a ``snapshot()``) to these."""
        failures, calls, histograms = snapshot
        for reason, count in failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count
        for key, count in calls.items():
            self.calls[key] = self.calls.get(key, 0) + count
        for key, (bounds, counts, total) in histograms.items():
            histogram = self.call_seconds.get(key)
            if histogram is None:
                histogram = self.call_seconds[key] = Histogram(bounds)
            histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
            histogram.sum += total

    def record_call(self, protocol: str, endpoint: str, ok: bool, seconds: float) -> None:
        """One call answered at an edge. ``protocol`` is "grpc" or "http"; ``endpoint`` one of a fixed
        set of names (Triton's API groups), never anything a client chose; ``seconds`` from the request's
        arrival at the edge to its answer, recorded in the histogram for successful calls (as the
        per-model request histogram is)."""
        key = (protocol, endpoint, ok)
        self.calls[key] = self.calls.get(key, 0) + 1
        if ok:
            histogram = self.call_seconds.get(key[:2])
            if histogram is None:
                histogram = self.call_seconds[key[:2]] = Histogram(LATENCY_BUCKETS_S)
            histogram.observe(seconds)
