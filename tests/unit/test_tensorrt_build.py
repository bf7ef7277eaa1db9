"""TensorRT plan building against the two APIs it meets: 10.x (precision flags) and 11.x (strongly typed,
no precision flags). TensorRT itself needs a GPU; these stand-ins record what the builder was asked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rapidserve.engines.prepare.context import Skipped
from rapidserve.engines.prepare.tensorrt import build_plan, weakly_typed


class _Config:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.profiles: list[Any] = []

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile: Any) -> None:
        self.profiles.append(profile)


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, ...]] = {}

    def set_shape(self, name: str, *shapes: Any) -> None:
        self.shapes[name] = shapes


def _fake_trt(*, version: int, input_shape: tuple[int, ...]) -> SimpleNamespace:
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="x", shape=input_shape))
    built = SimpleNamespace(config=None)

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Any:
            return network

        def create_builder_config(self) -> _Config:
            built.config = _Config()
            return built.config

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: Any, config: Any) -> bytes:
            return b"plan"

    class OnnxParser:
        def __init__(self, network: Any, logger: Any) -> None:
            self.num_errors = 0

        def parse(self, data: bytes) -> bool:
            return True

    flags = SimpleNamespace(FP16="FP16", INT8="INT8") if version < 11 else SimpleNamespace(TF32="TF32")

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    return SimpleNamespace(Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=flags, built=built)


@pytest.mark.parametrize(("version", "expected"), [(10, ["FP16", "INT8"]), (11, [])])
def test_precision_flags_are_set_only_where_tensorrt_still_has_them(
    tmp_path: Path, version: int, expected: list[str]
) -> None:
    trt = _fake_trt(version=version, input_shape=(-1, 3, 8, 8))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x00")
    target = build_plan(trt, onnx, tmp_path / "m.plan", fp16=True, int8=True, opt=8, max_batch=4)
    assert target.read_bytes() == b"plan"
    assert weakly_typed(trt) is (version < 11)
    assert trt.built.config.flags == expected
    (profile,) = trt.built.config.profiles
    assert profile.shapes["x"] == ((1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))  # opt capped at max_batch


def test_a_fixed_batch_input_is_skipped_with_the_flag_that_fixes_it(tmp_path: Path) -> None:
    trt = _fake_trt(version=10, input_shape=(1, 3, 8, 8))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x00")
    with pytest.raises(Skipped, match="--dynamic-batch"):
        build_plan(trt, onnx, tmp_path / "m.plan", fp16=True, int8=False, opt=8, max_batch=4)
