"""Low-rank factorization: each Linear layer W (out x in) becomes two, of rank r, from its truncated
SVD, where that has fewer parameters (r * (in + out) < in * out); fine-tuned when there is training
data."""

from __future__ import annotations

import copy
from typing import Any

from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.export import export_onnx
from rapidserve.engines.prepare.training import fine_tune

__all__ = ["factorize", "lowrank"]


def factorize(module: Any, ratio: float) -> int:
    """Replace the Linear layers in place; returns how many were replaced."""
    import torch

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            n_in, n_out = child.in_features, child.out_features
            rank = max(1, int(ratio * min(n_in, n_out)))
            if rank * (n_in + n_out) >= n_in * n_out:
                continue
            u, s, vh = torch.linalg.svd(child.weight.detach(), full_matrices=False)
            root = s[:rank].sqrt()
            first = torch.nn.Linear(n_in, rank, bias=False)
            second = torch.nn.Linear(rank, n_out, bias=child.bias is not None)
            with torch.no_grad():
                first.weight.copy_(root[:, None] * vh[:rank])
                second.weight.copy_(u[:, :rank] * root)
                if child.bias is not None:
                    second.bias.copy_(child.bias)
            setattr(parent, name, torch.nn.Sequential(first, second))
            replaced += 1
    return replaced


def lowrank(ctx: Context) -> Built:
    model = copy.deepcopy(ctx.module("lowrank", edits_layers=True))
    replaced = factorize(model, ctx.recipe.lowrank_ratio)
    if not replaced:
        raise Skipped(f"no Linear layer gets smaller at rank ratio {ctx.recipe.lowrank_ratio}")
    notes = [f"{replaced} Linear layer(s) factorized at rank ratio {ctx.recipe.lowrank_ratio}"]
    if ctx.train is not None and ctx.recipe.finetune_epochs:
        fine_tune(ctx, model, "lowrank", ctx.train)
        notes.append(f"fine-tuned {ctx.recipe.finetune_epochs} epochs")
    return Built(export_onnx(model, ctx.source, ctx.calib, ctx.file("lowrank", ".onnx")), "onnx", notes)
