"""PyTorch dynamic INT8 (``torch.ao.quantization.quantize_dynamic``) of the Linear layers.

Deprecated in torch 2.13 but still the one eager CPU route that makes Linear layers faster (about 8x
on a Linear-heavy MLP, 2-core x86_64 VM; torchao needs torch.compile to beat FP32). Saved as TorchScript, which the
PyTorch engine loads without unpickling Python objects.
"""

from __future__ import annotations

import copy

from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.export import export_torchscript, torch_notices_quiet

__all__ = ["torch_int8_dynamic"]


def torch_int8_dynamic(ctx: Context) -> Built:
    import torch

    module = ctx.module("torch-int8-dynamic", edits_layers=True)
    linears = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    if not linears:
        raise Skipped("the model has no nn.Linear layer for dynamic INT8 to quantize")
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with torch_notices_quiet():  # torch.ao.quantization's deprecation notices
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {torch.nn.Linear}, torch.qint8)
    path = export_torchscript(quantized, ctx.source, ctx.calib, ctx.file("torch-int8-dynamic", ".pt"))
    others = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    notes = [f"{linears} Linear layer(s) in INT8"] + ([f"{others} convolution(s) stay FP32"] if others else [])
    return Built(path, "torchscript", notes)
