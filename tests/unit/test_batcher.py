"""Deterministic tests of the dynamic batcher with a fake engine (no gRPC, no ONNX Runtime)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import numpy as np
import pytest

from rapidserve.common.types import TensorSpec
from rapidserve.engines.base import EngineInputError, may_run_inline
from rapidserve.server import batcher as batcher_module
from rapidserve.server.batcher import BatcherConfig, DynamicBatcher
from rapidserve.server.config import complete_config, parse_config
from rapidserve.server.errors import DeadlineExceeded, EngineError, InvalidRequest, Overloaded, Unavailable
from rapidserve.server.isolation import FaultIsolation
from rapidserve.server.loading import LoadedVersion
from rapidserve.server.model import ModelVersion
from rapidserve.server.stats import ModelStats
from rapidserve.server.types import InferRequest

pytestmark = pytest.mark.timeout(30)


class FakeEngine:
    """Doubles its input. Records every batch; ``hold()`` blocks executions until ``release()``."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.threads: list[threading.Thread] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on = fail_on

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def infer(self, inputs, outputs):
        self.started.set()
        self.gate.wait(10)
        x = inputs["x"]
        self.batches.append(x.copy())
        self.threads.append(threading.current_thread())
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("poisoned row")
        return {"y": x * 2, "z": x.sum(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x}


def request(value: float, rows: int = 1, width: int = 3, **parameters) -> InferRequest:
    return InferRequest("m", "", {"x": np.full((rows, width), value, np.float32)}, parameters=parameters)


def make(engine: FakeEngine, instances: int = 1, **config) -> DynamicBatcher:
    config.setdefault("max_batch_size", 8)
    config.setdefault("inline_below_s", 0)  # worker threads, so that hold() never blocks the event loop
    return DynamicBatcher("m", [engine.infer] * instances, BatcherConfig(**config), ModelStats())


async def wait_started(engine: FakeEngine) -> None:
    while not engine.started.is_set():
        await asyncio.sleep(0.001)


async def test_requests_queued_while_busy_form_one_batch_and_get_their_own_rows() -> None:
    engine = FakeEngine()
    batcher = make(engine)
    engine.hold()
    first = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    sizes = [1, 2, 1, 3, 1]  # 8 rows: exactly max_batch_size
    tasks = [asyncio.ensure_future(batcher.submit(request(i + 1, rows), ["y"])) for i, rows in enumerate(sizes)]
    await asyncio.sleep(0.01)
    engine.release()
    results = await asyncio.gather(first, *tasks)
    assert [len(b) for b in engine.batches] == [1, 8]
    for i, (rows, result) in enumerate(zip(sizes, results[1:], strict=True)):
        np.testing.assert_array_equal(result["y"], np.full((rows, 3), (i + 1) * 2, np.float32))
        assert list(result) == ["y"]  # only what was requested
    await batcher.close()


async def test_max_batch_size_and_trailing_shapes_split_batches() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=4)
    engine.hold()
    first = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    tasks = [
        batcher.submit(request(1, rows=2), ["y"]),
        batcher.submit(request(2, rows=2), ["y"]),
        batcher.submit(request(3, rows=2), ["y"]),
        batcher.submit(request(4, rows=1, width=5), ["y"]),  # other trailing shape: never merged
    ]
    tasks = [asyncio.ensure_future(t) for t in tasks]
    await asyncio.sleep(0.01)
    engine.release()
    results = await asyncio.gather(first, *tasks)
    assert [b.shape for b in engine.batches] == [(1, 3), (4, 3), (2, 3), (1, 5)]
    assert results[4]["y"].shape == (1, 5)
    await batcher.close()


class FakeClock:
    """Stands in for the batcher's ``time.monotonic()``: the batcher's notion of "now" moves only when a
    test moves it, so whether a batch waited out its delay never depends on the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def monotonic_ns() -> int:
        return time.monotonic_ns()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batcher_module, "time", fake)
    return fake


async def turns(count: int = 5) -> None:
    """Let the event loop run a few times (callbacks scheduled with call_soon included)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_fixed_mode_waits_the_delay_measured_from_the_oldest_request(clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=0.25, adaptive=False)
    first = asyncio.ensure_future(batcher.submit(request(1), ["y"]))
    await turns()
    clock.now += 0.125  # (binary fractions: the sums are exact)
    second = asyncio.ensure_future(batcher.submit(request(2), ["y"]))
    await asyncio.sleep(0.3)  # real time passes, the batcher's does not: its timers fire and find it early
    assert not engine.batches and not first.done()
    clock.now += 0.125  # 0.25 s after the first request, 0.125 s after the second
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert [len(b) for b in engine.batches] == [2]
    await batcher.close()


async def test_adaptive_mode_never_makes_a_lone_client_wait_out_the_delay() -> None:
    """A delay of a minute, each request given a third of it: one that waited would fail. More requests
    than the one-in-64 decisions that may wait to learn the load."""
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=60.0)
    for i in range(3 * 64 + 1):
        result = await asyncio.wait_for(batcher.submit(request(i), ["y"]), 20)
        assert result["y"][0, 0] == 2 * i
    assert [len(b) for b in engine.batches] == [1] * (3 * 64 + 1)
    await batcher.close()


async def test_adaptive_mode_batches_a_steady_stream_that_would_never_share_a_batch_by_itself() -> None:
    """One request every 2 ms, each arriving alone, onto 8 instances that take 5 ms a call: a batcher that
    never waits runs every request alone on a free instance (all batches of 1); the adaptive one learns
    that requests join while it waits, and waits."""

    class Slow(FakeEngine):
        def infer(self, inputs, outputs):
            time.sleep(0.005)
            return super().infer(inputs, outputs)

    engine = Slow()
    batcher = make(engine, instances=8, max_queue_delay_s=0.05)
    tasks = []
    for i in range(300):
        tasks.append(asyncio.ensure_future(batcher.submit(request(i), ["y"])))
        await asyncio.sleep(0.002)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert [r["y"][0, 0] for r in results] == [2 * i for i in range(300)]
    sizes = [len(b) for b in engine.batches]
    later = sizes[len(sizes) // 2 :]
    assert max(sizes) > 1 and sum(later) / len(later) >= 1.5, sizes
    await batcher.close()


async def test_an_exploring_wait_whose_request_was_cancelled_does_not_hold_the_next_lone_request() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=60.0)
    for i in range(64):  # a lone client: decisions enough to explore, and no contention yet
        await asyncio.wait_for(batcher.submit(request(i), ["y"]), 20)
    engine.hold()
    engine.started.clear()
    running = asyncio.ensure_future(batcher.submit(request(100), ["y"]))
    await wait_started(engine)
    explored = asyncio.ensure_future(batcher.submit(request(101), ["y"]))  # arrives while another runs
    await turns()
    engine.release()
    await running  # its instance is free again: request 101 waits, exploring
    explored.cancel()
    await turns()
    np.testing.assert_array_equal((await asyncio.wait_for(batcher.submit(request(102), ["y"]), 20))["y"], 204)
    assert 101 not in [float(b[0, 0]) for b in engine.batches]  # it was held back, and never ran
    await batcher.close()


async def test_adaptive_mode_is_off_in_fixed_mode_and_fixed_mode_waits_for_a_lone_request(clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=4.0, adaptive=False)
    lone = asyncio.ensure_future(batcher.submit(request(1), ["y"]))
    await asyncio.sleep(0.05)
    assert not lone.done() and not engine.batches
    clock.now += 4.0
    await asyncio.wait_for(lone, 10)
    await batcher.close()


async def test_preferred_batch_size_goes_at_once(clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=5.0, preferred_batch_sizes=(2,), adaptive=False)
    await asyncio.wait_for(asyncio.gather(batcher.submit(request(1), ["y"]), batcher.submit(request(2), ["y"])), 10)
    assert [len(b) for b in engine.batches] == [2]
    await batcher.close()


async def test_full_queue_is_rejected_at_once() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1, max_queue_size=2)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    queued = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="max_queue_size"):
        await batcher.submit(request(3), ["y"])
    engine.release()
    await asyncio.gather(running, *queued)
    await batcher.close()


async def test_queue_timeout_fails_waiting_requests_without_running_them() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1, default_timeout_s=0.05)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    with pytest.raises(DeadlineExceeded, match="timed out"):  # answered while the instance is still held
        await batcher.submit(request(1), ["y"])
    assert not engine.gate.is_set() and not running.done()
    engine.release()
    await running
    await asyncio.sleep(0.01)
    assert len(engine.batches) == 1
    await batcher.close()


async def test_timeout_parameter_only_when_override_is_allowed_and_only_shorter() -> None:
    engine = FakeEngine()
    strict = make(engine, max_batch_size=1, default_timeout_s=5.0)
    lenient = make(engine, max_batch_size=1, default_timeout_s=5.0, allow_timeout_override=True)
    engine.hold()
    for batcher in (strict, lenient):
        running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
        await wait_started(engine)
        waiting = asyncio.ensure_future(batcher.submit(request(1, timeout=20_000), ["y"]))
        await asyncio.sleep(0.1)
        assert waiting.done() == (batcher is lenient)
        engine.release()
        await running
        if batcher is lenient:
            with pytest.raises(DeadlineExceeded):
                await waiting
        else:
            await waiting
        engine.hold()
        engine.started.clear()
    engine.release()
    with pytest.raises(InvalidRequest, match="timeout"):
        await lenient.submit(request(1, timeout="soon"), ["y"])
    await strict.close()
    await lenient.close()


async def test_expired_client_deadline_and_cancelled_requests_are_never_computed() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    late = request(1)
    late.deadline = time.monotonic() + 0.02
    expired = asyncio.ensure_future(batcher.submit(late, ["y"]))
    cancelled = asyncio.ensure_future(batcher.submit(request(2), ["y"]))
    kept = asyncio.ensure_future(batcher.submit(request(3), ["y"]))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    engine.release()
    await running
    with pytest.raises(DeadlineExceeded):
        await expired
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    np.testing.assert_array_equal((await kept)["y"], np.full((1, 3), 6, np.float32))
    assert [float(b[0, 0]) for b in engine.batches] == [0.0, 3.0]
    await batcher.close()


async def test_priority_levels_run_higher_priority_first() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1, priority_levels=2, default_priority=2)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    low = asyncio.ensure_future(batcher.submit(request(1), ["y"]))  # default level 2
    high = asyncio.ensure_future(batcher.submit(request(2, priority=1), ["y"]))
    await asyncio.sleep(0.01)
    engine.release()
    await asyncio.gather(running, low, high)
    assert [float(b[0, 0]) for b in engine.batches] == [0.0, 2.0, 1.0]
    with pytest.raises(InvalidRequest, match=r"outside the model.s priority levels 1\.\.2"):
        await batcher.submit(request(3, priority=3), ["y"])
    await batcher.close()


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    engine = FakeEngine(fail_on=7.0)
    batcher = make(engine)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    poisoned = asyncio.ensure_future(batcher.submit(request(7.0), ["y"]))
    other_shape = asyncio.ensure_future(batcher.submit(request(1, width=4), ["y"]))
    await asyncio.sleep(0.01)
    engine.release()
    await running
    with pytest.raises(EngineError, match="poisoned row"):
        await poisoned
    assert (await other_shape)["y"].shape == (1, 4)
    assert (await batcher.submit(request(2), ["y"]))["y"][0, 0] == 4  # the batcher goes on
    await batcher.close()


async def test_several_instances_run_batches_in_parallel() -> None:
    engine = FakeEngine()
    batcher = make(engine, instances=2, max_batch_size=1)
    engine.hold()
    tasks = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in range(2)]
    await asyncio.sleep(0.05)
    assert batcher._running == 2  # both instances busy at once
    engine.release()
    await asyncio.gather(*tasks)
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses_new_requests() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1)
    engine.hold()
    tasks = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in range(3)]
    await wait_started(engine)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable):
        await batcher.submit(request(9), ["y"])
    engine.release()
    await closing
    assert [r["y"][0, 0] for r in await asyncio.gather(*tasks)] == [0, 2, 4]


async def test_close_returns_when_only_cancelled_requests_are_left_queued() -> None:
    # a server stopping with grace 0 cancels every call: the queue then holds nothing but those
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    queued = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    for task in queued:
        task.cancel()
    closing = asyncio.ensure_future(batcher.close())
    engine.release()
    await asyncio.wait_for(closing, 5)
    assert (await running)["y"][0, 0] == 0 and [float(b[0, 0]) for b in engine.batches] == [0.0]


async def test_a_cancelled_request_is_released_once_no_run_reads_its_inputs() -> None:
    """``when_released``: at once for a request that never ran, or that left the queue before its run;
    for one in a run under way, only when that run ends, and after its batch is delivered."""
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1)
    never = request(9)
    released: list[str] = []
    batcher.when_released(never, lambda: released.append("never queued"))
    assert released == ["never queued"]
    engine.hold()
    running_request, queued_request = request(0), request(1)
    running = asyncio.ensure_future(batcher.submit(running_request, ["y"]))
    await wait_started(engine)
    queued = asyncio.ensure_future(batcher.submit(queued_request, ["y"]))
    await asyncio.sleep(0)
    running.cancel()
    queued.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)
    batcher.when_released(running_request, lambda: released.append("ran"))
    batcher.when_released(queued_request, lambda: released.append("queued"))
    assert released == ["never queued", "queued"]  # the running one's inputs are still in use
    engine.release()
    await asyncio.wait_for(batcher.close(), 5)
    assert released == ["never queued", "queued", "ran"]
    assert [float(b[0, 0]) for b in engine.batches] == [0.0]  # the queued one never ran


async def test_fast_models_run_on_the_event_loop_and_slow_ones_in_a_worker_thread() -> None:
    fast = FakeEngine()
    batcher = make(fast, inline_below_s=0.05)
    for i in range(4):
        await batcher.submit(request(i), ["y"])
    assert fast.threads[0] is not threading.main_thread()  # no measurement yet: a worker thread
    assert all(t is threading.main_thread() for t in fast.threads[1:])  # then inline
    await batcher.close()

    class Slow(FakeEngine):
        def infer(self, inputs, outputs):
            time.sleep(0.06)
            return super().infer(inputs, outputs)

    slow = Slow()
    batcher = make(slow, inline_below_s=0.05)
    for i in range(3):
        await batcher.submit(request(i), ["y"])
    assert all(t is not threading.main_thread() for t in slow.threads)
    await batcher.close()


async def test_requests_arriving_together_share_a_batch_without_any_delay() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_queue_delay_s=0)
    results = await asyncio.gather(*(batcher.submit(request(i), ["y"]) for i in range(5)))
    assert [len(b) for b in engine.batches] == [5]
    assert [r["y"][0, 0] for r in results] == [0, 2, 4, 6, 8]
    await batcher.close()


async def test_a_zero_row_request_shares_a_batch_without_breaking_it() -> None:
    engine = FakeEngine()
    batcher = make(engine)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    empty = asyncio.ensure_future(batcher.submit(request(1, rows=0), ["y"]))
    normal = asyncio.ensure_future(batcher.submit(request(2, rows=2), ["y"]))
    await asyncio.sleep(0.01)
    engine.release()
    await running
    assert (await empty)["y"].shape == (0, 3)
    np.testing.assert_array_equal((await normal)["y"], np.full((2, 3), 4, np.float32))
    await batcher.close()


async def test_cancelled_requests_do_not_count_toward_max_queue_size() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1, max_queue_size=2)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    live = asyncio.ensure_future(batcher.submit(request(1), ["y"]))
    gone = asyncio.ensure_future(batcher.submit(request(2), ["y"]))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    third = asyncio.ensure_future(batcher.submit(request(3), ["y"]))  # room again: no Overloaded
    await asyncio.sleep(0.01)
    engine.release()
    await asyncio.gather(running, live, third)
    await batcher.close()


async def test_finished_requests_are_not_kept_alive_by_their_queue_timeout() -> None:
    import gc
    import weakref

    engine = FakeEngine()
    batcher = make(engine, default_timeout_s=3600)
    req = request(1, rows=4)
    tensor = weakref.ref(req.inputs["x"])
    result = await batcher.submit(req, ["y"])
    del req, result
    engine.batches.clear()
    gc.collect()
    assert tensor() is None  # the hour-long deadline entry does not pin the request's tensors
    await batcher.close()


# -- the queue count ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [1, 4])
async def test_requests_cancelled_in_the_middle_of_the_queue_leave_the_count(max_batch_size: int) -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=max_batch_size, max_queue_size=4)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    queued = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in (1, 2, 3, 4)]
    await asyncio.sleep(0.01)
    assert batcher.pending == 4
    queued[1].cancel()
    queued[2].cancel()  # in the middle: requests 1 and 4 stay queued around them
    await asyncio.sleep(0)
    engine.release()
    results = await asyncio.gather(running, queued[0], queued[3])
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 8.0]
    assert batcher.pending == 0

    engine.hold()
    engine.started.clear()
    running = asyncio.ensure_future(batcher.submit(request(5), ["y"]))
    await wait_started(engine)
    full = [asyncio.ensure_future(batcher.submit(request(i), ["y"])) for i in (6, 7, 8, 9)]  # max_queue_size
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in full)  # none refused
    with pytest.raises(Overloaded):
        await batcher.submit(request(10), ["y"])
    engine.release()
    await asyncio.gather(running, *full)
    assert batcher.pending == 0
    await batcher.close()


async def test_requests_past_their_deadline_in_the_middle_of_the_queue_leave_the_count() -> None:
    engine = FakeEngine()
    batcher = make(engine, max_batch_size=1, max_queue_size=3)
    engine.hold()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y"]))
    await wait_started(engine)
    first = asyncio.ensure_future(batcher.submit(request(1), ["y"]))
    late = request(2)
    late.deadline = time.monotonic() + 0.01
    expired = asyncio.ensure_future(batcher.submit(late, ["y"]))
    last = asyncio.ensure_future(batcher.submit(request(3), ["y"]))
    with pytest.raises(DeadlineExceeded):
        await expired
    engine.release()
    await asyncio.gather(running, first, last)
    assert batcher.pending == 0
    await batcher.close()


# -- fault isolation ------------------------------------------------------------------------------


async def run_one_batch(batcher: DynamicBatcher, engine: FakeEngine, requests: list[InferRequest]) -> list:
    """Run ``requests`` as one batch (queued while the instance is busy); their results or errors."""
    engine.hold()
    engine.started.clear()
    running = asyncio.ensure_future(batcher.submit(request(0), ["y", "z"]))
    await wait_started(engine)
    tasks = [asyncio.ensure_future(batcher.submit(r, ["y", "z"])) for r in requests]
    await asyncio.sleep(0.01)
    engine.release()
    await running
    return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize(
    "values",
    [
        [7, 1, 2, 3],
        [1, 2, 3, 7],
        [1, 7, 2, 7, 3, 4, 5, 7],
        [7, 7, 7],
        [1, 2, 3, 4, 5, 6, 7, 8],
    ],
)
async def test_only_the_requests_that_fail_on_their_own_get_the_error(values: list[int]) -> None:
    engine = FakeEngine(fail_on=7.0)
    stats = ModelStats()
    batcher = DynamicBatcher("m", [engine.infer], BatcherConfig(max_batch_size=16, inline_below_s=0), stats)
    rows = [1 + i % 3 for i in range(len(values))]
    results = await run_one_batch(batcher, engine, [request(v, n) for v, n in zip(values, rows, strict=True)])
    assert len(engine.batches[1]) == sum(rows)  # they did share one batch
    for value, n, result in zip(values, rows, results, strict=True):
        if value == 7:
            assert isinstance(result, EngineError) and "RuntimeError" in str(result)
        else:
            x = np.full((n, 3), value, np.float32)
            np.testing.assert_array_equal(result["y"], x * 2)
            np.testing.assert_array_equal(result["z"], x.sum(axis=1))
    runs = engine.batches[1:]
    succeeded = [b for b in runs if not (b == 7).any()]
    good_rows = sum(n for v, n in zip(values, rows, strict=True) if v != 7)
    assert stats.execution_count == 1 + len(succeeded)  # the first request's batch, then each run that worked
    assert stats.inference_count == 1 + good_rows
    assert stats.queue.count == 1 + sum(v != 7 for v in values)  # each answered request once
    assert (await batcher.submit(request(2), ["y"]))["y"][0, 0] == 4  # the instance goes on
    await batcher.close()


async def test_an_input_error_of_the_whole_batch_is_retried_in_parts() -> None:
    class FourRows(FakeEngine):
        def infer(self, inputs, outputs):
            if len(inputs["x"]) > 4:  # like a TensorRT profile that admits at most 4 rows
                self.batches.append(inputs["x"].copy())
                raise EngineInputError(f"shape {list(inputs['x'].shape)} is outside every optimization profile")
            return super().infer(inputs, outputs)

    engine = FourRows()
    batcher = make(engine)
    results = await run_one_batch(batcher, engine, [request(1, 3), request(2, 3), request(3, 5)])
    np.testing.assert_array_equal(results[0]["y"], np.full((3, 3), 2, np.float32))
    np.testing.assert_array_equal(results[1]["y"], np.full((3, 3), 4, np.float32))
    assert isinstance(results[2], InvalidRequest)  # fails alone: the caller's request is what cannot run
    assert "outside every optimization profile" in str(results[2])
    await batcher.close()


async def test_an_engine_error_reaches_the_caller_as_one_line_and_the_log_keeps_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dump = (
        'engine dump\nTraceback (most recent call last):\n  File "/srv/secret/model.py", line 3\nbad row ' + "x" * 500
    )

    def explode(inputs, outputs):
        raise RuntimeError(dump)

    batcher = DynamicBatcher("m/1", [explode], BatcherConfig(max_batch_size=8, inline_below_s=0), ModelStats())
    with caplog.at_level(logging.ERROR, logger="rapidserve.server.isolation"):
        results = await asyncio.gather(*(batcher.submit(request(i), ["y"]) for i in range(3)), return_exceptions=True)
    messages = [str(r) for r in results]
    for message in messages:
        assert "\n" not in message and "Traceback" not in message and "/srv/secret" not in message
        assert len(message) <= 200
        assert message.startswith("model 'm/1' failed: RuntimeError")
    references = {re.search(r"reference (\w+)", message).group(1) for message in messages}
    logged = {r for r in caplog.records if any(ref in r.getMessage() for ref in references)}
    assert logged and all(r.exc_info and r.exc_info[1].args == (dump,) for r in logged)
    assert "Traceback" in caplog.text and "/srv/secret/model.py" in caplog.text  # the operator sees it all
    await batcher.close()


# -- what isolation may cost ----------------------------------------------------------------------


def isolating(engine, isolation: FaultIsolation, name: str = "m") -> DynamicBatcher:
    config = BatcherConfig(max_batch_size=16, inline_below_s=0)
    return DynamicBatcher(name, [engine], config, ModelStats(), isolation)


async def test_one_failing_batch_spends_at_most_the_rerun_reserve(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(fail_on=7.0)
    batcher = isolating(engine.infer, FaultIsolation("m", reserve=8))
    with caplog.at_level(logging.WARNING, logger="rapidserve.server.isolation"):
        results = await run_one_batch(batcher, engine, [request(7.0) for _ in range(16)])
    assert len(engine.batches[1]) == 16  # one batch
    reruns = len(engine.batches) - 2
    assert 0 < reruns <= 8  # isolating all 16 would take 2 * 16 - 2 = 30
    assert all(isinstance(r, EngineError) and "poisoned row" in str(r) for r in results)
    assert "16 requests failed" in caplog.text and "rerun budget ran out" in caplog.text
    await batcher.close()


async def test_with_the_budget_spent_a_failing_batch_fails_whole_until_runs_earn_it_back() -> None:
    engine = FakeEngine(fail_on=7.0)
    batcher = isolating(engine.infer, FaultIsolation("m", reserve=4, reruns_per_batch=0.5))
    mixed = [1.0, 7.0, 2.0, 3.0]  # isolated with 4 reruns: [1, 7] and [2, 3], then [1] and [7]
    batches = 0

    await run_one_batch(batcher, engine, [request(7.0) for _ in range(8)])  # spends the reserve
    results = await run_one_batch(batcher, engine, [request(v) for v in mixed])
    batches += 4  # two of run_one_batch's each
    assert all(isinstance(r, EngineError) for r in results)  # the good requests too: no rerun is paid for

    for _ in range(8):  # batches that run earn reruns back: 8 * 0.5 = the reserve
        await batcher.submit(request(1), ["y"])
    batches += 8
    results = await run_one_batch(batcher, engine, [request(v) for v in mixed])
    batches += 2
    assert [isinstance(r, EngineError) for r in results] == [False, True, False, False]
    assert [float(r["y"][0, 0]) for i, r in enumerate(results) if i != 1] == [2.0, 4.0, 6.0]

    reruns = len(engine.batches) - batches
    assert reruns <= 4 + 0.5 * batches  # the bound: the reserve plus the share each batch earns
    await batcher.close()


async def test_tracebacks_are_limited_per_model_and_window_and_the_rest_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]

    def explode(inputs, outputs):
        raise RuntimeError("engine broke")

    def isolation(name: str) -> FaultIsolation:
        return FaultIsolation(name, tracebacks=3, window_s=1.0, clock=lambda: now[0])

    batcher, other = isolating(explode, isolation("m/1"), "m/1"), isolating(explode, isolation("n/1"), "n/1")

    async def fail(batcher: DynamicBatcher) -> str:
        with pytest.raises(EngineError) as info:
            await batcher.submit(request(1), ["y"])
        return re.search(r"\(reference (\w+) in the server log\)", str(info.value)).group(1)

    def logged(reference: str) -> logging.LogRecord:
        (record,) = [r for r in caplog.records if reference in r.getMessage()]
        return record

    with caplog.at_level(logging.WARNING, logger="rapidserve.server.isolation"):
        references = [await fail(batcher) for _ in range(10)]
        other_reference = await fail(other)
        assert [logged(r).exc_info is not None for r in references] == [True] * 3 + [False] * 7
        for reference in references[3:]:  # one line each, that says what failed
            assert "RuntimeError: engine broke" in logged(reference).getMessage()
        assert logged(other_reference).exc_info is not None  # another model's quota is its own
        assert not [r for r in caplog.records if "without their traceback" in r.getMessage()]

        caplog.clear()
        now[0] += 1.0  # the window passed: the next failure reports the count, then has its traceback
        references = [await fail(batcher) for _ in range(5)]
        first, second = caplog.records[:2]
        assert "m/1" in first.getMessage() and "7 more failures logged without their traceback" in first.getMessage()
        assert second is logged(references[0]) and second.exc_info is not None
        assert [logged(r).exc_info is not None for r in references] == [True] * 3 + [False] * 2
        await batcher.close()  # unloading reports the window's count
        assert "2 more failures logged without their traceback" in caplog.records[-1].getMessage()
        await other.close()


# -- what runs on the event loop ------------------------------------------------------------------


class Instant:
    """An engine that takes microseconds, and records the thread that ran each call."""

    inputs = (TensorSpec("x", "FP32", (-1, 3)),)
    outputs = (TensorSpec("y", "FP32", (-1, 3)),)

    def __init__(self) -> None:
        self.threads: list[int] = []

    def infer(self, inputs, outputs):
        self.threads.append(threading.get_ident())
        return {"y": inputs["x"] * 2}

    def close(self) -> None:
        pass


def fast_version(instance_group: str, instances: int) -> tuple[ModelVersion, list[Instant]]:
    groups = f"instance_group [ {instance_group} ]" if instance_group else ""
    config = parse_config(f'name: "fast"\nmax_batch_size: 8\n{groups}')
    engines = [Instant() for _ in range(instances)]
    spec = complete_config(config, Instant.inputs, Instant.outputs)
    return ModelVersion("fast", LoadedVersion(1, config, spec, engines, 0.0)), engines


@pytest.mark.parametrize(
    ("instance_group", "instances", "inline"),
    [
        ("", 1, True),  # no instance_group: one CPU instance
        ("{ kind: KIND_CPU, count: 1 }", 1, True),
        ("{ kind: KIND_CPU, count: 2 }", 2, False),
        ("{ kind: KIND_CPU, count: 1 }, { kind: KIND_CPU, count: 1 }", 2, False),
        ("{ kind: KIND_GPU, count: 1, gpus: [ 0 ] }", 1, False),
        ("{ kind: KIND_GPU, count: 1 }", 1, False),  # a GPU group naming no GPU
        ("{ kind: KIND_CPU, count: 1 }, { kind: KIND_GPU, count: 1, gpus: [ 0 ] }", 2, False),
    ],
)
async def test_only_a_single_cpu_instance_runs_fast_batches_on_the_event_loop(
    instance_group: str, instances: int, inline: bool
) -> None:
    version, engines = fast_version(instance_group, instances)
    loop_thread = threading.get_ident()
    for i in range(20):
        out = await version.infer(InferRequest("fast", "", {"x": np.full((1, 3), i, np.float32)}))
        np.testing.assert_array_equal(out.outputs["y"], np.full((1, 3), 2 * i, np.float32))
    threads = [t for engine in engines for t in engine.threads]
    assert len(threads) == 20
    assert (loop_thread in threads) == inline
    await version.close()


async def test_a_batch_larger_than_any_seen_to_run_fast_is_not_run_on_the_event_loop() -> None:
    """A fast model with a free dimension can be sent a huge tensor: inline, only batches no larger
    than one measured to run fast; a larger one is measured in the worker thread first."""
    version, (engine,) = fast_version("", 1)
    loop_thread = threading.get_ident()
    for i in range(20):  # one row each: the model is learned to be fast and runs inline
        await version.infer(InferRequest("fast", "", {"x": np.full((1, 3), i, np.float32)}))
    assert engine.threads[-1] == loop_thread
    big = np.arange(24, dtype=np.float32).reshape(8, 3)
    out = await version.infer(InferRequest("fast", "", {"x": big}))
    np.testing.assert_array_equal(out.outputs["y"], 2 * big)
    assert engine.threads[-1] != loop_thread  # 8 rows: more bytes than any batch seen so far
    await version.infer(InferRequest("fast", "", {"x": big}))
    assert engine.threads[-1] == loop_thread  # measured fast at that size: inline from now on
    await version.close()


def test_the_engine_contract_says_which_instances_may_run_inline() -> None:
    assert may_run_inline(["cpu"])
    assert not may_run_inline(["cpu", "cpu"])
    assert not may_run_inline(["cuda:0"])
    assert not may_run_inline([])
