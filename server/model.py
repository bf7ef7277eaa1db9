"""A loaded model version: its engine instances, the dynamic batcher in front of them, its statistics.

``loading.build_version`` does the blocking part (engines, config completion, warm-up) in a loader
thread; ``ModelVersion`` is the event-loop side that requests go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve.common.datatypes import DATATYPES, datatype_of, numpy_dtype
from rapidserve.engines.base import Engine
from rapidserve.server.batcher import BatchRunner, DynamicBatcher, Instance, PerRequest
from rapidserve.server.cache import CacheEntry, PredictionCache
from rapidserve.server.cache_l2 import SharedCache, decode_answer
from rapidserve.server.config import ModelSpec
from rapidserve.server.errors import EngineError, RapidServeError
from rapidserve.server.isolation import Answers, Arrays
from rapidserve.server.loading import LoadedVersion, batcher_config
from rapidserve.server.stats import ModelStats
from rapidserve.server.types import InferRequest, InferResponse

__all__ = ["ModelVersion", "Started"]


@dataclass(slots=True)
class Started:
    """A request queued by ``ModelVersion.start``."""

    future: asyncio.Future[dict[str, Any]]
    outputs: tuple[str, ...]
    start_ns: int
    id: str
    deadline: float | None


class ModelVersion:
    """Serves one version through its dynamic batcher. Created on the event loop from a ``LoadedVersion``."""

    def __init__(
        self, name: str, loaded: LoadedVersion, batching_mode: str = "adaptive", cache: PredictionCache | None = None
    ) -> None:
        self.name = name
        self.version = loaded.version
        self.config = loaded.config
        self.spec = loaded.spec
        self.load_seconds = loaded.load_seconds
        self.stats = ModelStats()
        self._engines = loaded.engines
        self._cache = cache if cache is not None and loaded.config.response_cache.enable else None
        # the cache's generation of this model when this version was loaded: once a reload replaces
        # it, its in-flight requests no longer fill the cache or lead computations for the new one
        self._generation = cache.generation(name) if cache is not None else 0
        self._output_names = tuple(spec.name for spec in loaded.spec.outputs)
        self._holds = 0  # requests that picked this version and are being decoded off the loop
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._batcher = DynamicBatcher(
            f"{name}/{loaded.version}",
            [_instance(engine, loaded.spec) for engine in loaded.engines],
            batcher_config(loaded.config, batching_mode, loaded.spec),
            self.stats,
        )

    @property
    def caches(self) -> bool:
        """Whether this model's answers go through the prediction cache."""
        return self._cache is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    def cache_lookup(self, key: bytes) -> CacheEntry | None:
        """A cached answer for an already-computed key (the transport's fast path for hits)."""
        assert self._cache is not None
        start = time.monotonic_ns()
        entry = self._cache.entry(key)
        if entry is not None:
            self._cache.stats.hits += 1
            self.stats.cache_hit_served(time.monotonic_ns() - start, self._rows(entry.arrays))
        return entry

    def remember(self, entry: CacheEntry, kind: str, data: bytes) -> None:
        assert self._cache is not None
        self._cache.remember(entry, kind, data)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep this version open while a request that picked it is prepared off the event loop: a
        reload that replaces it meanwhile closes it only after, as it lets queued requests finish."""
        self._holds += 1
        self._unheld.clear()
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._unheld.set()

    def rejected(self, error: BaseException) -> None:
        """Count a request that failed before it reached this model (it did not decode)."""
        self.stats.failed(_reason(error))

    def start(self, request: InferRequest) -> Started:
        """Validate and queue a request of a model without the cache; ``finish`` turns it into its response
        once ``future`` is done. The stream calls the two without a coroutine; ``infer`` awaits between them.
        A request is counted in the statistics by these two only (or by ``withdraw``, or with the cache by
        ``infer``)."""
        assert self._cache is None
        start = time.monotonic_ns()
        try:
            if not request.checked:
                self.spec.validate(request)
            outputs = request.outputs or self._output_names
            return Started(self._batcher.enqueue(request, outputs), outputs, start, request.id, request.deadline)
        except BaseException as exc:
            self._failed(exc, request.deadline, start)
            raise

    def withdraw(self, started: Started) -> bool:
        """Its client left: a started request still queued is cancelled (and counted by ``finish``). One
        that runs already (False) is counted as cancelled now; its future is resolved when the run ends,
        and ``finish`` must not be called for it then."""
        if self._batcher.withdraw(started.future):
            return True
        self._failed(asyncio.CancelledError(), started.deadline, started.start_ns)
        return False

    def when_released(self, request: InferRequest, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no run of this version reads ``request``'s inputs (now, or when the run
        that holds it ends)."""
        self._batcher.when_released(request, callback)

    def finish(self, started: Started, error: BaseException | None = None) -> InferResponse:
        """The response of a started request whose future is done; ``error``, what waiting for it raised
        instead (the caller was cancelled), is counted and raised, as a failed or cancelled future is."""
        try:
            if error is not None:
                raise error
            arrays = started.future.result()
        except BaseException as exc:
            self._failed(exc, started.deadline, started.start_ns)
            raise
        self.stats.succeeded(time.monotonic_ns() - started.start_ns)
        return InferResponse(self.name, str(self.version), {n: arrays[n] for n in started.outputs}, started.id)

    async def infer(self, request: InferRequest, cache_key: bytes | None = None) -> InferResponse:
        """Run a request: through ``start`` and ``finish``, or for a model with the cache through it.
        ``cache_key``, when the caller already computed it (from the wire bytes, with ``cache_key()``),
        saves hashing the inputs again."""
        if self._cache is None:
            started = self.start(request)
            try:
                await started.future
            except BaseException as exc:
                self.finish(started, exc)  # counts the failure, and raises it
                raise
            return self.finish(started)
        start = time.monotonic_ns()
        try:
            if not request.checked:
                self.spec.validate(request)
            outputs = request.outputs or self._output_names
            if request.parameters:
                self._batcher.check_parameters(request)  # a hit would not reach the queue's checks
            arrays = await self._cached(request, outputs, start, cache_key)
        except BaseException as exc:
            self._failed(exc, request.deadline, start)
            raise
        return InferResponse(self.name, str(self.version), {n: arrays[n] for n in outputs}, request.id)

    def _failed(self, error: BaseException, deadline: float | None, start_ns: int) -> None:
        self.stats.failed(_reason(error, deadline), time.monotonic_ns() - start_ns)

    async def _cached(
        self, request: InferRequest, outputs: tuple[str, ...], start: int, key: bytes | None
    ) -> dict[str, Any]:
        assert self._cache is not None
        key = key or self._cache.key(self.name, self.version, request.inputs, outputs)
        looked_up = time.monotonic_ns()
        shared = self._cache.shared
        found = [False]  # whether the shared level answered
        if shared is None:
            compute = lambda: self._batcher.submit(request, outputs)  # noqa: E731
        else:
            compute = lambda: self._through_shared(shared, key, request, outputs, found)  # noqa: E731
        arrays, outcome = await self._cache.get_or_compute(key, self.name, compute, request.deadline, self._generation)
        if outcome == "hit" or found[0]:
            self.stats.cache_hit_served(time.monotonic_ns() - start, self._rows(arrays))
        elif outcome == "join":
            self.stats.cache_miss.add(looked_up - start)
            self.stats.cache_joins += 1
            self.stats.shared_served(time.monotonic_ns() - start, self._rows(arrays))
        else:
            self.stats.cache_miss.add(looked_up - start)
            self.stats.succeeded(time.monotonic_ns() - start)
        return arrays

    async def _through_shared(
        self, shared: SharedCache, key: bytes, request: InferRequest, outputs: tuple[str, ...], found: list[bool]
    ) -> dict[str, Any]:
        """The shared level's answer (untrusted bytes, held to this model's outputs), else the batcher's,
        then shared. A version that a reload replaced neither reads nor writes it (``found[0]``: a hit)."""
        assert self._cache is not None
        generation = None
        if self._generation == self._cache.generation(self.name):
            data, generation = await shared.get(self.name, self.version, key)
            if data is not None:
                try:
                    arrays = decode_answer(data, self._expected(request, outputs))
                except ValueError as exc:
                    shared.bad_value(self.name, exc)
                else:
                    found[0] = True
                    return arrays
        arrays = await self._batcher.submit(request, outputs)
        if generation is not None and self._generation == self._cache.generation(self.name):
            shared.put(self.name, self.version, key, generation, {n: arrays[n] for n in outputs})
        return arrays

    def _expected(self, request: InferRequest, outputs: tuple[str, ...]) -> dict[str, Any]:
        """Per requested output, its datatype and full shape (-1 where any size goes) as the config says."""
        specs = {spec.name: spec for spec in self.spec.outputs}
        rows = self._rows(request.inputs)
        expected = {}
        for name in outputs:
            spec = specs[name]
            batch = (rows,) if self.spec.max_batch_size > 0 else ()
            shape = None if spec.shape is None else (*batch, *spec.shape)
            expected[name] = (spec.datatype, shape)
        return expected

    def _rows(self, arrays: dict[str, Any]) -> int:
        """The batch size of a request's answer (1 for a model that does not batch)."""
        if self.spec.max_batch_size <= 0 or not arrays:
            return 1
        return int(next(iter(arrays.values())).shape[0])

    @property
    def pending_requests(self) -> int:
        """Requests waiting in the batcher's queue."""
        return self._batcher.pending

    @property
    def executions_in_flight(self) -> int:
        return self._batcher.running

    async def close(self) -> None:
        """Let held, queued and running requests finish, then release the engines."""
        await self._unheld.wait()
        await self._batcher.close()  # (no step between: a request held now has been queued)
        await asyncio.to_thread(_close_all, self._engines)


DEADLINE_SLACK_S = 0.01


def _reason(error: BaseException, deadline: float | None = None) -> str:
    """The failure reason metrics count. gRPC cancels a call whose deadline passed: that is a timeout."""
    if isinstance(error, asyncio.CancelledError):
        late = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
        return "timeout" if late else "cancelled"
    return error.reason if isinstance(error, RapidServeError) else "internal"


def _close_all(engines: list[Engine]) -> None:
    for engine in engines:
        engine.close()


def _instance(engine: Engine, spec: ModelSpec) -> Instance:
    """What the batcher runs for an engine: its optional ``infer_requests`` (a batch's requests
    unmerged, ``engines.base.Engine``) where it has one, else ``infer``; either held to the config."""
    infer_requests = getattr(engine, "infer_requests", None)
    if callable(infer_requests):
        return PerRequest(_conforming_requests(infer_requests, spec))
    return _conforming(engine.infer, spec)


def _conforming(infer: BatchRunner, spec: ModelSpec) -> BatchRunner:
    """``infer`` with its outputs held to the config: each requested output present, of the config's
    datatype or cast to it where no value changes (``_cast``); a dtype compare per output otherwise."""
    wanted = {s.name: numpy_dtype(s.datatype) for s in spec.outputs if s.datatype}

    def run(inputs: dict[str, np.ndarray[Any, Any]], outputs: Any) -> dict[str, np.ndarray[Any, Any]]:
        result = infer(inputs, outputs)
        for name in outputs:
            array = result.get(name)
            if array is None:
                raise EngineError(f"the engine returned no output '{name}'")
            want = wanted.get(name)
            if want is not None and array.dtype is not want and array.dtype != want:
                result = dict(result)
                result[name] = _cast(name, array, want)
        return result

    return run


def _conforming_requests(
    infer_requests: Callable[[list[Arrays], Sequence[str]], Answers], spec: ModelSpec
) -> Callable[[list[Arrays], Sequence[str]], Answers]:
    """``infer_requests`` with one answer per request, each held to the config as ``_conforming`` holds
    a batch's outputs, and to the config's dims as well (such an engine's outputs are built by hand, per
    request): an answer that does not conform becomes that request's own error, saying what was expected."""
    wanted = {s.name: numpy_dtype(s.datatype) for s in spec.outputs if s.datatype}
    dims = {s.name: tuple(s.shape or ()) for s in spec.outputs}
    batching = spec.max_batch_size > 0

    def conform(answer: Arrays, inputs: Arrays, outputs: Sequence[str]) -> Arrays | Exception:
        rows = next(iter(inputs.values())).shape[0] if batching and inputs else None
        result = {}
        for name in outputs:
            array = answer.get(name)
            if array is None:
                given = ", ".join(answer) or "none"
                return EngineError(f"its response to a request has no output '{name}' (it has: {given})")
            want = wanted.get(name)
            try:
                if want is not None and array.dtype is not want and array.dtype != want:
                    array = _cast(name, array, want)
            except EngineError as exc:
                return exc
            expected = (rows, *dims[name]) if rows is not None else dims[name]
            fits = len(array.shape) == len(expected)
            if not fits or any(e not in (-1, g) for g, e in zip(array.shape, expected, strict=True)):
                return EngineError(
                    f"output '{name}' has shape {list(array.shape)} but the config expects {list(expected)}"
                    + (f" (the request's batch of {rows} first)" if rows is not None else "")
                )
            result[name] = array
        return result

    def run(requests: list[Arrays], outputs: Sequence[str]) -> Answers:
        answers = infer_requests(requests, outputs)
        if len(answers) != len(requests):
            raise EngineError(f"the engine gave {len(answers)} answers to {len(requests)} requests; expected one each")
        return [
            answer if isinstance(answer, Exception) else conform(answer, inputs, outputs)
            for answer, inputs in zip(answers, requests, strict=True)
        ]

    return run


_BF16 = DATATYPES["BF16"]


def _cast(name: str, array: np.ndarray[Any, Any], want: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """``array`` as the config's dtype when the cast keeps its kind and every value: a float to a
    narrower float with no finite value turning infinite, an integer to an integer type that holds
    every value; raises EngineError naming both datatypes otherwise (a model that disagrees with its
    config is the operator's to fix, never a silent change of the values a client gets)."""
    got = array.dtype
    if want.kind == "O":
        if got.kind in "OSU":
            return array
    elif _is_float(want) and _is_float(got):
        with np.errstate(over="ignore"):
            cast = array.astype(want)
        if np.array_equal(np.isinf(cast), np.isinf(array)):
            return cast
        raise EngineError(f"output '{name}' is {_datatype(got)} with values beyond {_datatype(want)}, its config type")
    elif want.kind in "iu" and got.kind in "iu":
        info = np.iinfo(want)
        if not array.size or (info.min <= int(array.min()) and int(array.max()) <= info.max):
            return array.astype(want)
        raise EngineError(f"output '{name}' is {_datatype(got)} with values beyond {_datatype(want)}, its config type")
    raise EngineError(
        f"output '{name}' is {_datatype(got)} but the config says {_datatype(want)}, and the values would change"
    )


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype == _BF16


def _datatype(dtype: np.dtype[Any]) -> str:
    try:
        return datatype_of(dtype)
    except ValueError:
        return str(dtype)
