"""What to build: the variants, the accuracy budget and the batch sizes, from flags or a YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CPU_VARIANTS", "VARIANTS", "Recipe", "load_recipe"]

# name -> what it is (the report's "kind" column says which step built it)
VARIANTS = {
    "torch-fp32": "the original PyTorch model, as TorchScript (the baseline)",
    "onnx-fp32": "ONNX export with a dynamic batch axis, one self-contained file",
    "ort-int8": "ONNX Runtime static INT8: QDQ, U8 activations, per-channel S8 weights, calibrated",
    "ort-int8-dynamic": "ONNX Runtime dynamic INT8 (per-channel weights): for Linear-heavy models",
    "onnx-fp16": "ONNX with FP16 weights and compute, FP32 inputs and outputs (for GPU providers)",
    "torch-int8-dynamic": "PyTorch dynamic INT8 of the Linear layers (quantize_dynamic), as TorchScript",
    "pruned": "structured pruning with Torch-Pruning (channels removed), fine-tuned, exported to ONNX",
    "pruned-unstructured": "magnitude pruning (weights zeroed, shapes unchanged), exported to ONNX",
    "distilled": "a smaller student trained on the original's soft targets, exported to ONNX",
    "lowrank": "Linear layers factorized by truncated SVD, exported to ONNX",
    "tensorrt-fp16": "TensorRT engine from the ONNX, FP16, one optimization profile over the batch",
    "tensorrt-int8": "TensorRT engine from the INT8 QDQ ONNX",
}
# what --demo builds: every step that runs on a CPU, plus TensorRT (reported as skipped without it)
CPU_VARIANTS = (
    "torch-fp32", "onnx-fp32", "ort-int8", "ort-int8-dynamic", "onnx-fp16", "torch-int8-dynamic",
    "pruned", "pruned-unstructured", "distilled", "lowrank",
)  # fmt: skip
DEFAULT_VARIANTS = (*CPU_VARIANTS, "tensorrt-fp16", "tensorrt-int8")


@dataclass(frozen=True)
class Recipe:
    name: str
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    budget_top1: float | None = None  # at most this many points of top-1 lost (default 1.0 for classifiers)
    budget_cosine: float | None = None  # mean cosine similarity to the original at least this (default 0.99)
    batch_sizes: tuple[int, ...] = (1, 32)  # benchmarked; the largest decides the recommendation
    calibration: str = "minmax"  # minmax | entropy | percentile
    calibration_samples: int = 256
    prune_ratio: float = 0.5
    finetune_epochs: int = 5
    distill_epochs: int = 20
    distill_temperature: float = 4.0
    distill_alpha: float = 0.7  # weight of the soft-target loss; the rest goes to hard labels
    student: str = ""  # pkg.module:factory of the distillation student ("" in the demo: its own)
    lowrank_ratio: float = 0.5  # rank kept, as a fraction of each Linear layer's full rank
    keep_rejected: bool = False  # also write variants that miss the budget
    bench_seconds: float = 1.0  # per measurement
    threads: int = 1  # intra-op threads while benchmarking, for every variant alike
    max_batch_size: int = 0  # in the written configs; 0: max(32, the largest batch size)
    dynamic_batch: bool = False  # rewrite an ONNX file's fixed batch dimension to a dynamic one (checked)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if self.budget_top1 is not None and self.budget_cosine is not None:
            raise ValueError("give one accuracy budget: --budget-top1 or --budget-cosine")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {list(self.batch_sizes)}")
        if self.calibration not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"calibration must be minmax, entropy or percentile, not {self.calibration!r}")

    @property
    def target_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def config_max_batch(self) -> int:
        return self.max_batch_size or max(32, self.target_batch)


def load_recipe(path: Path, **overrides: Any) -> Recipe:
    """A recipe from YAML (keys as in ``Recipe``; ``variants`` a list); flags given on the command line
    (``overrides`` that are not None) win."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("variants", "batch_sizes"):
        if key in data:
            data[key] = tuple(data[key])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe(**data)
