"""Building a model version, the blocking part of a load: its engine instances on their devices, its
completed config and batching settings, and its warm-up. Runs in a loader thread; ``ModelVersion``
(server/model.py) is the event-loop side that the result is wired into."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.common.datatypes import BYTES, config_type_to_datatype, numpy_dtype
from rapidserve.common.errors import shown
from rapidserve.engines.base import USER_CODE_BACKENDS, Engine, EngineOptions, may_run_inline
from rapidserve.engines.registry import load_engine
from rapidserve.server.batcher import INLINE_BELOW_S, BatcherConfig
from rapidserve.server.config import ModelSpec, complete_config
from rapidserve.server.errors import ModelLoadError
from rapidserve.server.overrides import check_instances, check_request_bytes, request_bytes
from rapidserve.server.paths import confined_file, read_exactly
from rapidserve.server.repository import ModelSource

__all__ = ["BATCHING_MODES", "KIND_CPU", "KIND_GPU", "LoadedVersion", "batcher_config", "build_version"]

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
        devices = _instance_devices(config, limits.max_instances if limits is not None else None)
        for index, device in enumerate(devices):
            options = _engine_options(config, device, f"{config.name}_{index}")
            engines.append(load_engine(source.backend, path, options))
        spec = complete_config(config, tuple(engines[0].inputs), tuple(engines[0].outputs))
        if spec.max_batch_size > 0 and not config.HasField("dynamic_batching"):
            config.dynamic_batching.SetInParent()  # Triton's default for a batching model: no delay
        batcher_config(config)  # reject bad batching settings at load time
        outputs = [o.name for o in spec.outputs]
        # one warm-up request at a time, run on every instance: only one is ever held in memory
        max_bytes = limits.max_request_bytes if limits is not None else None
        # a model of the author's own code may not take zeros: it warms up only as its config says
        default_warmup = source.backend not in USER_CODE_BACKENDS
        for inputs, count in _warmup_requests(config, spec, source.directory, max_bytes, default_warmup):
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


BATCHING_MODES = ("adaptive", "fixed")


def batcher_config(config: Any, batching_mode: str = "adaptive", spec: ModelSpec | None = None) -> BatcherConfig:
    """The batcher's settings from a completed model config; the model parameter ``batching_mode``
    overrides the server's ``--batching-mode``. Fast batches run on the event loop only where the
    engine contract allows it (``may_run_inline``: one instance, on the CPU, not the author's code)."""
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
        inline_below_s=INLINE_BELOW_S if may_run_inline(_configured_devices(config), config.backend) else 0.0,
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


def _engine_options(config: Any, device: str, instance_name: str = "") -> EngineOptions:
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
        model_config=config,
        instance_name=instance_name,
    )


def _warmup_requests(
    config: Any, spec: ModelSpec, directory: Path, max_bytes: int | None = None, default: bool = True
) -> Iterator[tuple[dict[str, Any], int]]:
    """An iterator of (inputs, repeat count), one per warm-up entry, each built only when its turn
    comes; without entries, one zero-filled batch-1 request if ``default``. ``max_bytes`` bounds a
    caller's default request (its entries were checked before the load, ``overrides.parse_override``)."""

    batching = spec.max_batch_size > 0
    if not config.model_warmup:
        if not default:
            return
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
