"""ModelStatistics answers, built from each loaded version's statistics (Triton's message)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rapidserve import protos
from rapidserve.server.stats import Duration

if TYPE_CHECKING:
    from rapidserve.server.manager import ModelManager
    from rapidserve.server.model import ModelVersion

__all__ = ["model_statistics"]


def model_statistics(manager: ModelManager, name: str, version: str) -> Any:
    """ModelStatistics of one version, every version of a model, or (``name`` empty) every model."""
    if name:
        versions = [manager.get(name, version)] if version else [v for v in manager.loaded() if v.name == name]
        if not versions:
            raise manager.unknown(name)
    else:
        versions = manager.loaded()
    return protos.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])


def _duration(target: Any, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def _statistics(version: ModelVersion) -> Any:
    stats = version.stats
    message = protos.ModelStatistics(
        name=version.name,
        version=str(version.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    inference = message.inference_stats
    for name in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _duration(getattr(inference, name), getattr(stats, name))
    for size, batch in sorted(stats.batches.items()):
        entry = message.batch_stats.add(batch_size=size)
        for name in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(entry, name), getattr(batch, name))
    return message
