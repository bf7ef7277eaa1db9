"""The ONNX and TorchScript exports of the original: ``onnx-fp32`` and ``torch-fp32``."""

from __future__ import annotations

from rapidserve.engines.prepare.context import Built, Context
from rapidserve.engines.prepare.export import export_torchscript

__all__ = ["onnx_fp32", "torch_fp32"]


def onnx_fp32(ctx: Context) -> Built:
    return Built(ctx.onnx_fp32(), "onnx", ["checked against the PyTorch outputs"] if ctx.source.module else [])


def torch_fp32(ctx: Context) -> Built:
    module = ctx.module("torch-fp32")
    return Built(export_torchscript(module, ctx.source, ctx.calib, ctx.file("torch-fp32", ".pt")), "torchscript")
