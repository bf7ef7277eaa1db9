"""How close a variant stays to the original, and whether that is within the recipe's budget.

Always: cosine similarity of the first output per sample, and the largest absolute error over all
outputs. Where the first output can be class scores: top-1 agreement with the original, and with
labels, top-1 accuracy. The budget is in top-1 points for classifiers, in cosine similarity otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Array
from rapidserve.engines.prepare.recipe import Recipe

__all__ = ["budget_check", "compare"]

DEFAULT_TOP1_POINTS = 1.0
DEFAULT_COSINE = 0.99


def compare(reference: list[Array], outputs: list[Array], labels: Array | None, scores: bool) -> dict[str, Any]:
    ref = reference[0].reshape(len(reference[0]), -1).astype(np.float64)
    out = outputs[0].reshape(len(outputs[0]), -1).astype(np.float64)
    finite = all(bool(np.isfinite(o.astype(np.float64)).all()) for o in outputs if o.dtype.kind in "fc")
    if ref.shape[1] <= 1:  # one value per sample: the cosine of each is only its sign, so compare whole columns
        ref, out = ref.T, out.T
    cosine = _cosines(ref, out) if finite else np.zeros(1)
    scale = max(float(np.abs(ref).max()), 1e-12)
    metrics: dict[str, Any] = {
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "max_abs_err": _max_abs_err(reference, outputs) if finite else None,
        "max_rel_err": round(float(np.abs(ref - out).max()) / scale, 6) if finite else None,
        "finite": finite,
    }
    if scores:
        predicted = out.argmax(axis=1)
        metrics["agreement"] = round(100 * float((predicted == ref.argmax(axis=1)).mean()), 3)
        if labels is not None:
            metrics["top1"] = round(100 * float((predicted == labels.reshape(-1)).mean()), 3)
    return metrics


def _cosines(ref: Array, out: Array) -> Array:
    """Per row; 1 where both rows are zero, 0 where only one is."""
    norm_ref, norm_out = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    both_zero = (norm_ref == 0) & (norm_out == 0)
    product = norm_ref * norm_out
    cosine = np.divide((ref * out).sum(axis=1), product, out=np.zeros(len(ref)), where=product > 0)
    return np.where(both_zero, 1.0, cosine)


def _max_abs_err(reference: list[Array], outputs: list[Array]) -> float:
    return float(max(np.abs(r.astype(np.float64) - o).max() for r, o in zip(reference, outputs, strict=True)))


def budget_check(metrics: dict[str, Any], original: dict[str, Any], recipe: Recipe, classifier: bool) -> str:
    """The reason the variant is over budget; empty when it is within."""
    if not metrics.get("finite", True):
        return "its outputs contain NaN or infinity"
    if recipe.budget_cosine is not None or not classifier:
        floor = DEFAULT_COSINE if recipe.budget_cosine is None else recipe.budget_cosine
        if metrics["cosine_mean"] < floor:
            return f"mean cosine similarity {metrics['cosine_mean']:.4f} is under the budget's {floor}"
        return ""
    points = DEFAULT_TOP1_POINTS if recipe.budget_top1 is None else recipe.budget_top1
    if "top1" in metrics and "top1" in original:
        lost = original["top1"] - metrics["top1"]
        if lost > points + 1e-9:
            return f"top-1 {metrics['top1']:.2f}% is {lost:.2f} points under the original's {original['top1']:.2f}%"
        return ""
    disagree = 100 - metrics["agreement"]
    if disagree > points + 1e-9:
        return f"top-1 disagrees with the original on {disagree:.2f}% of the samples (budget {points} points)"
    return ""
