"""Schedulers sit between the model and its engine instances: they decide when and where a request
runs. ``DirectScheduler`` runs each request alone on the next free instance; the dynamic batcher
implements the same ``Scheduler`` protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from rapidserve.engines.base import Engine, EngineInputError
from rapidserve.server.errors import DeadlineExceeded, EngineError, InvalidRequest, Unavailable
from rapidserve.server.stats import ModelStats
from rapidserve.server.types import InferRequest

__all__ = ["DirectScheduler", "Scheduler"]

Arrays = dict[str, np.ndarray[Any, Any]]


class Scheduler(Protocol):
    async def submit(self, request: InferRequest, outputs: Sequence[str]) -> Arrays: ...

    async def close(self) -> None: ...


class DirectScheduler:
    """One request per execution, on whichever instance is free; requests wait in FIFO order.

    Engine calls run in a thread pool with one thread per instance. An instance returns to the pool
    only when its thread finishes, even if the waiting request was cancelled meanwhile, so an engine
    never runs two calls at once.
    """

    def __init__(self, name: str, engines: Sequence[Engine], stats: ModelStats, batching: bool) -> None:
        self._name = name
        self._engines = list(engines)
        self._stats = stats
        self._batching = batching
        self._free: asyncio.Queue[Engine] = asyncio.Queue()
        for engine in self._engines:
            self._free.put_nowait(engine)
        self._executor = ThreadPoolExecutor(max_workers=len(self._engines), thread_name_prefix=f"rs-{name}")
        self._closed = False

    async def submit(self, request: InferRequest, outputs: Sequence[str]) -> Arrays:
        if self._closed:
            raise Unavailable(f"model '{self._name}' is unloading")
        queued = time.monotonic_ns()
        engine = await self._free.get()
        started = time.monotonic_ns()
        self._stats.queue.add(started - queued)
        if request.deadline is not None and time.monotonic() >= request.deadline:
            self._free.put_nowait(engine)
            raise DeadlineExceeded(f"the client's deadline passed while the request waited for model '{self._name}'")
        loop = asyncio.get_running_loop()
        work = self._executor.submit(_timed_infer, engine, request.inputs, outputs)
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free.put_nowait, engine))
        try:
            result, infer_start, infer_end = await asyncio.wrap_future(work)
        except EngineInputError as exc:
            raise InvalidRequest(f"model '{self._name}': {exc}") from None
        except Exception as exc:
            raise EngineError(f"model '{self._name}' failed: {type(exc).__name__}: {exc}") from exc
        done = time.monotonic_ns()
        batch = next(iter(request.inputs.values())).shape[0] if self._batching and request.inputs else 1
        # compute input/output: the hand-offs to and from the worker thread around the engine call
        self._stats.record_execution(batch, infer_start - started, infer_end - infer_start, done - infer_end)
        return result

    async def close(self) -> None:
        """Wait for every instance to be idle, then release them."""
        self._closed = True
        for _ in self._engines:
            await self._free.get()
        await asyncio.get_running_loop().run_in_executor(self._executor, _close_all, self._engines)
        self._executor.shutdown(wait=False)


def _timed_infer(engine: Engine, inputs: Arrays, outputs: Sequence[str]) -> tuple[Arrays, int, int]:
    start = time.monotonic_ns()
    result = engine.infer(inputs, outputs)
    return result, start, time.monotonic_ns()


def _close_all(engines: Sequence[Engine]) -> None:
    for engine in engines:
        engine.close()
