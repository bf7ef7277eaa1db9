"""Write a variant as a model of a Triton-layout repository that ``rapidserve serve`` loads as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

from rapidserve.common.datatypes import datatype_of
from rapidserve.engines.prepare.context import Built
from rapidserve.engines.prepare.source import Source, TensorInfo

__all__ = ["servable", "write_model"]

_PLATFORM = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "tensorrt": "tensorrt_plan"}
_FILE = {"onnx": "model.onnx", "torchscript": "model.pt", "tensorrt": "model.plan"}
# what `rapidserve serve` has a backend for; a repository holding anything else would never be ready
_SERVABLE = frozenset({"onnx", "torchscript", "tensorrt"})


def servable(format_: str) -> bool:
    return format_ in _SERVABLE


def _tensors(tensors: list[TensorInfo], batch: tuple[int, ...]) -> str:
    entries = []
    for t in tensors:
        datatype = datatype_of(t.dtype)
        config_type = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
        dims = ", ".join(str(d) for d in (*batch, *t.dims))
        entries.append(f'  {{ name: "{t.name}", data_type: {config_type}, dims: [ {dims} ] }}')
    return ",\n".join(entries)


def write_model(repository: Path, model: str, built: Built, source: Source, max_batch_size: int) -> Path:
    """``repository/model/config.pbtxt`` and ``repository/model/1/model.*``; returns the model folder.
    ``max_batch_size`` 0 (a model whose batch size is fixed) writes full dims, the batch included."""
    folder = repository / model
    batch = (source.fixed_batch or 1,) if max_batch_size == 0 else ()
    queue = "dynamic_batching { }\n" if max_batch_size > 0 else ""  # Triton batches only where the model can
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(built.path, folder / "1" / _FILE[built.format])
    (folder / "config.pbtxt").write_text(
        f'name: "{model}"\n'
        f'platform: "{_PLATFORM[built.format]}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{_tensors(source.inputs, batch)}\n]\n"
        f"output [\n{_tensors(source.outputs, batch)}\n]\n"
        f"{queue}"
    )
    return folder
