"""ONNX files with a fixed batch dimension (model-zoo files often take ``[1, 3, 224, 224]``): either
prepare them at the batch size they admit, or (``--dynamic-batch``) rewrite that dimension to a
symbolic one, check the rewritten model against the original, and prepare it as a batching model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Array, Dataset
from rapidserve.engines.prepare.progress import one_line
from rapidserve.engines.prepare.runners import onnx_runner, predict
from rapidserve.engines.prepare.source import Source

__all__ = ["CHECK_BATCH", "hard_coded_batch", "make_dynamic", "with_dynamic_batch"]

CHECK_BATCH = 8  # the rewritten model must give the original's answers on batches this large
_TOLERANCE = 1e-4  # relative to the output's scale: batched kernels may sum in another order


def hard_coded_batch(model: Any, batch: int) -> str:
    """The first Reshape whose constant target shape starts with the fixed batch size (it would fold
    a larger batch into one row), described; empty when there is none."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants:
            shape = numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
            if shape and shape[0] == batch:
                return f"its Reshape node '{node.name or node.output[0]}' hard-codes the batch in its shape {shape}"
    return ""


def make_dynamic(source: Path, target: Path) -> Path:
    """``source`` with the first dimension of every graph input and output made symbolic (``batch``)."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    for value in (*(i for i in graph.input if i.name not in initializers), *graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del graph.value_info[:]  # shapes inferred at the fixed batch; ONNX Runtime infers them again
    onnx.save(model, str(target))
    return target


def _difference(want: list[Array], got: list[Array]) -> str:
    for index, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            return f"its output {index} has shape {list(b.shape)} where the original gives {list(a.shape)}"
        scale = max(float(np.abs(a).max()) if a.size else 0.0, 1.0)
        error = float(np.abs(a.astype(np.float64) - b).max()) / scale if a.size else 0.0
        if error > _TOLERANCE:
            return f"its output {index} differs from the original's by {error:.2e} (relative)"
    return ""


def with_dynamic_batch(source: Source, val: Dataset, workdir: Path) -> tuple[Source, str]:
    """The source rewritten to a dynamic batch when that is safe, and a sentence saying what was done
    (or why not: then the source is returned as it was)."""
    import onnx

    assert source.onnx_path is not None and source.fixed_batch is not None
    fixed = source.fixed_batch
    reason = hard_coded_batch(onnx.load(str(source.onnx_path), load_external_data=False), fixed)
    if reason:
        return source, f"--dynamic-batch not applied: {reason}"
    rewritten = make_dynamic(source.onnx_path, workdir / "dynamic-batch.onnx")
    check = val if len(val) >= CHECK_BATCH else Dataset(val.rows(CHECK_BATCH))
    try:
        want = predict(onnx_runner(source.onnx_path), check, fixed)
        got = predict(onnx_runner(rewritten, log_severity=4), check, CHECK_BATCH)
        difference = _difference(want, got)
    except Exception as exc:  # ONNX Runtime refusing the rewritten graph is an answer, not a crash
        difference = f"ONNX Runtime cannot run it at batch {CHECK_BATCH}: {one_line(exc)}"
    if difference:
        failed = "the rewritten model failed the check against the original"
        return source, f"--dynamic-batch not applied: {failed}: {difference}"
    note = (
        f"--dynamic-batch: the model's batch dimension (fixed at {fixed}) was rewritten to a dynamic one, "
        f"which gave the original's outputs on {len(check)} validation samples in batches of {CHECK_BATCH}"
    )
    return dataclasses.replace(source, onnx_path=rewritten, fixed_batch=None), note
