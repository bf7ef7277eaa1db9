"""The dynamic batcher: Triton's batching semantics on asyncio, plus an adaptive mode.

Independent of gRPC and of engines: it takes one blocking callable per instance that runs a batch
(``inputs -> outputs``), or a ``PerRequest`` that takes the batch's requests unmerged and answers
each, and calls them from a thread per instance. All decisions are made on the
event loop by one function, ``_dispatch``, called when a request arrives, when an instance frees up
and when a timer (batching delay, queue timeout) fires, so there is no scheduler task to wake.

Semantics (Triton's): batch size counts along dim 0; requests join a batch only when their trailing
shapes and datatypes match the batch's first request; the batching delay runs from the oldest waiting
request; a batch goes when it reaches ``max_batch_size`` or a preferred size, when the delay has
passed, or, in adaptive mode, as soon as waiting is not expected to bring another request in time.
While every instance is busy the next batch keeps growing. Requests of a higher priority level
(1 = highest) are taken first, FIFO within a level.

Batches run through the model's ``FaultIsolation`` (``isolation.py``): a batch that fails is run again
in parts so only the requests that fail on their own get the error, within a budget of reruns.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rapidserve.server.errors import DeadlineExceeded, EngineError, InvalidRequest, Overloaded, Unavailable
from rapidserve.server.isolation import Answers, Arrays, BatchRunner, FaultIsolation, Instance, Isolated, PerRequest
from rapidserve.server.stats import ModelStats
from rapidserve.server.types import InferRequest

__all__ = ["INLINE_BELOW_S", "BatchRunner", "BatcherConfig", "DynamicBatcher", "Instance", "PerRequest"]

# Engine time per batch under which a model allowed to run inline (``engines.base.may_run_inline``)
# does: handing a 10 us model call to a worker thread and back costs far more than the call.
INLINE_BELOW_S = 0.0005


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_size: int = 0  # 0: the model does not batch, every request runs alone
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0  # 0: unbounded
    default_timeout_s: float = 0.0  # 0: none
    allow_timeout_override: bool = False
    priority_levels: int = 0
    default_priority: int = 0
    adaptive: bool = True
    # Batches whose engine time stays under this run on the event loop itself. 0: always use the
    # threads. The caller sets it only where ``engines.base.may_run_inline`` allows (one CPU instance).
    inline_below_s: float = 0.0
    # Every request has the same trailing shapes and datatypes (the model's dims have no -1 and the
    # caller validated them): any requests may share a batch, with no per-request signature to build.
    uniform_shapes: bool = False


@dataclass(eq=False, slots=True)
class _Pending:
    request: InferRequest
    outputs: tuple[str, ...]
    future: asyncio.Future[Arrays]
    size: int
    signature: tuple[Any, ...]
    enqueued: float
    deadline: float | None
    dispatched: bool = False  # a queue timeout no longer applies once the request runs
    ticket: list[Any] | None = None  # its [deadline, seq, self] entry in the deadline heap


@dataclass(slots=True)
class _JoinRate:
    """How many requests per second joined a batch while the batcher held it back (adaptive mode).

    Learned from the batcher's own waits: a lone closed-loop client never sends while its request
    waits, so waiting stops paying and stops happening; with many clients, waits fill batches and go
    on. To follow the load, one decision in ``EXPLORE_EVERY`` waits regardless, but only once a request
    has arrived while another was queued or running since the last such wait: a lone client never
    does that, so it is never made to wait out the delay.
    """

    EXPLORE_EVERY = 64
    rate: float = 0.0
    decisions: int = 0
    contended: bool = False  # a request arrived while another was in the batcher, since the last exploration
    # when an exploring wait ends: it lasts its whole delay (or until its batch is full), not until the
    # next event; a batch with a later delay (that one's requests were all cancelled) decides afresh
    explore_until: float | None = None
    wait_start: float | None = None
    arrivals_at_start: int = 0

    def should_wait(self, now: float, ready_at: float) -> bool:
        self.decisions += 1
        if self.explore_until is not None:
            if ready_at <= self.explore_until:
                return True
            self.explore_until = None
        if self.rate * (ready_at - now) >= 1.0:
            return True
        if self.decisions >= self.EXPLORE_EVERY and self.contended:
            self.decisions, self.contended, self.explore_until = 0, False, ready_at
            return True
        return False

    def waiting(self, now: float, arrivals: int) -> None:
        if self.wait_start is None:
            self.wait_start, self.arrivals_at_start = now, arrivals

    def dispatched(self, now: float, arrivals: int) -> None:
        if self.wait_start is not None and now > self.wait_start:
            sample = (arrivals - self.arrivals_at_start) / (now - self.wait_start)
            self.rate = 0.7 * self.rate + 0.3 * sample
        self.wait_start, self.explore_until = None, None


@dataclass(slots=True)
class _Queues:
    levels: list[deque[_Pending]]
    count: int = 0  # entries in the deques, cancelled ones included until they are dropped
    live: int = 0  # requests waiting to run (what max_queue_size limits)
    # heap of [deadline, seq, item]; the item slot is cleared when the request leaves the queue,
    # so the heap never keeps a finished request's tensors alive
    timed: list[list[Any]] = field(default_factory=list)


class DynamicBatcher:
    """One model's queue, and the batches it runs on the model's instances through ``isolation``
    (by default a ``FaultIsolation`` with the limits of ``isolation.py``)."""

    def __init__(
        self,
        name: str,
        instances: Sequence[Instance],
        config: BatcherConfig,
        stats: ModelStats,
        isolation: FaultIsolation | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a batcher needs at least one instance")
        self._name = name
        self._config = config
        self._stats = stats
        self._isolation = isolation if isolation is not None else FaultIsolation(name)
        self._run = self._isolation.run
        self._preferred = sorted(set(config.preferred_batch_sizes), reverse=True)
        self._free = list(reversed(instances))
        self._instances = list(instances)
        self._executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix=f"rs-{name}")
        self._queues = _Queues([deque() for _ in range(max(config.priority_levels, 1))])
        self._joins = _JoinRate()
        self._arrived = 0
        self._delay_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count()
        self._running = 0
        self._left: set[asyncio.Future[Arrays]] = set()  # running requests whose caller left (see withdraw)
        self._runs: dict[int, tuple[list[_Pending], list[Callable[[], None]]]] = {}  # in threads (see when_released)
        self._infer_s: float | None = None  # moving average of engine time per batch
        self._inline = False
        self._fast_bytes = 0  # the largest batch, in input bytes, measured to run under inline_below_s
        self._dispatch_soon = False
        self._closed = False
        self._idle: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending(self) -> int:
        """Requests in the queue, not yet running (a cancelled one may count until it is reached)."""
        return self._queues.live

    @property
    def running(self) -> int:
        """Batches executing now."""
        return self._running

    # -- submission ------------------------------------------------------------------------------

    async def submit(self, request: InferRequest, outputs: Sequence[str]) -> Arrays:
        """Queue one request; returns its own rows of the batch's outputs."""
        return await self.enqueue(request, outputs)

    def enqueue(self, request: InferRequest, outputs: Sequence[str]) -> asyncio.Future[Arrays]:
        """Queue one request; the future resolves to its rows. Cancelling it withdraws the request."""
        if self._closed:
            raise Unavailable(f"model '{self._name}' is unloading")
        queues = self._queues
        if self._config.max_queue_size and queues.live >= self._config.max_queue_size and not self._recount():
            raise Overloaded(f"model '{self._name}' has {queues.live} requests queued, its max_queue_size; retry later")
        loop = self._loop or self._bind_loop()
        now = time.monotonic()
        item = _Pending(
            request, tuple(outputs), loop.create_future(), *self._shape_of(request), now, self._deadline(request, now)
        )
        level = self._priority(request)
        self._arrived += 1
        if queues.live or self._running:
            self._joins.contended = True
        queues.levels[level].append(item)
        queues.count += 1
        queues.live += 1
        if item.deadline is not None:
            item.ticket = [item.deadline, next(self._seq), item]
            heapq.heappush(queues.timed, item.ticket)
            if queues.timed[0] is item.ticket:
                self._arm_deadline_timer()
        if not self._dispatch_soon:
            # Decide on the next loop turn, so that requests arriving together share a batch.
            self._dispatch_soon = True
            loop.call_soon(self._dispatch)
        return item.future

    def withdraw(self, future: asyncio.Future[Arrays]) -> bool:
        """The caller of a request left. A request still waiting in the queue is cancelled, so that it
        never runs. Once dispatched (False), its future is resolved when the run ends, as its inputs stay
        in use until then, but it is no longer counted among the requests the run answered (as one
        whose future was cancelled is not)."""
        for queue in self._queues.levels:
            for item in queue:
                if item.future is future:
                    if item.dispatched:
                        break
                    future.cancel()
                    self._left_queue(item)
                    return True
        if not future.done():
            self._left.add(future)
            future.add_done_callback(self._left.discard)
        return False

    def when_released(self, request: InferRequest, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no run reads ``request``'s inputs: at once unless a run under way holds
        it (a request whose caller left is never taken from the queue), else when that run ends."""
        for batch, waiting in self._runs.values():
            if any(item.request is request for item in batch):
                waiting.append(callback)
                return
        callback()

    def _left_queue(self, item: _Pending) -> None:
        """A queued request finished before it ran (cancelled, or its deadline passed)."""
        if not item.dispatched:
            item.dispatched = True  # it will never run: sweeps and counts skip it from now on
            self._queues.live -= 1
            if item.ticket is not None:
                item.ticket[2] = None

    def _recount(self) -> bool:
        """At the queue limit, drop the cancelled requests from the count (they are noticed lazily,
        not by a callback on every request); True if that made room."""
        for queue in self._queues.levels:
            for item in queue:
                if item.future.done():
                    self._left_queue(item)
        return self._queues.live < self._config.max_queue_size

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _shape_of(self, request: InferRequest) -> tuple[int, tuple[Any, ...]]:
        arrays = request.inputs
        if self._config.max_batch_size <= 0 or not arrays:
            return 1, (object(),)  # a unique signature: never merged
        first = next(iter(arrays.values()))
        if self._config.uniform_shapes:
            return first.shape[0], ()
        signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(arrays.items()))
        return first.shape[0], signature

    def check_parameters(self, request: InferRequest) -> None:
        """Raise ``InvalidRequest`` for a bad ``priority`` or ``timeout`` parameter, as ``enqueue``
        would (for callers that may answer without queueing, like a cache hit)."""
        self._priority(request)
        self._deadline(request, time.monotonic())

    def _deadline(self, request: InferRequest, now: float) -> float | None:
        """The earliest of the client's deadline and the queue timeout (request override or default)."""
        timeout_s = self._config.default_timeout_s
        override = request.parameters.get("timeout")
        if override is not None and self._config.allow_timeout_override:
            if not isinstance(override, int) or isinstance(override, bool) or override < 0:
                raise InvalidRequest(
                    f"the 'timeout' parameter must be a non-negative integer (microseconds), got {override!r}"
                )
            if override and (not timeout_s or override / 1e6 < timeout_s):
                timeout_s = override / 1e6
        deadlines = [d for d in (request.deadline, now + timeout_s if timeout_s else None) if d is not None]
        return min(deadlines) if deadlines else None

    def _priority(self, request: InferRequest) -> int:
        levels = len(self._queues.levels)
        value = request.parameters.get("priority", 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"the 'priority' parameter must be a non-negative integer, got {value!r}")
        if value == 0:
            value = self._config.default_priority or levels
        if value > levels:
            raise InvalidRequest(f"priority {value} is outside the model's priority levels 1..{levels}")
        return value - 1

    # -- the one decision function ---------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start as many batches as free instances and the queue allow; otherwise arm the delay timer."""
        self._dispatch_soon = False
        while self._free and self._queues.count:
            now = time.monotonic()
            batch, ready_at = self._form(now)
            if ready_at is not None:
                self._arm_delay_timer(ready_at)
                return
            if not batch:
                break  # only finished (cancelled, timed out) requests were left: they are gone now
            self._start(self._free.pop(), batch, now)
        idle = self._idle
        if not self._queues.count and not self._running and idle is not None and not idle.done():
            idle.set_result(None)

    def _form(self, now: float) -> tuple[list[_Pending], float | None]:
        """The next batch if it should go now, else ([], when to look again)."""
        cfg = self._config
        limit = max(cfg.max_batch_size, 1)
        chosen: list[_Pending] = []
        sizes: list[int] = []
        total = 0
        signature: tuple[Any, ...] | None = None
        oldest: float | None = None
        full = False
        for queue in self._queues.levels:
            for item in queue:
                if item.future.done():
                    continue
                if item.deadline is not None and item.deadline <= now:
                    continue  # failed by the deadline sweep below
                if signature is None:
                    signature = item.signature
                elif item.signature != signature or total + item.size > limit:
                    full = True
                    break
                chosen.append(item)
                total += item.size
                sizes.append(total)
                oldest = item.enqueued if oldest is None else min(oldest, item.enqueued)
                if total >= limit:
                    full = True
                    break
            if full:
                break
        self._sweep(now)
        if not chosen or oldest is None:
            return [], None
        if full or cfg.max_batch_size <= 0:
            return self._take(chosen), None
        for preferred in self._preferred:
            if preferred in sizes:
                return self._take(chosen[: sizes.index(preferred) + 1]), None
        ready_at = oldest + cfg.max_queue_delay_s
        if now >= ready_at or (cfg.adaptive and not self._joins.should_wait(now, ready_at)):
            return self._take(chosen), None
        self._joins.waiting(now, self._arrived)
        return [], ready_at

    def _take(self, chosen: list[_Pending]) -> list[_Pending]:
        """Remove the chosen requests (and the finished ones queued among them) from the queues."""
        self._joins.dispatched(time.monotonic(), self._arrived)
        for item in chosen:
            item.dispatched = True
            if item.ticket is not None:
                item.ticket[2] = None
        self._queues.live -= len(chosen)
        picked = {id(item) for item in chosen}
        remaining = len(chosen)
        for queue in self._queues.levels:
            while queue and remaining:
                item = queue.popleft()
                self._queues.count -= 1
                if id(item) in picked:
                    remaining -= 1
                else:
                    self._left_queue(item)  # cancelled between chosen ones: it leaves the count too
            if not remaining:
                break
        return chosen

    # -- deadlines -------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Fail queued requests whose deadline passed; cancelled ones are dropped when reached."""
        timed = self._queues.timed
        while timed and timed[0][0] <= now:
            item = heapq.heappop(timed)[2]
            if item is not None and not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(f"request timed out after waiting in the queue of model '{self._name}'")
                )
            if item is not None:
                self._left_queue(item)
        if len(timed) > 2 * self._queues.live + 64:  # drop the entries of requests that left the queue
            timed[:] = [entry for entry in timed if entry[2] is not None]
            heapq.heapify(timed)
        self._compact()

    def _compact(self) -> None:
        for queue in self._queues.levels:
            while queue and queue[0].future.done():
                self._left_queue(queue.popleft())
                self._queues.count -= 1

    def _arm_deadline_timer(self) -> None:
        assert self._loop is not None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        when = self._queues.timed[0][0]
        self._deadline_timer = self._loop.call_at(
            self._loop.time() + max(when - time.monotonic(), 0), self._on_deadline
        )

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        self._sweep(time.monotonic())
        if self._queues.timed:
            self._arm_deadline_timer()
        self._dispatch()

    def _arm_delay_timer(self, ready_at: float) -> None:
        assert self._loop is not None
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        self._delay_timer = self._loop.call_at(self._loop.time() + max(ready_at - time.monotonic(), 0), self._on_delay)

    def _on_delay(self) -> None:
        self._delay_timer = None
        self._dispatch()

    # -- execution -------------------------------------------------------------------------------

    def _start(self, instance: Instance, batch: list[_Pending], now: float) -> None:
        assert self._loop is not None
        self._running += 1
        outputs = tuple(dict.fromkeys(name for item in batch for name in item.outputs))
        inputs = [item.request.inputs for item in batch]
        # Only a model allowed to run inline weighs its batches: inline, a batch larger than any seen to
        # run fast (a model with a free dimension sent a huge tensor) goes to the thread instead.
        nbytes = _weight(inputs) if self._config.inline_below_s else 0
        if self._inline and nbytes <= self._fast_bytes:
            try:
                result: Any = self._run(instance, inputs, outputs)
            except Exception as exc:
                result = exc
            self._finish(instance, batch, now, result, nbytes, redispatch=False)  # _dispatch's loop goes on
            return
        self._runs[id(batch)] = (batch, [])
        work = self._executor.submit(self._run, instance, inputs, outputs)
        loop = self._loop
        work.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finish_thread, instance, batch, now, nbytes, done)
        )

    def _finish_thread(self, instance: Instance, batch: list[_Pending], started: float, nbytes: int, done: Any) -> None:
        try:
            result = done.result()
        except Exception as exc:
            result = exc
        _, released = self._runs.pop(id(batch))
        try:
            self._finish(instance, batch, started, result, nbytes, redispatch=True)
        finally:
            for callback in released:  # (once the run's futures are resolved)
                callback()

    def _finish(
        self, instance: Instance, batch: list[_Pending], started: float, result: Any, nbytes: int, redispatch: bool
    ) -> None:
        """Hand each request its rows, or the error it caused."""
        self._running -= 1
        self._free.append(instance)
        if type(result) is tuple:
            outputs, input_ns, infer_ns = result
            self._learn_latency(infer_ns / 1e9, nbytes)
            self._complete(batch, started, outputs, input_ns, infer_ns)
        elif isinstance(result, Isolated):
            self._isolated(batch, started, result)
        else:
            self._fail(batch, self._isolation.caller_error(result))
        if redispatch:
            self._dispatch()

    def _complete(
        self, batch: list[_Pending], started: float, outputs: Arrays | Answers, input_ns: int, infer_ns: int
    ) -> None:
        """Deliver one successful run. Statistics, as Triton keeps them, count the queue and compute
        times of the requests that succeed, and the runs that succeed as executions (a ``PerRequest``
        run: the rows of the requests it answered, if any)."""
        try:
            split_start = time.monotonic_ns()
            delivered = self._deliver(batch, outputs)
            output_ns = time.monotonic_ns() - split_start
        except Exception as exc:  # outputs the engine should not have returned: fail, never hang
            self._fail(batch, self._isolation.caller_error(exc))
            return
        if delivered is not None:
            for item in delivered:
                self._stats.queued(int((started - item.enqueued) * 1e9))
            size = sum(item.size for item in (delivered if isinstance(outputs, list) else batch))
            if delivered or not isinstance(outputs, list):
                self._stats.record_execution(len(delivered), size, input_ns, infer_ns, output_ns)

    def _isolated(self, batch: list[_Pending], started: float, isolated: Isolated) -> None:
        """Deliver a failed batch's parts: rows to the requests that ran, errors to those that failed."""
        for part in self._isolation.answers(isolated):
            requests = batch[part.start : part.stop]
            if isinstance(part.result, Exception):
                self._fail(requests, part.result)
            else:
                self._complete(requests, started, part.result, part.input_ns, part.infer_ns)

    def _learn_latency(self, seconds: float, nbytes: int) -> None:
        """Track engine time per batch; run batches inline while it stays small (with hysteresis), and
        only batches no larger (in input bytes) than one already seen to run under the limit."""
        self._infer_s = seconds if self._infer_s is None else 0.8 * self._infer_s + 0.2 * seconds
        limit = self._config.inline_below_s
        self._inline = limit > 0 and self._infer_s < (2 * limit if self._inline else limit)
        if seconds < limit and nbytes > self._fast_bytes:
            self._fast_bytes = nbytes

    def _deliver(self, batch: list[_Pending], outputs: Arrays | Answers) -> list[_Pending] | None:
        """Resolve each waiting request with its rows; returns those it answered (None: the outputs
        do not split, and every request failed)."""
        if isinstance(outputs, list):
            return self._deliver_answers(batch, outputs)
        total = sum(item.size for item in batch)
        if len(batch) > 1:
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    self._fail(batch, EngineError(
                        f"model '{self._name}' returned output '{name}' with shape {list(array.shape)} "
                        f"for a batch of {total}; expected the batch dimension first"
                    ))  # fmt: skip
                    return None
        offset = 0
        delivered = []
        for item in batch:
            if not item.future.done():
                if len(batch) == 1:
                    rows = {name: outputs[name] for name in item.outputs}
                else:
                    rows = {name: outputs[name][offset : offset + item.size] for name in item.outputs}
                if item.future not in self._left:
                    delivered.append(item)
                item.future.set_result(rows)
            offset += item.size
        return delivered

    def _deliver_answers(self, batch: list[_Pending], answers: Answers) -> list[_Pending]:
        """Resolve each waiting request with its own answer from a ``PerRequest`` run, or fail it alone."""
        if len(answers) != len(batch):
            raise EngineError(f"model '{self._name}' answered {len(answers)} of a batch of {len(batch)} requests")
        delivered = []
        errors: dict[int, Exception] = {}  # one caller error (and log line) per exception object
        for item, answer in zip(batch, answers, strict=True):
            if item.future.done():
                continue
            if isinstance(answer, Exception):
                error = errors.get(id(answer))
                if error is None:
                    error = errors[id(answer)] = self._isolation.caller_error(answer)
                item.future.set_exception(error)
            else:
                if item.future not in self._left:
                    delivered.append(item)
                item.future.set_result({name: answer[name] for name in item.outputs})
        return delivered

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, then release the instances."""
        self._closed = True
        if self._queues.count or self._running:
            self._idle = asyncio.get_running_loop().create_future()
            self._dispatch()
            await self._idle
        for timer in (self._delay_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._executor.shutdown(wait=True)
        self._isolation.flush()


def _weight(inputs: list[Arrays]) -> int:
    """A batch's input bytes, for the inline rule; BYTES tensors (object arrays, whose ``nbytes`` counts
    only pointers) weigh too much to ever run on the event loop."""
    total = 0
    for arrays in inputs:
        for array in arrays.values():
            if array.dtype.kind == "O":
                return 2**62
            total += array.nbytes
    return total
