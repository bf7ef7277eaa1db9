"""Build, validate, benchmark and write every variant of a recipe; recommend one; report."""

from __future__ import annotations

import contextlib
import datetime
import logging
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
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
from rapidserve.engines.prepare.repository import servable, write_model
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
        floor = DEFAULT_COSINE if recipe.budget_cosine is None else recipe.budget_cosine
        return f"mean cosine similarity >= {floor}"
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
    ``out``. Returns the report (what ``report.json`` holds). Torch's process-wide settings (thread
    count, quantized engine) are as they were when it returns."""
    _prepare_out(out, overwrite)
    with _torch_settings_restored():
        original, variants = _run(source, recipe, calib, val, train, out)
    classifier = source.is_classifier(val, recipe)
    report = {
        "model": source.name,
        "source": "pytorch" if source.module is not None else "onnx",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} Python {platform.python_version()}".strip(),
        "threads": recipe.threads,
        "batch_sizes": list(recipe.batch_sizes),
        "target_batch": recipe.target_batch,
        "task": "classify" if classifier else "regress",
        "budget": _budget(recipe, classifier),
        "validation_samples": len(val),
        "calibration": "the validation data (give --calib or --train to keep them apart)" if calib is val else "",
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "extra"},
        "inputs": [{"name": t.name, "dtype": str(t.dtype), "dims": list(t.dims)} for t in source.inputs],
        "outputs": [{"name": t.name, "dtype": str(t.dtype), "dims": list(t.dims)} for t in source.outputs],
        "original": original,
        "recommended": next((v["model"] for v in variants if v["recommended"]), ""),
        "variants": variants,
    }
    write_report(report, out)
    return report


@contextlib.contextmanager
def _torch_settings_restored() -> Iterator[None]:
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    engine = torch.backends.quantized.engine if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads or torch.get_num_threads())
            if engine is not None:
                torch.backends.quantized.engine = engine


def _run(
    source: Source, recipe: Recipe, calib: Dataset, val: Dataset, train: Dataset | None, out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    threads = recipe.threads
    target = str(recipe.target_batch)
    batch = min(64, recipe.config_max_batch)  # validation batches never exceed what an engine was built for
    classifier = source.is_classifier(val, recipe)
    reference = predict(source.runner(threads), val, batch)
    original = compare(reference, reference, val.labels, source.scores)
    original.update(benchmark(lambda: source.runner(threads), val, recipe.batch_sizes, recipe.bench_seconds))
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
                metrics = compare(reference, predict(result.runner(threads), val, batch), val.labels, source.scores)
                reason = budget_check(metrics, original, recipe, classifier)
                timings = benchmark(lambda r=result: r.runner(threads), val, recipe.batch_sizes, recipe.bench_seconds)
            except Skipped as exc:
                entry.update(status="skipped", reason=str(exc))
                log.info("%s skipped: %s", name, exc)
                continue
            except Exception as exc:  # one variant failing leaves the others, and the report, alone
                entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                log.warning("%s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            built[name] = result
            entry.update(status="built", format=result.format, notes=list(result.notes), **metrics, **timings)
            entry["size_bytes"] = result.path.stat().st_size
            entry["speedup"] = round(timings["throughput_per_s"][target] / original["throughput_per_s"][target], 3)
            if not servable(result.format):
                reason = reason or f"rapidserve serve has no backend for {result.format} yet, so it is not written"
            entry["accepted"] = not reason
            if reason:
                entry["reason"] = reason
        accepted = [v for v in variants if v["accepted"]]
        if accepted:
            best = max(accepted, key=lambda v: (v["throughput_per_s"][target], -v["size_bytes"]))
            best["recommended"] = True
        for entry in variants:
            wanted = entry["accepted"] or (recipe.keep_rejected and entry["status"] == "built")
            if wanted and servable(entry.get("format", "")):
                entry["model"] = f"{source.name}-{entry['name']}"
                write_model(out, entry["model"], built[entry["name"]], source, recipe.config_max_batch)
    return original, variants
