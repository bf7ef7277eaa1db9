"""TensorRT engines (``model.plan``) from the ONNX variants: FP16 from the FP32 ONNX, INT8 from the
static QDQ ONNX (explicit quantization), with one optimization profile over the batch dimension
(min 1, opt the recipe's largest batch size, max the config's max_batch_size).

Works with TensorRT 10 and 11. TensorRT 11 dropped the weak-typing precision flags (``BuilderFlag.FP16``/
``INT8``): every network is strongly typed, so precision comes from the ONNX itself. There the FP16 engine
is built from the ``onnx-fp16`` variant (FP16 weights and compute, FP32 I/O) and the INT8 engine from the
QDQ ONNX as before. Without TensorRT or a CUDA device the step reports itself
skipped and says which is missing. A plan only runs on the GPU model and TensorRT version that built
it. Validation and benchmarks run the plan with the server's own TensorRT engine (``runners.plan_runner``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.ort_quant import onnx_fp16, ort_int8_static

__all__ = ["build_plan", "tensorrt_fp16", "tensorrt_int8", "weakly_typed"]


def _require() -> Any:
    """The tensorrt module, or Skipped saying what this machine lacks: a CUDA device, or TensorRT itself."""
    import torch

    if not torch.cuda.is_available():
        raise Skipped("TensorRT needs a CUDA device, and torch sees none on this machine")
    if importlib.util.find_spec("tensorrt") is None:
        raise Skipped("TensorRT is not installed (pip install tensorrt, or see NVIDIA's TensorRT install guide)")
    import tensorrt

    return tensorrt


def build_plan(trt: Any, onnx_path: Path, target: Path, *, fp16: bool, int8: bool, opt: int, max_batch: int) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch dimension
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if weakly_typed(trt):  # TensorRT 10: the flags allow lower precision; 11: the ONNX's types decide
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes carry the scales: no calibrator
    profile = builder.create_optimization_profile()
    opt = min(opt, max_batch)
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if tuple(tensor.shape)[:1] != (-1,):
            raise Skipped(f"input '{tensor.name}' has a fixed batch dimension: rerun with --dynamic-batch")
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise Skipped(f"input '{tensor.name}' has dynamic dimensions beyond the batch: one profile cannot cover it")
        profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    target.write_bytes(bytes(plan))
    return target


def weakly_typed(trt: Any) -> bool:
    """Whether this TensorRT still has the precision flags (10.x); 11.x builds every network strongly typed."""
    return hasattr(trt.BuilderFlag, "FP16")


def tensorrt_fp16(ctx: Context) -> Built:
    trt = _require()
    source = ctx.onnx_fp32() if weakly_typed(trt) else _fp16_onnx(ctx)
    path = build_plan(trt, source, ctx.file("tensorrt-fp16", ".plan"), fp16=True, int8=False,
                      opt=ctx.recipe.target_batch, max_batch=ctx.recipe.config_max_batch)  # fmt: skip
    return Built(path, "tensorrt", [f"TensorRT {trt.__version__}, built for this GPU only"])


def tensorrt_int8(ctx: Context) -> Built:
    trt = _require()
    qdq = ctx.file("ort-int8", ".onnx")
    if not qdq.exists():
        qdq = ort_int8_static(ctx).path
    path = build_plan(trt, qdq, ctx.file("tensorrt-int8", ".plan"), fp16=True, int8=True,
                      opt=ctx.recipe.target_batch, max_batch=ctx.recipe.config_max_batch)  # fmt: skip
    return Built(path, "tensorrt", [f"TensorRT {trt.__version__}, INT8 from the QDQ ONNX, built for this GPU only"])


def _fp16_onnx(ctx: Context) -> Path:
    """The ONNX with FP16 weights and compute: what a strongly typed TensorRT builds an FP16 engine from."""
    half = ctx.file("onnx-fp16", ".onnx")
    return half if half.exists() else onnx_fp16(ctx).path
