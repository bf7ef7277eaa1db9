"""Build, validate, benchmark and write every variant of a recipe; recommend one; report."""

from __future__ import annotations

import datetime
import logging
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rapidserve.engines.prepare import distill, lowrank, ort_quant, pruning, steps, tensorrt, torch_quant
from rapidserve.engines.prepare.bench import benchmark
from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.fidelity import DEFAULT_COSINE, DEFAULT_TOP1_POINTS, budget_check, compare
from rapidserve.engines.prepare.recipe import Recipe
from rapidserve.engines.prepare.report import write_report
from rapidserve.engines.prepare.repository import write_model
from rapidserve.engines.prepare.source import Source, predict

__all__ = ["STEPS", "prepare"]

log = logging.getLogger(__name__)

# variant -> (the kind of step, the function that builds it)
STEPS: dict[str, tuple[str, Callable[[Context], Built]]] = {
    "torch-fp32": ("torchscript-export", steps.torch_fp32),
    "onnx-fp32": ("onnx-export", steps.onnx_fp32),
    "ort-int8": ("ort-static-int8", ort_quant.ort_int8_static),
    "ort-int8-dynamic": ("ort-dynamic-int8", ort_quant.ort_int8_dynamic),
    "onnx-fp16": ("onnx-fp16", ort_quant.onnx_fp16),
    "torch-int8-dynamic": ("torch-dynamic-int8", torch_quant.torch_int8_dynamic),
    "pruned": ("structured-pruning", pruning.pruned_structured),
    "pruned-unstructured": ("unstructured-pruning", pruning.pruned_unstructured),
    "distilled": ("distillation", distill.distilled),
    "lowrank": ("low-rank", lowrank.lowrank),
    "tensorrt-fp16": ("tensorrt", tensorrt.tensorrt_fp16),
    "tensorrt-int8": ("tensorrt", tensorrt.tensorrt_int8),
}
REPORT_FILES = ("report.json", "report.md", "report.png")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty: choose a new folder, or --overwrite a previous prepare output")
        if not (out / "report.json").exists():
            raise FileExistsError(f"{out} does not hold a previous prepare output; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _budget(recipe: Recipe, classifier: bool) -> str:
    if recipe.budget_cosine is not None or not classifier:
        return f"mean cosine similarity >= {recipe.budget_cosine or DEFAULT_COSINE}"
    points = DEFAULT_TOP1_POINTS if recipe.budget_top1 is None else recipe.budget_top1
    return f"at most {points:g} point(s) of top-1 lost"


def prepare(
    source: Source,
    recipe: Recipe,
    *,
    calib: Dataset,
    val: Dataset,
    train: Dataset | None,
    out: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the recipe; write the accepted variants as models ``<name>-<variant>`` and the report into
    ``out``. Returns the report (what ``report.json`` holds)."""
    _prepare_out(out, overwrite)
    sizes = [str(b) for b in recipe.batch_sizes]
    threads = recipe.threads
    target = str(recipe.target_batch)
    classifier = source.is_classifier(val)
    reference = predict(source.runner(recipe.threads), val)
    original = compare(reference, reference, val.labels, source.scores)
    original.update(benchmark(lambda: source.runner(recipe.threads), val, recipe.batch_sizes, recipe.bench_seconds))
    variants: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rapidserve-prepare-") as tmp:
        ctx = Context(source, recipe, calib, val, train, Path(tmp), classifier)
        built: dict[str, Built] = {}
        for name in tqdm(recipe.variants, desc="prepare", unit="variant", disable=None):
            kind, build = STEPS[name]
            entry: dict[str, Any] = {"name": name, "model": "", "kind": kind, "accepted": False, "recommended": False}
            variants.append(entry)
            try:
                result = build(ctx)
            except Skipped as exc:
                entry.update(status="skipped", reason=str(exc))
                log.info("%s skipped: %s", name, exc)
                continue
            except Exception as exc:
                entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                log.warning("%s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            built[name] = result
            metrics = compare(reference, predict(result.runner(threads), val), val.labels, source.scores)
            reason = budget_check(metrics, original, recipe, classifier)
            entry.update(status="built", format=result.format, notes=result.notes, accepted=not reason, **metrics)
            if reason:
                entry["reason"] = reason
            entry["size_bytes"] = result.path.stat().st_size
            entry.update(benchmark(lambda r=result: r.runner(threads), val, recipe.batch_sizes, recipe.bench_seconds))
            entry["speedup"] = round(entry["throughput_per_s"][target] / original["throughput_per_s"][target], 3)
        accepted = [v for v in variants if v["accepted"]]
        if accepted:
            best = max(accepted, key=lambda v: (v["throughput_per_s"][target], -v["size_bytes"]))
            best["recommended"] = True
        for entry in variants:
            if entry["status"] == "built" and (entry["accepted"] or recipe.keep_rejected):
                entry["model"] = f"{source.name}-{entry['name']}"
                write_model(out, entry["model"], built[entry["name"]], source, recipe.config_max_batch)
    report = {
        "model": source.name,
        "source": "pytorch" if source.module is not None else "onnx",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} Python {platform.python_version()}".strip(),
        "threads": recipe.threads,
        "batch_sizes": [int(b) for b in sizes],
        "target_batch": recipe.target_batch,
        "task": "classify" if classifier else "regress",
        "budget": _budget(recipe, classifier),
        "validation_samples": len(val),
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "extra"},
        "inputs": [{"name": t.name, "dtype": str(t.dtype), "dims": list(t.dims)} for t in source.inputs],
        "outputs": [{"name": t.name, "dtype": str(t.dtype), "dims": list(t.dims)} for t in source.outputs],
        "original": original,
        "recommended": next((v["model"] for v in variants if v["recommended"]), ""),
        "variants": variants,
    }
    write_report(report, out)
    return report
