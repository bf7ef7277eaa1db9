"""Build, validate, benchmark and write every variant of a recipe; recommend one; report."""

from __future__ import annotations

import contextlib
import dataclasses
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
from rapidserve.engines.prepare.batching import with_dynamic_batch
from rapidserve.engines.prepare.bench import benchmark
from rapidserve.engines.prepare.context import Built, Context, Skipped
from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.fidelity import DEFAULT_COSINE, DEFAULT_TOP1_POINTS, budget_check, compare
from rapidserve.engines.prepare.progress import Progress, one_line
from rapidserve.engines.prepare.recipe import Recipe
from rapidserve.engines.prepare.report import write_report
from rapidserve.engines.prepare.repository import servable, write_model
from rapidserve.engines.prepare.runners import predict
from rapidserve.engines.prepare.source import Source

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
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the recipe; write the accepted variants as models ``<name>-<variant>`` and the report into
    ``out``. Returns the report (what ``report.json`` holds). Torch's process-wide settings (thread
    count, quantized engine) are as they were when it returns."""
    progress = progress or Progress(enabled=False)
    _prepare_out(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="rapidserve-prepare-") as tmp, _torch_settings_restored():
        source, batching = _batching(source, recipe, val, Path(tmp), progress)
        if source.fixed_batch is not None:
            recipe = dataclasses.replace(recipe, batch_sizes=(source.fixed_batch,))
        original, variants = _run(source, recipe, calib, val, train, out, Path(tmp), progress)
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
        "batching": batching,
        "max_batch_size": 0 if source.fixed_batch is not None else recipe.config_max_batch,
    }
    with progress.step("writing the report", out / "report.md"):
        write_report(report, out)
    return report


def _batching(source: Source, recipe: Recipe, val: Dataset, workdir: Path, progress: Progress) -> tuple[Source, str]:
    """The source to prepare (rewritten to a dynamic batch when asked and safe) and how it batches."""
    if source.fixed_batch is None:
        if recipe.dynamic_batch:
            return source, "the model's batch dimension is already dynamic: --dynamic-batch had nothing to do"
        return source, "dynamic batch dimension"
    fixed = source.fixed_batch
    kept = (
        f"the model fixes its batch dimension at {fixed}: validated and benchmarked {fixed} sample(s) per run, "
        "written with max_batch_size 0 and full dims"
    )
    if not recipe.dynamic_batch:
        return source, f"{kept} (--dynamic-batch rewrites it to a dynamic one)"
    with progress.step("--dynamic-batch: rewriting and checking the batch dimension", source.onnx_path):
        rewritten, note = with_dynamic_batch(source, val, workdir)
    progress.say(note)
    return rewritten, note if rewritten.fixed_batch is None else f"{note}; {kept}"


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
    source: Source,
    recipe: Recipe,
    calib: Dataset,
    val: Dataset,
    train: Dataset | None,
    out: Path,
    workdir: Path,
    progress: Progress,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    threads = recipe.threads
    target = str(recipe.target_batch)
    # validation batches never exceed what an engine was built for
    batch = source.fixed_batch or min(64, recipe.config_max_batch)
    classifier = source.is_classifier(val, recipe)
    with progress.step(f"running the original on {len(val)} validation samples", source.onnx_path):
        reference = predict(source.runner(threads), val, batch)
        original = compare(reference, reference, val.labels, source.scores)
    with progress.step(f"benchmarking the original at batch sizes {list(recipe.batch_sizes)}"):
        original.update(benchmark(lambda: source.runner(threads), val, recipe.batch_sizes, recipe.bench_seconds))
    variants: list[dict[str, Any]] = []
    ctx = Context(source, recipe, calib, val, train, workdir, classifier)
    built: dict[str, Built] = {}
    names = recipe.variants
    for number, name in enumerate(tqdm(names, desc="prepare", unit="variant", disable=progress.lines or None), 1):
        kind, build = STEPS[name]
        entry: dict[str, Any] = {"name": name, "model": "", "kind": kind, "accepted": False, "recommended": False}
        variants.append(entry)
        started = progress.elapsed_s
        progress.say(f"variant {number}/{len(names)} {name}: building, validating, benchmarking")
        try:
            result = build(ctx)
            metrics = compare(reference, predict(result.runner(threads), val, batch), val.labels, source.scores)
            reason = budget_check(metrics, original, recipe, classifier)
            timings = benchmark(lambda r=result: r.runner(threads), val, recipe.batch_sizes, recipe.bench_seconds)
        except Skipped as exc:
            entry.update(status="skipped", reason=str(exc))
            progress.say(f"variant {number}/{len(names)} {name}: skipped: {exc}")
            continue
        except Exception as exc:  # one variant failing leaves the others, and the report, alone
            entry.update(status="failed", reason=one_line(exc))
            log.warning("%s failed: %s", name, one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            progress.say(f"variant {number}/{len(names)} {name}: failed: {one_line(exc)}")
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
        verdict = "accepted" if entry["accepted"] else f"rejected: {reason}"
        progress.say(f"variant {number}/{len(names)} {name}: {verdict} ({progress.elapsed_s - started:.1f}s)")
    accepted = [v for v in variants if v["accepted"]]
    if accepted:
        best = max(accepted, key=lambda v: (v["throughput_per_s"][target], -v["size_bytes"]))
        best["recommended"] = True
    max_batch = 0 if source.fixed_batch is not None else recipe.config_max_batch
    with progress.step("writing the model repository", out):
        for entry in variants:
            wanted = entry["accepted"] or (recipe.keep_rejected and entry["status"] == "built")
            if wanted and servable(entry.get("format", "")):
                entry["model"] = f"{source.name}-{entry['name']}"
                write_model(out, entry["model"], built[entry["name"]], source, max_batch)
    return original, variants
