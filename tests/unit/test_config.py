from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from rapidserve import protos
from rapidserve.common.types import TensorSpec
from rapidserve.server.config import DEFAULT_MAX_BATCH_SIZE, complete_config, parse_config, unsupported_fields
from rapidserve.server.errors import InvalidRequest, ModelLoadError
from rapidserve.server.types import InferRequest

TRITON_CONFIG = """
name: "densenet"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [ 3, 4 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 2 ], label_filename: "labels.txt" } ]
sequence_batching { max_sequence_idle_microseconds: 5000000
  control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ] }
dynamic_batching { max_queue_delay_microseconds: 100 preserve_ordering: true }
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
model_warmup [ { name: "w" batch_size: 2 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 3, 4 ] zero_data: true } } } ]
"""


def test_triton_config_parses_and_unsupported_fields_are_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = parse_config(TRITON_CONFIG, "densenet/config.pbtxt")
    assert config.name == "densenet" and config.max_batch_size == 8
    assert config.instance_group[0].count == 2
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert config.model_warmup[0].inputs["x"].zero_data
    warning = caplog.records[-1].getMessage()
    for field in ("input.format", "output.label_filename", "sequence_batching", "dynamic_batching.preserve_ordering"):
        assert field in warning
    assert "control_input" not in warning  # children of an unsupported field are not listed again


def test_triton_fields_we_lack_are_named_and_typos_fail_with_the_closest_name_and_place() -> None:
    assert unsupported_fields('name: "m"\nbatch_input [ { kind: BATCH_ELEMENT_COUNT } ]') == ["batch_input"]
    text = 'name: "m"\n# a comment\nsequence_batching { max_sequence_idle_microseconds: 5 }\n  max_batch_sise: 4\n'
    for check in (parse_config, unsupported_fields):
        with pytest.raises(ModelLoadError) as info:
            check(text, "models/m/config.pbtxt")
        assert str(info.value) == (
            "models/m/config.pbtxt:4:3: the model config has no field 'max_batch_sise'; did you mean max_batch_size?"
        )
    nested = 'name: "m"\ninstance_group [ { count: 1, knd: KIND_CPU } ]'
    with pytest.raises(
        ModelLoadError, match=r"config\.pbtxt:2:30: ModelInstanceGroup has no field 'knd'; did you mean kind\?"
    ):
        parse_config(nested, "config.pbtxt")


def test_an_unknown_enum_value_says_which_was_meant_and_where() -> None:
    text = 'name: "m"\ninput [\n  { name: "x", data_type: TYPE_FP23, dims: [ 4 ] }\n]\n'
    with pytest.raises(ModelLoadError) as info:
        parse_config(text, "m/config.pbtxt")
    assert (
        str(info.value)
        == "m/config.pbtxt:3:27: 'TYPE_FP23' is not a value of data_type (DataType); did you mean TYPE_FP32?"
    )


def test_parser_errors_point_into_the_file_itself_past_dropped_fields() -> None:
    """Fields Triton has and we lack are blanked, not cut out: the parser's line and column are the file's."""
    text = 'name: "m"\nsequence_batching {\n  direct { }\n}\nmax_batch_size: "many"\n'
    with pytest.raises(ModelLoadError, match=r"^m/config\.pbtxt:5:17: .*many"):
        parse_config(text, "m/config.pbtxt")


def test_malformed_config_is_a_load_error_naming_the_file() -> None:
    with pytest.raises(ModelLoadError, match=r"m/config\.pbtxt"):
        parse_config('name: "m" max_batch_size: "many"', "m/config.pbtxt")
    with pytest.raises(ModelLoadError, match="expected '}'"):
        parse_config('input { name: "a" ', "m/config.pbtxt")


ENGINE_IN = (TensorSpec("x", "FP32", (-1, 3)),)
ENGINE_OUT = (TensorSpec("y", "INT64", (-1,)),)


def test_config_is_completed_from_the_model_with_default_batching() -> None:
    config = protos.ModelConfig(name="m")
    spec = complete_config(config, ENGINE_IN, ENGINE_OUT)
    assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", protos.DataType.Value("TYPE_FP32"), [3])
    ]
    assert spec.inputs == (TensorSpec("x", "FP32", (3,)),)
    assert spec.full_shape(spec.outputs[0]) == (-1,)


def test_fixed_first_dim_means_no_batching() -> None:
    config = protos.ModelConfig(name="m")
    spec = complete_config(config, (TensorSpec("x", "FP32", (2, 3)),), (TensorSpec("y", "FP32", (2,)),))
    assert spec.max_batch_size == 0 and spec.inputs[0].shape == (2, 3)


def test_config_that_disagrees_with_the_model_fails_to_load() -> None:
    config = parse_config('max_batch_size: 4 input [{ name: "x" data_type: TYPE_FP64 dims: [3] }]')
    with pytest.raises(ModelLoadError, match="has data_type FP64 but the model has FP32"):
        complete_config(config, ENGINE_IN, ENGINE_OUT)
    config = parse_config('max_batch_size: 4 input [{ name: "x" data_type: TYPE_FP32 dims: [5] }]')
    with pytest.raises(ModelLoadError, match=r"has shape \[-1, 5\]"):
        complete_config(config, ENGINE_IN, ENGINE_OUT)
    config = parse_config('input [{ name: "z" data_type: TYPE_FP32 dims: [3] }]')
    with pytest.raises(ModelLoadError, match="lacks input"):
        complete_config(config, ENGINE_IN, ENGINE_OUT)


def test_model_file_without_io_description_needs_a_config() -> None:
    with pytest.raises(ModelLoadError, match="give its data_type and dims"):
        complete_config(protos.ModelConfig(name="m"), (TensorSpec("x", None, None),), ())


def _request(**inputs: np.ndarray) -> InferRequest:
    return InferRequest("m", "", inputs)


def test_spec_validation_messages() -> None:
    spec = complete_config(parse_config("max_batch_size: 4"), ENGINE_IN, ENGINE_OUT)
    spec.validate(_request(x=np.zeros((2, 3), np.float32)))
    cases = [
        (_request(), "missing input 'x'"),
        (_request(x=np.zeros((2, 3), np.float32), z=np.zeros(1)), "unexpected input 'z'"),
        (_request(x=np.zeros((2, 3), np.float64)), "datatype FP64 does not match the model's FP32"),
        (_request(x=np.zeros((2, 4), np.float32)), r"shape \[2, 4\] does not match the model's \[-1, 3\]"),
        (_request(x=np.zeros((5, 3), np.float32)), "batch size 5 exceeds the model's max_batch_size 4"),
    ]
    for request, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            spec.validate(request)
    with pytest.raises(InvalidRequest, match="unknown output 'nope'"):
        spec.validate(InferRequest("m", "", {"x": np.zeros((1, 3), np.float32)}, outputs=("nope",)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input { dims: [", "expected ']'"),  # used to loop forever
        ('input [ { name: "x" dims: [ 1, 2', "expected ']'"),
        ("name: ", "expected a value"),
        ("sequence_batching { " + "x { " * 3000, "nested more than 32 levels deep"),  # used to overflow the stack
        ("input { dims: " + "[" * 3000, "nested more than 32 levels deep"),
        ("model_metrics < " + "x < " * 40, "nested more than 32 levels deep"),
    ],
)
def test_malformed_config_text_fails_to_load_at_once(text: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as info:
        parse_config(text, "m/config.pbtxt")
    assert re.match(r"m/config\.pbtxt:(\d+:\d+:)? ", str(info.value))
    assert len(str(info.value)) <= len("m/config.pbtxt:999:999: ") + 400  # the parser quotes the line: clipped
    with pytest.raises(ModelLoadError, match=message):
        unsupported_fields(text)


def test_configs_nested_as_deep_as_real_ones_still_parse() -> None:
    text = (
        'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
        'parameters { key: "precision_mode" value: "FP16" } } ] } }'
    )
    config = parse_config(text)
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


@pytest.mark.parametrize(
    ("config_text", "engine_in", "message"),
    [
        ('input [{ name: "x" dims: [3] }]', ENGINE_IN, "config input 'x' has no valid data_type \\(got 0\\)"),
        (
            'input [{ name: "x" data_type: 99 dims: [3] }]',
            ENGINE_IN,
            "no valid data_type \\(got 99\\); expected one of",
        ),
        (
            'max_batch_size: 4 input [{ name: "x" data_type: TYPE_FP32 dims: [3] }, '
            '{ name: "x" data_type: TYPE_FP32 dims: [3] }]',
            ENGINE_IN,
            "config input 'x' is declared more than once",
        ),
        ('input [{ name: "x" data_type: TYPE_FP32 dims: [-5] }]', ENGINE_IN, "has dims \\[-5\\]; each is -1"),
        ("", (TensorSpec("x", "FP8", (-1, 3)),), "the model's input 'x' has datatype FP8, which is not served"),
    ],
)
def test_configs_a_request_could_never_meet_fail_to_load(
    config_text: str, engine_in: tuple[TensorSpec, ...], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        complete_config(parse_config(config_text), engine_in, ENGINE_OUT)


def test_check_input_checks_one_header_and_carries_the_batch() -> None:
    spec = complete_config(parse_config("max_batch_size: 4"), (*ENGINE_IN, TensorSpec("w", "INT8", (-1,))), ENGINE_OUT)
    batch = spec.check_input("x", "FP32", [2, 3], None)
    assert batch == 2 and spec.check_input("w", "INT8", [2], batch) == 2
    with pytest.raises(InvalidRequest, match="input 'w': batch size 3 differs from the other inputs' 2"):
        spec.check_input("w", "INT8", [3], batch)
    spec.check_names({"x": None, "w": None}, ("y",))
    with pytest.raises(InvalidRequest, match="missing input 'w'"):
        spec.check_names({"x": None}, ())
