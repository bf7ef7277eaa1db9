"""The load generator behind ``rapidserve bench``: closed and open loops, measured in time windows
until they are stable, independent of gRPC (it drives any ``send`` coroutine).

Closed loop: ``concurrency`` callers, each sending its next request when the previous answer came;
latency runs from send to answer. Open loop: requests are *scheduled* at a fixed rate (constant gaps,
or Poisson arrivals), sent when due whether or not earlier ones have been answered, and latency runs
from the scheduled time, so a server that falls behind cannot hide its queue (coordinated omission).
If the client itself falls behind its schedule, the lag lands in the latencies too and is reported.

Measurement follows perf_analyzer: after a warm-up, windows of ``window_s``; a load point is done
when the last three windows agree within ``stability`` on throughput and on p50 latency, or after
``max_windows``; its figures are those of the last three windows together.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LoadPoint", "Measurement", "Window", "closed_loop", "open_loop", "summarize"]

# send(index) -> a status name ("OK" or a gRPC code name); index counts the requests of this load point
Send = Callable[[int], Awaitable[str]]
MAX_OUTSTANDING = 50_000  # open loop: past this many unanswered requests the client stops sending


@dataclass
class Window:
    """What completed in one window: latencies (seconds) of the successes, and every status."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    send_lag: list[float] = field(default_factory=list)  # open loop: how late the client sent
    cpu_seconds: float = 0.0  # this process's CPU time during the window

    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


@dataclass
class Measurement:
    window_s: float = 2.0
    warmup_s: float = 1.0
    stability: float = 0.10
    max_windows: int = 10
    min_windows: int = 3


@dataclass
class LoadPoint:
    mode: str  # "concurrency" | "request_rate"
    level: float  # the concurrency, or the request rate offered
    windows: list[Window]
    stable: bool
    batch_size: int = 1

    def summary(self) -> dict[str, Any]:
        return summarize(self.windows[-3:], self.batch_size)


def summarize(windows: list[Window], batch_size: int = 1) -> dict[str, Any]:
    latencies = np.array([x for w in windows for x in w.latencies]) * 1000
    seconds = sum(w.seconds for w in windows)
    statuses: Counter[str] = Counter()
    for w in windows:
        statuses.update(w.statuses)
    errors = {code: n for code, n in statuses.items() if code != "OK"}
    lag = np.array([x for w in windows for x in w.send_lag]) * 1000
    stats: dict[str, Any] = {
        "requests_per_s": len(latencies) / seconds if seconds else 0.0,
        "errors": errors,
        "client_cpu": sum(w.cpu_seconds for w in windows) / seconds if seconds else 0.0,
    }
    stats["infer_per_s"] = stats["requests_per_s"] * batch_size
    for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p95_ms", 95), ("p99_ms", 99), ("p999_ms", 99.9)):
        stats[name] = float(np.percentile(latencies, q)) if len(latencies) else float("nan")
    stats["mean_ms"] = float(latencies.mean()) if len(latencies) else float("nan")
    stats["send_lag_p99_ms"] = float(np.percentile(lag, 99)) if len(lag) else 0.0
    return stats


def _stable(windows: list[Window], stability: float) -> bool:
    last = windows[-3:]
    if len(last) < 3:
        return False
    for values in ([w.rate() for w in last], [float(np.median(w.latencies)) if w.latencies else 0.0 for w in last]):
        low, high = min(values), max(values)
        if low <= 0 or (high - low) / low > stability:
            return False
    return True


class _Windows:
    """Sorts completions into consecutive windows and decides when the load point is done."""

    def __init__(self, measurement: Measurement, on_window: Callable[[Window], None] | None) -> None:
        self.m = measurement
        self.on_window = on_window
        self.start = time.perf_counter() + measurement.warmup_s
        self.current = Window(measurement.window_s)
        self.done: list[Window] = []
        self.finished = asyncio.get_running_loop().create_future()
        self._cpu = 0.0

    def record(self, latency_s: float, status: str, now: float, lag_s: float | None = None) -> None:
        if now < self.start or self.finished.done():
            return  # warm-up, or past the end
        while now >= self.start + (len(self.done) + 1) * self.m.window_s:
            self._close()
            if self.finished.done():
                return
        if status == "OK":
            self.current.latencies.append(latency_s)
        self.current.statuses[status] += 1
        if lag_s is not None:
            self.current.send_lag.append(lag_s)

    def tick(self) -> None:
        """Close windows that ended with nothing completing in them."""
        now = time.perf_counter()
        while not self.finished.done() and now >= self.start + (len(self.done) + 1) * self.m.window_s:
            self._close()

    def _close(self) -> None:
        cpu = time.process_time()
        self.current.cpu_seconds = cpu - self._cpu
        self._cpu = cpu
        self.done.append(self.current)
        if self.on_window is not None:
            self.on_window(self.current)
        self.current = Window(self.m.window_s)
        enough = len(self.done) >= self.m.min_windows and _stable(self.done, self.m.stability)
        if (enough or len(self.done) >= self.m.max_windows) and not self.finished.done():
            self.finished.set_result(enough)

    def begin(self) -> None:
        """The warm-up ended: CPU time counts from here."""
        self._cpu = time.process_time()


async def _ticker(windows: _Windows) -> None:
    await asyncio.sleep(windows.m.warmup_s)
    windows.begin()
    while not windows.finished.done():
        await asyncio.sleep(min(0.05, windows.m.window_s / 4))
        windows.tick()


async def closed_loop(
    send: Send,
    concurrency: int,
    measurement: Measurement,
    on_window: Callable[[Window], None] | None = None,
    batch_size: int = 1,
) -> LoadPoint:
    windows = _Windows(measurement, on_window)
    counter = iter(range(1 << 62))

    async def caller() -> None:
        clock = time.perf_counter
        while not windows.finished.done():
            start = clock()
            status = await send(next(counter))
            now = clock()
            windows.record(now - start, status, now)

    ticker = asyncio.create_task(_ticker(windows))
    callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    stable = await windows.finished
    await _stop([*callers, ticker])
    return LoadPoint("concurrency", concurrency, windows.done, stable, batch_size)


async def open_loop(
    send: Send,
    rate: float,
    measurement: Measurement,
    on_window: Callable[[Window], None] | None = None,
    poisson: bool = False,
    seed: int = 0,
    batch_size: int = 1,
) -> LoadPoint:
    """Send at ``rate`` requests per second; latency from each request's scheduled time."""
    if rate <= 0:
        raise ValueError(f"the request rate must be positive, got {rate}")
    windows = _Windows(measurement, on_window)
    rng = random.Random(seed)
    outstanding: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled: float) -> None:
        sent = time.perf_counter()
        status = await send(index)
        now = time.perf_counter()
        windows.record(now - scheduled, status, now, sent - scheduled)

    async def dispatcher() -> None:
        clock = time.perf_counter
        due = clock()
        index = 0
        while not windows.finished.done():
            due += rng.expovariate(rate) if poisson else 1.0 / rate
            # behind schedule the delay is <= 0: still yield, or the answers would never be read
            await asyncio.sleep(max(due - clock(), 0))
            if len(outstanding) >= MAX_OUTSTANDING:
                windows.record(0.0, "CLIENT_BACKLOG_FULL", clock())
                continue
            task = asyncio.create_task(one(index, due))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            index += 1

    ticker = asyncio.create_task(_ticker(windows))
    sender = asyncio.create_task(dispatcher())
    stable = await windows.finished
    await _stop([sender, ticker, *outstanding])
    return LoadPoint("request_rate", rate, windows.done, stable, batch_size)


async def _stop(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
