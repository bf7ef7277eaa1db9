"""A loaded model version: its engine instances, the dynamic batcher in front of them, its statistics.

``build_version`` does the blocking part (engines, config completion, warm-up) in a loader thread;
``ModelVersion`` is the event-loop side that requests go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.common.datatypes import BYTES, DATATYPES, config_type_to_datatype, datatype_of, numpy_dtype
from rapidserve.common.errors import shown
from rapidserve.engines.base import Engine, EngineOptions, may_run_inline
from rapidserve.engines.registry import load_engine
from rapidserve.server.batcher import INLINE_BELOW_S, BatcherConfig, BatchRunner, DynamicBatcher
from rapidserve.server.cache import CacheEntry, PredictionCache
from rapidserve.server.config import ModelSpec, complete_config
from rapidserve.server.errors import EngineError, ModelLoadError, RapidServeError
from rapidserve.server.overrides import check_instances, check_request_bytes, request_bytes
from rapidserve.server.paths import confined_file, read_exactly
from rapidserve.server.repository import ModelSource
from rapidserve.server.stats import ModelStats
from rapidserve.server.types import InferRequest, InferResponse

__all__ = ["LoadedVersion", "ModelVersion", "Started", "build_version"]

log = logging.getLogger(__name__)

KIND_GPU, KIND_CPU = 1, 2


@dataclass(slots=True)
class LoadedVersion:
    """The result of a loader thread's work, before it is wired into the event loop."""

    version: int
    config: Any
    spec: ModelSpec
    engines: list[Engine]
    load_seconds: float


def build_version(source: ModelSource, version: int) -> LoadedVersion:
    """Load every instance of one version, complete its config and run its warm-up (blocking)."""
    start = time.monotonic()
    config = type(source.config)()
    config.CopyFrom(source.config)
    path = source.files[version]
    engines: list[Engine] = []
    try:
        if config.model_transaction_policy.decoupled:
            raise ModelLoadError(f"model '{config.name}': decoupled models are not supported")
        limits = source.limits  # a caller's config is bounded; the operator's (None) is not
        for device in _instance_devices(config, limits.max_instances if limits is not None else None):
            engines.append(load_engine(source.backend, path, _engine_options(config, device)))
        spec = complete_config(config, tuple(engines[0].inputs), tuple(engines[0].outputs))
        if spec.max_batch_size > 0 and not config.HasField("dynamic_batching"):
            config.dynamic_batching.SetInParent()  # Triton's default for a batching model: no delay
        batcher_config(config)  # reject bad batching settings at load time
        outputs = [o.name for o in spec.outputs]
        # one warm-up request at a time, run on every instance: only one is ever held in memory
        max_bytes = limits.max_request_bytes if limits is not None else None
        for inputs, count in _warmup_requests(config, spec, source.directory, max_bytes):
            for engine in engines:
                for _ in range(count):
                    engine.infer(inputs, outputs)
    except Exception as exc:
        for engine in engines:
            engine.close()
        if isinstance(exc, ModelLoadError):
            if str(exc).startswith(f"model '{config.name}'"):
                raise
            raise ModelLoadError(f"model '{config.name}' version {version}: {exc}") from None
        raise ModelLoadError(f"model '{config.name}' version {version} failed to load: {exc}") from exc
    return LoadedVersion(version, config, spec, engines, time.monotonic() - start)


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
            [_conforming(engine.infer, loaded.spec) for engine in loaded.engines],
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
        A request is counted in the statistics by these two only (or, with the cache, by ``infer``)."""
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
        arrays, outcome = await self._cache.get_or_compute(
            key, self.name, lambda: self._batcher.submit(request, outputs), request.deadline, self._generation
        )
        if outcome == "hit":
            self.stats.cache_hit_served(time.monotonic_ns() - start, self._rows(arrays))
        elif outcome == "join":
            self.stats.cache_miss.add(looked_up - start)
            self.stats.cache_joins += 1
            self.stats.shared_served(time.monotonic_ns() - start, self._rows(arrays))
        else:
            self.stats.cache_miss.add(looked_up - start)
            self.stats.succeeded(time.monotonic_ns() - start)
        return arrays

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


BATCHING_MODES = ("adaptive", "fixed")


def batcher_config(config: Any, batching_mode: str = "adaptive", spec: ModelSpec | None = None) -> BatcherConfig:
    """The batcher's settings from a completed model config; the model parameter ``batching_mode``
    overrides the server's ``--batching-mode``. Fast batches run on the event loop only where the
    engine contract allows it (``may_run_inline``: one instance, on the CPU)."""
    mode = config.parameters["batching_mode"].string_value if "batching_mode" in config.parameters else batching_mode
    if mode not in BATCHING_MODES:
        raise ModelLoadError(f"model '{config.name}': batching_mode must be adaptive or fixed, not '{mode}'")
    dynamic = config.dynamic_batching
    policy = dynamic.default_queue_policy
    if policy.timeout_action != 0:
        log.warning(
            "model '%s': queue timeout_action DELAY is not supported; timed-out requests are rejected", config.name
        )
    if dynamic.priority_levels and not 0 <= dynamic.default_priority_level <= dynamic.priority_levels:
        raise ModelLoadError(
            f"model '{config.name}': default_priority_level {dynamic.default_priority_level} "
            f"is outside 1..{dynamic.priority_levels}"
        )
    return BatcherConfig(
        max_batch_size=config.max_batch_size,
        max_queue_delay_s=dynamic.max_queue_delay_microseconds / 1e6,
        preferred_batch_sizes=tuple(dynamic.preferred_batch_size),
        max_queue_size=policy.max_queue_size,
        default_timeout_s=policy.default_timeout_microseconds / 1e6,
        allow_timeout_override=policy.allow_timeout_override,
        priority_levels=int(dynamic.priority_levels),
        default_priority=int(dynamic.default_priority_level),
        adaptive=mode == "adaptive",
        uniform_shapes=spec is not None and all(-1 not in (s.shape or ()) for s in spec.inputs),
        inline_below_s=INLINE_BELOW_S if may_run_inline(_configured_devices(config)) else 0.0,
    )


def _configured_devices(config: Any) -> list[str]:
    """A device per instance from the completed ``instance_group``, without asking CUDA: a KIND_GPU
    group that names no GPU counts as "cuda" once per ``count`` (enough to tell a GPU model apart)."""
    if not config.instance_group:
        return ["cpu"]
    devices: list[str] = []
    for group in config.instance_group:
        count = max(group.count, 1)
        if group.kind == KIND_GPU:
            devices += ([f"cuda:{gpu}" for gpu in group.gpus] or ["cuda"]) * count
        else:
            devices += ["cpu"] * count
    return devices


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


def _instance_devices(config: Any, max_instances: int | None = None) -> list[str]:
    """One device string per instance from ``instance_group`` (default: one CPU instance). A caller's
    config may ask for at most ``max_instances`` in all, counted before any list is built."""

    if not config.instance_group:
        config.instance_group.add(name=config.name, kind=KIND_CPU, count=1)
    places: list[tuple[int, list[str]]] = []  # (count, the devices each of `count` instances goes on)
    for group in config.instance_group:
        if group.count < 0:
            raise ModelLoadError(f"instance_group count {group.count} must not be negative (0 and 1 mean one)")
        if group.count == 0:
            group.count = 1
        if group.kind == KIND_GPU:  # `count` instances on each listed GPU, or on every visible one
            gpus = list(group.gpus) or list(range(max(_visible_gpus(), 1)))
            places.append((group.count, [f"cuda:{gpu}" for gpu in gpus]))
        else:
            group.kind = KIND_CPU
            places.append((group.count, ["cpu"]))
    if max_instances is not None:
        check_instances(sum(count * len(devices) for count, devices in places), max_instances)
    return [device for count, devices in places for device in devices for _ in range(count)]


def _visible_gpus() -> int:
    """CUDA devices torch sees (0 without torch or CUDA: a KIND_GPU instance then fails to load, saying why)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _engine_options(config: Any, device: str) -> EngineOptions:
    optimization = config.optimization
    return EngineOptions(
        device=device,
        parameters={key: value.string_value for key, value in config.parameters.items()},
        graph_level=optimization.graph.level if optimization.HasField("graph") else None,
        gpu_accelerators=tuple(acc.name for acc in optimization.execution_accelerators.gpu_execution_accelerator),
        cuda_graphs=optimization.cuda.graphs,
        max_batch_size=config.max_batch_size,
        input_names=tuple(entry.name for entry in config.input),
        output_names=tuple(entry.name for entry in config.output),
    )


def _warmup_requests(
    config: Any, spec: ModelSpec, directory: Path, max_bytes: int | None = None
) -> Iterator[tuple[dict[str, Any], int]]:
    """An iterator of (inputs, repeat count), one per warm-up entry, each built only when its turn
    comes; without entries, one zero-filled batch-1 request. ``max_bytes`` bounds a caller's default
    request (its entries were checked before the load, ``overrides.parse_override``)."""

    batching = spec.max_batch_size > 0
    if not config.model_warmup:
        full = {t.name: tuple(1 if d < 0 else d for d in spec.full_shape(t)) for t in spec.inputs}
        shapes = {t.name: (t.datatype or "FP32", full[t.name]) for t in spec.inputs}
        if max_bytes is not None:
            what = "the default warm-up request (zeros of the inputs' dims, batch 1)"
            check_request_bytes(request_bytes(shapes.values()), what, max_bytes)
        yield {name: _fill(datatype, dims, "zero", None) for name, (datatype, dims) in shapes.items()}, 1
        return
    rng = np.random.default_rng(0)
    for entry in config.model_warmup:
        inputs = {}
        for name, tensor in entry.inputs.items():
            dims = tuple(tensor.dims)
            if batching:
                dims = (max(entry.batch_size, 1), *dims)
            what = f"warm-up '{entry.name}' input '{name}'"
            if any(d < 0 for d in dims):
                raise ModelLoadError(f"{what}: dims {list(dims)} must not be negative")
            kind = tensor.WhichOneof("input_data_type") or "zero_data"
            file = None
            if kind == "input_data_file":  # a caller's config names it: it must stay in <model>/warmup/
                what += f": input_data_file '{shown(tensor.input_data_file)}'"
                rule = "must be a relative path to a regular file in the model's warmup/ folder"
                folder = directory / "warmup"
                file = confined_file(folder, tensor.input_data_file, (folder, directory), what, rule)
            datatype = config_type_to_datatype(tensor.data_type)
            inputs[name] = _fill(datatype, dims, kind.split("_")[0], file, rng, what)
        missing = {t.name for t in spec.inputs} - set(inputs)
        if missing:
            raise ModelLoadError(f"warm-up '{entry.name}' lacks input(s): {', '.join(sorted(missing))}")
        yield inputs, max(entry.count, 1)


def _fill(
    datatype: str,
    dims: tuple[int, ...],
    kind: str,
    file: Path | None,
    rng: np.random.Generator | None = None,
    what: str = "warm-up data",
) -> np.ndarray[Any, Any]:
    """A warm-up tensor. ``file`` (already confined) must hold exactly the tensor's bytes and is never
    read further, whatever it turns out to be."""
    dtype = numpy_dtype(datatype)
    count = int(np.prod(dims, dtype=object))  # exact: a fixed-width product could wrap around
    if datatype == BYTES:
        return np.full(dims, b"0", dtype=object)
    if kind == "input" and file is not None:
        data = read_exactly(file, count * dtype.itemsize, f"{what} ({datatype} {list(dims)})")
        return np.frombuffer(data, dtype=dtype).reshape(dims)
    if kind == "random" and rng is not None:
        if dtype.kind == "f" or datatype == "BF16":
            return rng.random(dims, dtype=np.float32).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, dims, dtype=np.uint8).astype(dtype)
        return rng.integers(0, 100, dims, dtype=dtype)  # drawn in the dtype: no int64 array 8x the size
    return np.zeros(dims, dtype=dtype)
