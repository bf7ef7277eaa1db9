"""Knowledge distillation: train a smaller student on the original's soft targets (softmax at a
temperature), mixed with the hard labels when there are labels; MSE to the original's outputs for
models that are not classifiers."""

from __future__ import annotations

from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.export import export_onnx
from rapidserve.engines.prepare.source import import_factory
from rapidserve.engines.prepare.training import train

__all__ = ["distilled"]


def distilled(ctx: Context) -> Built:
    teacher = ctx.module("distilled")
    if not ctx.recipe.student:
        raise Skipped("distillation needs a student architecture: --student pkg.module:factory (or in the recipe)")
    data = ctx.training_data("distilled")
    import torch

    torch.manual_seed(ctx.recipe.seed)
    student = import_factory(ctx.recipe.student)()
    recipe = ctx.recipe
    train(
        student,
        data,
        epochs=recipe.distill_epochs,
        teacher=teacher,
        temperature=recipe.distill_temperature,
        alpha=recipe.distill_alpha if data.labels is not None else 1.0,
        classifier=ctx.classifier,
        seed=recipe.seed,
        desc="distilled: train student",
    )
    path = export_onnx(student, ctx.source, ctx.calib, ctx.file("distilled", ".onnx"))
    size = sum(p.numel() for p in student.parameters())
    original = sum(p.numel() for p in teacher.parameters())
    return Built(
        path,
        "onnx",
        [
            f"student {recipe.student}: {size:,} parameters (original {original:,})",
            f"{recipe.distill_epochs} epochs, T={recipe.distill_temperature:g}, alpha={recipe.distill_alpha:g}",
        ],
    )
