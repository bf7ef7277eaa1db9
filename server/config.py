"""Model configs: ``config.pbtxt`` parsing (Triton's text format of our ``ModelConfig``), completion
from what the model file describes, and the resolved ``ModelSpec`` that requests are checked against."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidserve import protos
from rapidserve.common.datatypes import (
    DATATYPES,
    config_type_to_datatype,
    datatype_of,
    datatype_to_config_type,
    numpy_dtype,
)
from rapidserve.common.errors import shown
from rapidserve.common.types import TensorSpec
from rapidserve.server.config_text import parse_config, parse_config_json, unsupported_fields
from rapidserve.server.errors import InvalidRequest, ModelLoadError
from rapidserve.server.types import InferRequest

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "ModelSpec",
    "complete_config",
    "parse_config",
    "parse_config_json",
    "read_config",
    "unsupported_fields",
]

# max_batch_size given to a model whose config does not set one but whose inputs and outputs all
# have a dynamic first dimension (Triton's onnxruntime backend uses 4; we serve batches up to 32).
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's resolved interface. With ``max_batch_size > 0`` every tensor has a leading batch
    dimension that ``dims`` leaves out (Triton's convention)."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # (name, numpy dtype, full shape) per input, and the output names: what validate() checks first
    _checks: tuple[tuple[str, Any, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)
    _output_names: frozenset[str] = field(init=False, repr=False, compare=False)
    # name -> (spec, v2 datatype, full shape): what check_input() compares a tensor's header with
    _by_name: dict[str, tuple[TensorSpec, str, tuple[int, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = tuple((s.name, numpy_dtype(s.datatype or "FP32"), self.full_shape(s)) for s in self.inputs)
        object.__setattr__(self, "_checks", checks)
        object.__setattr__(self, "_output_names", frozenset(s.name for s in self.outputs))
        by_name = {s.name: (s, s.datatype or "FP32", self.full_shape(s)) for s in self.inputs}
        object.__setattr__(self, "_by_name", by_name)

    def full_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        dims = spec.shape or ()
        return (-1, *dims) if self.max_batch_size > 0 else dims

    def validate(self, request: InferRequest) -> None:
        """Check a decoded request against the model; raise ``InvalidRequest`` saying what is wrong."""
        if self._conforms(request):
            return
        self._explain(request)

    def _conforms(self, request: InferRequest) -> bool:
        """The fast check every good request passes; failures go to ``_explain`` for the message."""
        inputs = request.inputs
        if len(inputs) != len(self._checks):
            return False
        batch = -1
        for name, dtype, want in self._checks:
            array = inputs.get(name)
            if array is None or array.dtype != dtype:
                return False
            shape = array.shape
            if len(shape) != len(want):
                return False
            for w, s in zip(want, shape):  # noqa: B905 - lengths checked above
                if w != s and w != -1:
                    return False
            if self.max_batch_size > 0:
                if shape[0] > self.max_batch_size or (batch != -1 and shape[0] != batch):
                    return False
                batch = shape[0]
        return not request.outputs or self._output_names.issuperset(request.outputs)

    def check_input(self, name: str, datatype: str, shape: Sequence[int], batch: int | None) -> int | None:
        """Check one input's header (name, datatype, shape) before any of its data is decoded.

        ``batch`` is the batch size of the inputs checked so far (None before the first); the
        result is the batch size to pass with the next input. Raises what ``validate`` would."""
        found = self._by_name.get(name)
        if found is None:
            raise self._unexpected(name)
        spec, expected, want = found
        if datatype != expected:
            raise _datatype_mismatch(spec, datatype)
        if len(shape) != len(want):
            return self._check_shape(spec, tuple(shape), batch)
        for w, s in zip(want, shape):  # noqa: B905 - lengths checked above
            if w != s and w != -1:
                return self._check_shape(spec, tuple(shape), batch)
        if self.max_batch_size == 0:
            return batch
        size = shape[0]
        if size > self.max_batch_size or (batch is not None and size != batch):
            return self._check_shape(spec, tuple(shape), batch)
        return size

    def check_names(self, inputs: Collection[str], outputs: Iterable[str]) -> None:
        """After ``check_input`` passed for each of ``inputs`` (distinct names): no input is missing
        and every requested output exists."""
        if len(inputs) != len(self.inputs):
            for spec in self.inputs:
                if spec.name not in inputs:
                    raise InvalidRequest(f"missing input '{spec.name}' for model '{self.name}'")
        if outputs and not self._output_names.issuperset(outputs):
            self._check_outputs(outputs)

    def check_counts(
        self, inputs: int, outputs: int, first_inputs: Sequence[str], first_outputs: Sequence[str]
    ) -> None:
        """Refuse a request with more inputs, or more requested outputs, than the model has: what the
        codec checks before it reads them all, so that no loop runs over a list a caller made long.
        ``first_inputs`` and ``first_outputs`` are the request's first names, one more than the model
        has: the message names the first of them that is unknown or repeated."""
        if inputs > len(self.inputs):
            takes = ", ".join(spec.name for spec in self.inputs)
            odd = _odd_one(first_inputs, self._by_name, "unexpected input", "input", "appears more than once")
            raise InvalidRequest(
                f"the request has {inputs} inputs but model '{self.name}' takes {len(self.inputs)}: {takes}{odd}"
            )
        if outputs > len(self.outputs):
            has = ", ".join(spec.name for spec in self.outputs)
            odd = _odd_one(first_outputs, self._output_names, "unknown output", "output", "is requested more than once")
            raise InvalidRequest(
                f"the request asks for {outputs} outputs but model '{self.name}' has {len(self.outputs)}: {has}{odd}"
            )

    def _explain(self, request: InferRequest) -> None:
        expected = {spec.name: spec for spec in self.inputs}
        for name in request.inputs:
            if name not in expected:
                raise self._unexpected(name)
        batch: int | None = None
        for spec in self.inputs:
            array = request.inputs.get(spec.name)
            if array is None:
                raise InvalidRequest(f"missing input '{spec.name}' for model '{self.name}'")
            datatype = datatype_of(array.dtype)
            if datatype != spec.datatype:
                raise _datatype_mismatch(spec, datatype)
            batch = self._check_shape(spec, array.shape, batch)
        self._check_outputs(request.outputs)

    def _unexpected(self, name: str) -> InvalidRequest:
        takes = ", ".join(spec.name for spec in self.inputs)
        return InvalidRequest(f"unexpected input '{shown(name)}' for model '{self.name}'; it takes: {takes}")

    def _check_outputs(self, outputs: Iterable[str]) -> None:
        for name in outputs:
            if name not in self._output_names:
                has = ", ".join(spec.name for spec in self.outputs)
                raise InvalidRequest(
                    f"unknown output '{shown(name)}' requested from model '{self.name}'; it has: {has}"
                )

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...], batch: int | None) -> int | None:
        want = self.full_shape(spec)
        if len(shape) != len(want) or any(w != -1 and w != s for w, s in zip(want, shape, strict=True)):
            raise InvalidRequest(
                f"input '{spec.name}': shape {list(shape)} does not match the model's {list(want)} (-1 = any size)"
            )
        if self.max_batch_size == 0:
            return batch
        size = shape[0]
        if size > self.max_batch_size:
            raise InvalidRequest(
                f"input '{spec.name}': batch size {size} exceeds the model's max_batch_size {self.max_batch_size}"
            )
        if batch is not None and size != batch:
            raise InvalidRequest(f"input '{spec.name}': batch size {size} differs from the other inputs' {batch}")
        return size


def _odd_one(names: Sequence[str], known: Collection[str], unknown: str, kind: str, repeated: str) -> str:
    """The first of ``names`` that is not ``known`` or comes twice, as the end of a message ('' if none)."""
    seen: set[str] = set()
    for name in names:
        if name not in known:
            return f" ({unknown} '{shown(name)}')"
        if name in seen:
            return f" ({kind} '{shown(name)}' {repeated})"
        seen.add(name)
    return ""


def _datatype_mismatch(spec: TensorSpec, datatype: str) -> InvalidRequest:
    return InvalidRequest(f"input '{spec.name}': datatype {datatype} does not match the model's {spec.datatype}")


def complete_config(
    config: Any, engine_inputs: tuple[TensorSpec, ...], engine_outputs: tuple[TensorSpec, ...]
) -> ModelSpec:
    """Fill the config's I/O and ``max_batch_size`` from the engine where it is silent, check the two
    agree where both speak, and return the resolved spec. Mutates ``config``."""
    if (
        not config.input
        and not config.output
        and config.max_batch_size == 0
        and _batchable(engine_inputs + engine_outputs)
    ):
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    if config.max_batch_size < 0:
        raise ModelLoadError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    inputs = _resolve(config, config.input, engine_inputs, "input")
    outputs = _resolve(config, config.output, engine_outputs, "output")
    return ModelSpec(config.name, config.platform, config.max_batch_size, inputs, outputs)


def _batchable(specs: tuple[TensorSpec, ...]) -> bool:
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)


def _resolve(config: Any, declared: Any, engine: tuple[TensorSpec, ...], kind: str) -> tuple[TensorSpec, ...]:
    batching = config.max_batch_size > 0
    by_name = {spec.name: spec for spec in engine}
    if not declared:
        for spec in engine:
            if spec.datatype is None or spec.shape is None:
                raise ModelLoadError(
                    f"the model file does not describe {kind} '{spec.name}'; "
                    f"give its data_type and dims in config.pbtxt"
                )
            if batching and (not spec.shape or spec.shape[0] not in (-1,)):
                raise ModelLoadError(
                    f"{kind} '{spec.name}' has shape {list(spec.shape)} with no dynamic batch dimension, "
                    f"but max_batch_size is {config.max_batch_size}"
                )
            if spec.datatype not in DATATYPES:
                raise ModelLoadError(
                    f"the model's {kind} '{spec.name}' has datatype {spec.datatype}, which is not served"
                )
            entry = declared.add(name=spec.name, data_type=datatype_to_config_type(spec.datatype))
            entry.dims.extend(spec.shape[1:] if batching else spec.shape)
    missing = set(by_name) - {entry.name for entry in declared}
    if kind == "input" and missing:
        raise ModelLoadError(f"config.pbtxt lacks input(s) the model needs: {', '.join(sorted(missing))}")
    resolved = []
    seen: set[str] = set()
    for entry in declared:
        if entry.name in seen:
            raise ModelLoadError(f"config {kind} '{entry.name}' is declared more than once")
        seen.add(entry.name)
        try:
            datatype = config_type_to_datatype(entry.data_type)
        except ValueError:
            raise ModelLoadError(
                f"config {kind} '{entry.name}' has no valid data_type (got {entry.data_type}); "
                f"expected one of {', '.join(_CONFIG_TYPE_NAMES)}"
            ) from None
        dims = tuple(entry.dims)
        if any(dim < -1 for dim in dims):
            raise ModelLoadError(f"config {kind} '{entry.name}' has dims {list(dims)}; each is -1 (any size) or >= 0")
        found = by_name.get(entry.name)
        if found is None:
            raise ModelLoadError(
                f"config {kind} '{entry.name}' is not in the model, which has: {', '.join(by_name) or 'none'}"
            )
        if found.datatype is not None and found.datatype != datatype:
            raise ModelLoadError(
                f"config {kind} '{entry.name}' has data_type {datatype} but the model has {found.datatype}"
            )
        full = (-1, *dims) if batching else dims
        if found.shape is not None and not _compatible(full, found.shape):
            raise ModelLoadError(
                f"config {kind} '{entry.name}' has shape {list(full)} (batch included) "
                f"but the model has {list(found.shape)}"
            )
        resolved.append(TensorSpec(entry.name, datatype, dims))
    return tuple(resolved)


_CONFIG_TYPE_NAMES = [f"TYPE_{'STRING' if t == 'BYTES' else t}" for t in DATATYPES]


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def read_config(model_dir: Path) -> Any:
    """The model's config from ``config.pbtxt`` if present, else an empty one named after the dir."""
    path = model_dir / "config.pbtxt"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read it: {exc}") from None
    config = protos.ModelConfig() if text is None else parse_config(text, str(path))
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ModelLoadError(f"{path}: name '{config.name}' does not match the directory name '{model_dir.name}'")
    return config
