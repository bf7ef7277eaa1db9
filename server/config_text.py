"""``config.pbtxt`` text: Triton's text format of ``ModelConfig``, read so that fields Triton has and our
subset lacks are skipped with a warning, typos fail with the closest known name, and every error names a
line and column of the file itself."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format, text_format

from rapidserve import protos
from rapidserve.common.errors import shown
from rapidserve.server.errors import ModelLoadError

__all__ = ["parse_config", "parse_config_json", "unsupported_fields"]

log = logging.getLogger("rapidserve.server.config")

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
