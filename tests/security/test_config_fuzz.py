"""Property-based fuzzing of model configs: any config.pbtxt text parses or fails as ModelLoadError
(a load error naming the file), and completing any parsed config against any engine description
gives a spec or a ModelLoadError, never another exception."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidserve import protos
from rapidserve.common.datatypes import DATATYPES
from rapidserve.common.types import TensorSpec
from rapidserve.server.config import ModelSpec, complete_config, parse_config, parse_config_json, unsupported_fields
from rapidserve.server.errors import ModelLoadError

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

FIELDS = [
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "data_type",
    "dims",
    "instance_group",
    "count",
    "kind",
    "dynamic_batching",
    "max_queue_delay_microseconds",
    "preferred_batch_size",
    "priority_levels",
    "default_queue_policy",
    "response_cache",
    "enable",
    "parameters",
    "key",
    "value",
    "string_value",
    "model_warmup",
    "optimization",
    "sequence_batching",
    "version_policy",
    "latest",
    "num_versions",
    "ensemble_scheduling",
    "format",
    "label_filename",
    "reshape",
    "shape",
    "default_model_filename",
]
VALUES = [
    '"m"',
    '"x"',
    "'single'",
    '"a" "b"',
    '"\\x00"',
    '"unterminated',
    "TYPE_FP32",
    "TYPE_STRING",
    "TYPE_INVALID",
    "KIND_GPU",
    "KIND_CPU",
    "FORMAT_NCHW",
    "true",
    "false",
    "0",
    "-1",
    "4",
    "2147483648",
    "99999999999999999999999",
    "1.5",
    "-inf",
    "nan",
    "0x10",
]
PUNCTUATION = ["{", "}", "[", "]", "<", ">", ":", ",", ";", "\n", "#", " "]

tokens = st.one_of(st.sampled_from(FIELDS), st.sampled_from(VALUES), st.sampled_from(PUNCTUATION), st.text(max_size=4))


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """Config text: field-value pairs nested up to a few levels (mostly the shape of a config),
    with tokens, garbage and deep nesting thrown in."""

    def message(depth: int) -> list[str]:
        parts: list[str] = []
        for _ in range(draw(st.integers(0, 4))):
            parts.append(draw(st.sampled_from(FIELDS)))
            kind = draw(st.integers(0, 5))
            if kind == 0 and depth < 3:
                parts += [":", "{", *message(depth + 1), "}"]
            elif kind == 1 and depth < 3:
                parts += ["[", "{", *message(depth + 1), "}", "]"]
            elif kind == 2:
                parts += [":", "[", *draw(st.lists(st.sampled_from(VALUES), max_size=3)), "]"]
            elif kind == 3:
                parts += draw(st.lists(tokens, max_size=3))
            else:
                parts += [":", draw(st.sampled_from(VALUES))]
        return parts

    parts = message(0)
    if parts and draw(st.booleans()):  # damage it somewhere
        position = draw(st.integers(0, len(parts) - 1))
        parts[position : position + 1] = draw(st.lists(tokens, max_size=2))
    if draw(st.integers(0, 9)) == 5:
        depth = draw(st.integers(1, 3000))
        parts += ["input", "{"] * depth  # far deeper than any config: the parser must not blow its stack
    return " ".join(parts)


def _config(text: str) -> Any:
    try:
        return parse_config(text, "fuzz/config.pbtxt")
    except ModelLoadError as exc:
        assert re.match(r"fuzz/config\.pbtxt:(\d+:\d+:)? ", str(exc)) and len(str(exc)) < 1000
        return None


@FUZZ
@given(st.one_of(config_texts(), st.text(max_size=80)))
def test_any_config_text_parses_or_is_a_load_error(text: str) -> None:
    config = _config(text)
    try:
        unsupported_fields(text, "fuzz/config.pbtxt")
    except ModelLoadError:
        assert config is None
    if config is not None:
        protos.ModelConfig.FromString(config.SerializeToString())


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(FIELDS), children, max_size=3)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4).map(json.dumps),
        st.text(max_size=40),
        st.integers(1, 100_000).map(lambda depth: "[" * depth),
    )
)
def test_any_json_config_parses_or_is_a_load_error(text: str) -> None:
    try:
        parse_config_json(text, "fuzz")
    except ModelLoadError as exc:
        assert str(exc).startswith("fuzz: ") and len(str(exc)) < 1000


dims = st.lists(st.sampled_from([-1, 0, 1, 3, 2**31, -5]), max_size=3)
engine_specs = st.lists(
    st.builds(
        TensorSpec,
        st.sampled_from(["x", "y", "z", ""]),
        st.one_of(st.none(), st.sampled_from([*DATATYPES, "FP8"])),
        st.one_of(st.none(), dims.map(tuple)),
    ),
    max_size=3,
)


@st.composite
def configs(draw: st.DrawFn) -> Any:
    config = protos.ModelConfig(name="m", max_batch_size=draw(st.sampled_from([0, 0, 4, -1, 2**31 - 1])))
    for field in ("input", "output"):
        for _ in range(draw(st.integers(0, 2))):
            entry = getattr(config, field).add(
                name=draw(st.sampled_from(["x", "y", "z"])), data_type=draw(st.integers(0, 16))
            )
            entry.dims.extend(draw(dims))
    return config


@FUZZ
@given(configs(), engine_specs, engine_specs)
def test_completing_any_config_against_any_engine_gives_a_spec_or_a_load_error(
    config: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> None:
    try:
        spec = complete_config(config, tuple(inputs), tuple(outputs))
    except ModelLoadError as exc:
        assert str(exc)
        return
    assert isinstance(spec, ModelSpec)
    assert spec.max_batch_size >= 0
