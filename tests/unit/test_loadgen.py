"""The load generator's method, against a fake server with a fixed service time (no gRPC)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np

from rapidserve.clients.loadgen import Measurement, closed_loop, open_loop

SERVICE_S = 0.004  # one request at a time, 4 ms each: 250 requests/s at most


class FakeServer:
    """A single-worker queue: requests are served one at a time, in arrival order."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.served = 0

    async def send(self, index: int) -> str:
        async with self._lock:
            await asyncio.sleep(SERVICE_S)
            self.served += 1
        return "OK"


MEASURE = Measurement(window_s=0.5, warmup_s=0.2, stability=10.0, min_windows=4, max_windows=4)


async def test_open_loop_latency_grows_with_the_backlog_while_a_closed_loops_stays_flat() -> None:
    overloaded = await open_loop(FakeServer().send, rate=400, measurement=MEASURE)  # 1.6x what it can serve
    closed = await closed_loop(FakeServer().send, concurrency=4, measurement=MEASURE)

    open_p50 = [float(np.median(w.latencies)) for w in overloaded.windows]
    closed_p50 = [float(np.median(w.latencies)) for w in closed.windows]
    # the open loop's queue grows by ~150 requests a second: each window's latency is higher than the last
    assert all(later > earlier * 1.2 for earlier, later in itertools.pairwise(open_p50)), open_p50
    assert open_p50[-1] > 20 * SERVICE_S
    # the closed loop never has more than 4 requests waiting: ~4 service times, window after window
    assert max(closed_p50) < 1.6 * min(closed_p50), closed_p50
    assert max(closed_p50) < 8 * SERVICE_S
    # both served the server's capacity, not what the open loop offered
    for point in (overloaded, closed):
        assert 150 < point.summary()["requests_per_s"] < 260


async def test_open_loop_sends_at_the_offered_rate_when_the_server_keeps_up() -> None:
    server = FakeServer()
    point = await open_loop(server.send, rate=100, measurement=MEASURE, poisson=True)
    summary = point.summary()
    assert 80 < summary["requests_per_s"] < 120
    assert summary["p50_ms"] < 3 * SERVICE_S * 1000  # little queueing at 40% load
    assert summary["errors"] == {}


async def test_closed_loop_stops_when_three_windows_agree() -> None:
    point = await closed_loop(FakeServer().send, 2, Measurement(window_s=0.3, warmup_s=0.1, stability=0.5))
    assert point.stable and len(point.windows) == 3
