"""PyTorch -> ONNX (dynamic batch axis, one self-contained file) and PyTorch -> TorchScript.

ONNX export uses torch's TorchScript-based exporter (``dynamo=False``): it writes one file with the
weights inside, needs no onnxscript, and takes a tenth of a second on small models. (torch 2.13's
default dynamo exporter writes the weights to a separate ``.data`` file unless told otherwise.) Both
exports are checked against the module's own outputs before they are used.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.runners import onnx_runner, torch_runner
from rapidserve.engines.prepare.source import Source

__all__ = ["ExportMismatch", "export_onnx", "export_torchscript", "torch_notices_quiet"]

OPSET = 17
# torch's notices about the paths taken here on purpose (see above): filtered by category and message,
# so that a warning about the user's model itself (a TracerWarning, say) still reaches them
_NOTICES = (
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, r"The feature will be removed"),  # raised inside the legacy exporter
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # the dynamo exporter, torch 2.13
)


@contextlib.contextmanager
def torch_notices_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _NOTICES:
            warnings.filterwarnings("ignore", message, category)
        yield


class ExportMismatch(RuntimeError):
    """The exported model does not compute what the module computes."""


def export_onnx(module: Any, source: Source, data: Dataset, path: Path) -> Path:
    import torch

    names_in = [t.name for t in source.inputs]
    names_out = [t.name for t in source.outputs]
    if module is source.module and source.program is not None:
        return _export_program(source, data, path, names_in, names_out)
    with torch_notices_quiet():
        torch.onnx.export(
            module,
            source.example(data),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={name: {0: "batch"} for name in (*names_in, *names_out)},
        )
    _check(torch_runner(module), onnx_runner(path), data, "ONNX export")
    return path


def _export_program(source: Source, data: Dataset, path: Path, names_in: list[str], names_out: list[str]) -> Path:
    """A torch.export program (its own dynamic dims) through the dynamo exporter, weights inside the file."""
    import logging

    import torch

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every step, and each missing torchvision operator
    try:
        with torch_notices_quiet():
            torch.onnx.export(
                source.program, f=str(path), dynamo=True, external_data=False, opset_version=18,
                input_names=names_in, output_names=names_out, verbose=False,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)
    _check(torch_runner(source.module), onnx_runner(path), data, "ONNX export")
    return path


def export_torchscript(module: Any, source: Source, data: Dataset, path: Path) -> Path:
    """Traced TorchScript, which the PyTorch engine loads (``model.pt``) without unpickling code."""
    import torch

    with torch_notices_quiet():
        if module is source.module and source.program is not None:
            # a torch.export program's module checks its input shapes with Python booleans, which the
            # tracer warns about; the check below runs the trace at another batch size instead
            warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, source.example(data), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    _check(torch_runner(module), torch_runner(loaded), data, "TorchScript export")
    return path


def _check(reference: Any, exported: Any, data: Dataset, what: str, rows: int = 8) -> None:
    batch = data.rows(rows)  # several rows: a batch axis fixed to the example's size would show here
    for index, (want, got) in enumerate(zip(reference(batch), exported(batch), strict=True)):
        if want.shape != got.shape:
            raise ExportMismatch(f"{what}: output {index} has shape {got.shape}, the model gives {want.shape}")
        scale = max(float(np.abs(want).max()), 1.0)
        error = float(np.abs(want.astype(np.float64) - got).max()) / scale
        if error > 1e-3:
            raise ExportMismatch(f"{what}: output {index} differs from the model's by {error:.2e} (relative)")
