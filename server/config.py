"""Model configs: ``config.pbtxt`` parsing (Triton's text format of our ``ModelConfig``), completion
from what the model file describes, and the resolved ``ModelSpec`` that requests are checked against."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

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
from rapidserve.server.errors import InvalidRequest, ModelLoadError
from rapidserve.server.types import InferRequest

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "ModelSpec", "complete_config", "parse_config", "unsupported_fields"]

log = logging.getLogger(__name__)

# max_batch_size given to a model whose config does not set one but whose inputs and outputs all
# have a dynamic first dimension (Triton's onnxruntime backend uses 4; we serve batches up to 32).
DEFAULT_MAX_BATCH_SIZE = 32

# Config fields rapidserve honours; "x.*" covers everything below x. Anything else set in a
# config.pbtxt is named in a warning (Triton fields we do not model are skipped by the parser).
_SUPPORTED = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "default_model_filename",
    "input",
    "input.name",
    "input.data_type",
    "input.dims",
    "output",
    "output.name",
    "output.data_type",
    "output.dims",
    "version_policy.*",
    "instance_group",
    "instance_group.name",
    "instance_group.count",
    "instance_group.kind",
    "instance_group.gpus",
    "dynamic_batching",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.preferred_batch_size",
    "dynamic_batching.priority_levels",
    "dynamic_batching.default_priority_level",
    "dynamic_batching.default_queue_policy",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "dynamic_batching.default_queue_policy.allow_timeout_override",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "response_cache",
    "response_cache.enable",
    "model_warmup.*",
    "parameters.*",
    "optimization",
    "optimization.graph",
    "optimization.graph.level",
    "optimization.cuda",
    "optimization.cuda.graphs",
    "optimization.execution_accelerators",
    "optimization.execution_accelerators.gpu_execution_accelerator.*",
    "model_transaction_policy",
    "model_transaction_policy.decoupled",
}


def parse_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse config text into a ``ModelConfig``, warning about every field we do not honour.

    Fields Triton has and our subset lacks (sequence batching, ensembles, ...) are dropped before
    parsing: protobuf's own unknown-field skipping cannot step over every text-format construct. They
    are blanked out in place, so that every error names a line and column of the file itself. A name
    that neither we nor Triton know is a typo, and fails the load with the closest known name.
    """
    known, paths = _walk(text, source)
    try:
        config = text_format.Parse(known, protos.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelLoadError(_located(source, exc)) from None
    ignored = _unsupported(paths)
    if ignored:
        log.warning("%s: ignoring config fields rapidserve does not support: %s", source, ", ".join(ignored))
    return config


def parse_config_json(text: str, source: str) -> Any:
    """A ``ModelConfig`` from JSON (the ``config`` parameter of RepositoryModelLoad)."""
    config = protos.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ModelLoadError(f"{source}: {_clipped(exc)}") from None
    return config


def unsupported_fields(text: str, source: str = "config.pbtxt") -> list[str]:
    """Dotted paths of the fields set in config text that rapidserve does not honour (Triton's fields
    outside our subset); ModelLoadError for a field or enum value that Triton does not have either."""
    return _unsupported(_walk(text, source)[1])


def _walk(text: str, source: str) -> tuple[str, list[str]]:
    """The text with the fields ``ModelConfig`` lacks blanked out (lines and columns unchanged), and the
    path of every field set."""
    lines = text.splitlines()
    walk = _Walk(text_format.Tokenizer(lines), source, len(lines))
    try:
        walk.message(_CONFIG, "", None, 0)
    except text_format.ParseError as exc:
        raise ModelLoadError(_located(source, exc)) from None
    return _blank(lines, walk.dropped), walk.paths


def _unsupported(paths: list[str]) -> list[str]:
    """The unsupported paths, each reported once and without the children of an unsupported field."""
    found: list[str] = []
    for path in dict.fromkeys(paths):
        if not _is_supported(path) and not any(path.startswith(parent + ".") for parent in found):
            found.append(path)
    return found


_CONFIG = protos.ModelConfig.DESCRIPTOR
_MAX_MESSAGE = 400  # a parser's message quotes the offending line, which may be the whole file
_MAX_NESTING = 32  # messages and lists inside each other; real configs go about 5 deep
# Fields of Triton's ModelConfig (model_config.proto) that our subset leaves out, by message: set in a
# config.pbtxt they are skipped with a warning; any other unknown name is a typo.
_TRITON_ONLY = {
    "inference.ModelConfig": (
        "batch_input", "batch_output", "sequence_batching", "ensemble_scheduling", "model_operations",
        "model_repository_agents", "model_metrics",
    ),
    "inference.ModelInstanceGroup": ("secondary_devices",),
    "inference.ModelOptimizationPolicy.Cuda": ("graph_spec",),
}  # fmt: skip

_Position = tuple[int, int]  # (line, column), both from 0


def _clipped(error: Exception) -> str:
    """The error's text, its middle cut out when long: it starts with the place and ends with the reason."""
    text = str(error)
    if len(text) <= _MAX_MESSAGE:
        return text
    half = (_MAX_MESSAGE - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def _located(source: str, error: text_format.ParseError) -> str:
    """``file:line:column: reason`` (the parser's own ``line:column : reason``, re-punctuated)."""
    text = str(error)
    if error.GetLine() is not None:
        text = text.split(" : ", 1)[-1]
        place = f"{error.GetLine()}:{error.GetColumn()}" if error.GetColumn() is not None else f"{error.GetLine()}"
        return f"{source}:{place}: {_clipped(ValueError(text))}"
    return f"{source}: {_clipped(error)}"


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _blank(lines: list[str], spans: list[tuple[_Position, _Position]]) -> str:
    """``lines`` joined, with each span (start, end: end excluded) replaced by spaces."""
    out = list(lines)
    for (first, start), (last, end) in spans:
        for number in range(first, min(last, len(out) - 1) + 1):
            line = out[number]
            left = start if number == first else 0
            right = end if number == last else len(line)
            out[number] = line[:left] + " " * (max(right, left) - left) + line[max(right, left) :]
    return "\n".join(out)


def _is_supported(path: str) -> bool:
    if path in _SUPPORTED:
        return True
    parts = path.split(".")
    return any(".".join(parts[:i]) + ".*" in _SUPPORTED for i in range(1, len(parts) + 1))


class _Walk:
    """One pass over config text in protobuf's text format: records the path of every field set, the
    spans of the fields ``ModelConfig`` lacks (to blank out), and refuses names and enum values that
    are typos, saying where and what was probably meant."""

    def __init__(self, tok: Any, source: str, line_count: int) -> None:
        self.tok = tok
        self.source = source
        self.end: _Position = (line_count, 0)
        self.paths: list[str] = []
        self.dropped: list[tuple[_Position, _Position]] = []

    def _here(self) -> _Position:
        # the tokenizer's position of its current token (protobuf's pure-Python tokenizer keeps it there)
        return (getattr(self.tok, "_line", 0), getattr(self.tok, "_column", 0))

    def _error(self, at: _Position, text: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}:{at[0] + 1}:{at[1] + 1}: {text}")

    def message(self, desc: Any, prefix: str, closing: str | None, depth: int) -> None:
        """The fields of one message, up to ``closing`` (None: the end of the text)."""
        tok = self.tok
        while not (tok.AtEnd() if closing is None else tok.TryConsume(closing)):
            if tok.AtEnd():
                raise tok.ParseError(f"expected '{closing}'")
            start = self._here()
            name = tok.ConsumeIdentifierOrNumber()
            field = desc.fields_by_name.get(name) if desc is not None else None
            if field is None and desc is not None:
                self._check_known(desc, name, start)
            path = prefix + name
            self.paths.append(path)
            tok.TryConsume(":")
            self.value(field, path + ".", depth + 1)
            if not tok.TryConsume(","):
                tok.TryConsume(";")
            if field is None:
                self.dropped.append((start, self.end if tok.AtEnd() else self._here()))

    def _check_known(self, desc: Any, name: str, at: _Position) -> None:
        triton = _TRITON_ONLY.get(desc.full_name, ())
        if name in triton:
            return
        where = "the model config" if desc is _CONFIG else desc.name
        hint = _did_you_mean(name, [*desc.fields_by_name, *triton])
        raise self._error(at, f"{where} has no field '{shown(name, 40)}'{hint}")

    def value(self, field: Any, prefix: str, depth: int) -> None:
        tok = self.tok
        if depth > _MAX_NESTING:
            raise tok.ParseError(f"values are nested more than {_MAX_NESTING} levels deep")
        if tok.TryConsume("["):
            while not tok.TryConsume("]"):
                if tok.AtEnd():
                    raise tok.ParseError("expected ']'")
                self.value(field, prefix, depth + 1)
                tok.TryConsume(",")
            return
        for opening, closing in (("{", "}"), ("<", ">")):
            if tok.TryConsume(opening):
                self.message(field.message_type if field is not None else None, prefix, closing, depth)
                return
        if tok.AtEnd():
            raise tok.ParseError("expected a value")
        if field is not None and field.enum_type is not None:
            self._check_enum(field, tok.token, self._here())
        tok.NextToken()
        while tok.token[:1] in ("'", '"'):  # adjacent string literals concatenate
            tok.NextToken()

    def _check_enum(self, field: Any, token: str, at: _Position) -> None:
        values = field.enum_type.values_by_name
        if token in values or not (token[:1].isalpha() or token[:1] == "_"):
            return  # a number, or a known name; the parser judges numbers
        hint = _did_you_mean(token, values)
        raise self._error(at, f"'{shown(token, 40)}' is not a value of {field.name} ({field.enum_type.name}){hint}")


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
