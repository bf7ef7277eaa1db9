"""What every step gets (the model, the data, the recipe, a work folder) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.export import export_onnx
from rapidserve.engines.prepare.recipe import Recipe
from rapidserve.engines.prepare.runners import Runner, load_torchscript, onnx_runner, plan_runner, torch_runner
from rapidserve.engines.prepare.source import Source

__all__ = ["Built", "Context", "Skipped"]


class Skipped(Exception):
    """The step cannot run here (missing library, GPU or data); the message says why."""


@dataclass
class Built:
    path: Path  # the model file: model.onnx, model.pt (TorchScript) or model.plan
    format: str  # onnx | torchscript | tensorrt
    notes: list[str] = field(default_factory=list)

    def runner(self, threads: int = 1) -> Runner:
        if self.format == "onnx":
            return onnx_runner(self.path, threads)
        if self.format == "torchscript":
            return torch_runner(load_torchscript(self.path), threads)
        return plan_runner(self.path)


@dataclass
class Context:
    source: Source
    recipe: Recipe
    calib: Dataset
    val: Dataset
    train: Dataset | None
    workdir: Path
    classifier: bool = False  # top-1 is the measure (Source.is_classifier)
    _onnx: Path | None = None

    def file(self, variant: str, suffix: str) -> Path:
        folder = self.workdir / variant
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"model{suffix}"

    def module(self, variant: str, *, edits_layers: bool = False) -> Any:
        """The original nn.Module. ``edits_layers``: the step rewrites its layers, which needs the
        Python module itself, not a torch.export program's graph."""
        if self.source.module is None:
            raise Skipped(f"{variant} needs a PyTorch model (--model or a .pt2 --model-file), not an ONNX file")
        if edits_layers and self.source.program is not None:
            raise Skipped(f"{variant} rewrites the model's layers: it needs --model pkg.module:factory, not a .pt2")
        return self.source.module

    def training_data(self, variant: str) -> Dataset:
        if self.train is None:
            raise Skipped(f"{variant} fine-tunes, so it needs training data (--train train.npz)")
        return self.train

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX model that the ONNX-based steps start from (exported once)."""
        if self._onnx is None:
            if self.source.onnx_path is not None:
                self._onnx = self.source.onnx_path
            else:
                self._onnx = export_onnx(self.source.module, self.source, self.calib, self.file("onnx-fp32", ".onnx"))
        return self._onnx
