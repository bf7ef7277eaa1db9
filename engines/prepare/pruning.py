"""Pruning: structured (``pruned``: Torch-Pruning removes whole channels, so the model gets smaller
and faster, then a short fine-tune recovers its accuracy) and unstructured (``pruned-unstructured``:
the smallest weights are zeroed; dense kernels compute the zeros anyway, so it is no faster and no
smaller, which the report says).

The layer that produces the model's output (the last Linear, or the last convolution when there is
no Linear) keeps its width, so the outputs keep their shape.
"""

from __future__ import annotations

import copy
from typing import Any

from rapidserve.engines.prepare.context import Built, Context
from rapidserve.engines.prepare.export import export_onnx
from rapidserve.engines.prepare.training import fine_tune

__all__ = ["pruned_structured", "pruned_unstructured"]


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _output_layer(module: Any) -> Any:
    import torch

    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    layers = layers or [m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return layers[-1] if layers else None


def pruned_structured(ctx: Context) -> Built:
    import torch_pruning as tp

    original = ctx.module("pruned", edits_layers=True)
    ctx.training_data("pruned")  # skipped before any work when there is nothing to fine-tune on
    model = copy.deepcopy(original)
    head = _output_layer(model)
    pruner = tp.pruner.MetaPruner(
        model,
        ctx.source.example(ctx.calib),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ctx.recipe.prune_ratio,
        ignored_layers=[head] if head is not None else [],
    )
    pruner.step()
    model = fine_tune(ctx, model, "pruned", ctx.training_data("pruned"))
    path = export_onnx(model, ctx.source, ctx.calib, ctx.file("pruned", ".onnx"))
    before, after = _parameters(original), _parameters(model)
    return Built(
        path,
        "onnx",
        [
            f"{ctx.recipe.prune_ratio:.0%} of channels removed: {before:,} -> {after:,} parameters",
            f"fine-tuned {ctx.recipe.finetune_epochs} epochs",
        ],
    )


def pruned_unstructured(ctx: Context) -> Built:
    import torch
    from torch.nn.utils import prune

    ctx.module("pruned-unstructured", edits_layers=True)
    ctx.training_data("pruned-unstructured")
    model = copy.deepcopy(ctx.source.module)
    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, kinds)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ctx.recipe.prune_ratio)
    model = fine_tune(ctx, model, "pruned-unstructured", ctx.training_data("pruned-unstructured"))  # masks hold zeros
    for module, name in targets:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    path = export_onnx(model, ctx.source, ctx.calib, ctx.file("pruned-unstructured", ".onnx"))
    return Built(
        path,
        "onnx",
        [
            f"{zeros / total:.0%} of weights are zero, shapes unchanged: dense kernels are no faster and the "
            "file is no smaller",
            f"fine-tuned {ctx.recipe.finetune_epochs} epochs",
        ],
    )
