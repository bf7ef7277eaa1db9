"""ONNX Runtime's own tools on the FP32 ONNX: static INT8 (QDQ), dynamic INT8, and FP16.

Static INT8 uses U8 activations with per-channel S8 weights: ONNX Runtime 1.32 defaults to S8
activations, which on x86 CPUs runs barely faster than FP32. Dynamic INT8 quantizes MatMul and Gemm
only: quantized convolutions (ConvInteger) run several times slower than FP32 on CPU. ORT's tools
write temporary files into the working directory, so they run inside a temporary one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.data import Dataset

__all__ = ["onnx_fp16", "ort_int8_dynamic", "ort_int8_static"]

_QDQ_OPSET = 13


@contextlib.contextmanager
def _in_temp_dir() -> Iterator[Path]:
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="rapidserve-ortq-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(previous)


class _Calibration:
    """ORT's CalibrationDataReader protocol over our dataset, 32 rows at a time, or as many as a model
    with a fixed batch dimension takes (a last, shorter batch is left out)."""

    def __init__(self, data: Dataset, fixed_batch: int | None) -> None:
        size = fixed_batch or 32
        batches = [b for b in data.batches(size) if fixed_batch is None or len(next(iter(b.values()))) == size]
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._batches, None)


def _preprocessed(source: Path, tmp: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimization); the input as it is
    when that fails (symbolic shape inference does not cover every model)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "preprocessed.onnx"
    try:
        quant_pre_process(str(source), str(out))
    except Exception:
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
        except Exception:
            return source
    return out


def _opset_for_qdq(source: Path, tmp: Path) -> tuple[Path, str]:
    """The model at an opset where per-channel QDQ is valid (DequantizeLinear's ``axis`` came in 13);
    older model-zoo files (opset 9) are converted with ONNX's version converter first."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _QDQ_OPSET)
    if opset >= _QDQ_OPSET:
        return source, ""
    target = tmp / "upgraded.onnx"
    onnx.save(version_converter.convert_version(model, _QDQ_OPSET), str(target))
    return target, f"opset {opset} converted to {_QDQ_OPSET} first"


def ort_int8_static(ctx: Context) -> Built:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[ctx.recipe.calibration]
    target = ctx.file("ort-int8", ".onnx")
    calib = ctx.calib.sample(ctx.recipe.calibration_samples, ctx.recipe.seed)
    with _in_temp_dir() as tmp, _quiet():
        upgraded, converted = _opset_for_qdq(ctx.onnx_fp32(), tmp)
        quantize_static(
            str(_preprocessed(upgraded, tmp)),
            str(target),
            _Calibration(calib, ctx.source.fixed_batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
        )
    notes = [f"{ctx.recipe.calibration} calibration on {len(calib)} samples, U8S8 per-channel"]
    return Built(target, "onnx", notes + ([converted] if converted else []))


def ort_int8_dynamic(ctx: Context) -> Built:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = ctx.onnx_fp32()
    ops = {n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node}
    if not ops & {"MatMul", "Gemm"}:
        raise Skipped("the model has no MatMul or Gemm for dynamic INT8 to quantize")
    target = ctx.file("ort-int8-dynamic", ".onnx")
    with _in_temp_dir() as tmp, _quiet():
        quantize_dynamic(
            str(_preprocessed(source, tmp)),
            str(target),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    notes = ["MatMul/Gemm only"]
    if "Conv" in ops:
        notes.append("convolutions left in FP32 (ConvInteger is slow on CPU)")
    return Built(target, "onnx", notes)


def onnx_fp16(ctx: Context) -> Built:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(ctx.onnx_fp32()))
    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=True)
    target = ctx.file("onnx-fp16", ".onnx")
    onnx.save(half, str(target))
    return Built(target, "onnx", ["for GPU providers: ONNX Runtime's CPU provider computes it in FP32, no faster"])


class _FromOrtQuantization(logging.Filter):
    """Drops the root logger's records that come from ONNX Runtime's quantization tools (they log
    through ``logging.warning`` itself: advice on pre-processing, opsets, each tensor left alone)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and f"{os.sep}onnxruntime{os.sep}" in record.pathname)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization and FP16 tools, without their notices: warnings filtered by category
    and module (their deprecation notices, FP16's "value truncated"), their own loggers at ERROR, and
    their records to the root logger dropped. Anything else still reaches the user."""
    import warnings

    ours = logging.getLogger("onnxruntime")
    level, dropped = ours.level, _FromOrtQuantization()
    root = logging.getLogger()
    ours.setLevel(logging.ERROR)
    root.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"onnxruntime\.")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"onnxruntime\.transformers\.float16")
            yield
    finally:
        root.removeFilter(dropped)
        ours.setLevel(level)
