"""The Engine protocol every backend implements, and the specs engines describe themselves with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Engine", "EngineInputError", "EngineOptions", "TensorSpec", "missing_extra"]


class EngineInputError(ValueError):
    """Raised by ``Engine.infer`` when the request's data is what cannot be run (not the engine)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor: v2 datatype (e.g. ``"FP32"``) and shape, ``-1`` for a dimension of any size.

    Engines report full shapes, batch dimension included. ``datatype`` is ``None`` and ``shape``
    ``None`` when the model file does not say (TorchScript); the model config must then provide them.
    """

    name: str
    datatype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What an engine needs from the model config, already resolved by the model layer."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    parameters: Mapping[str, str] = field(default_factory=dict)  # config `parameters`, backend settings
    graph_level: int | None = None  # config optimization.graph.level
    gpu_accelerators: tuple[str, ...] = ()  # config optimization.execution_accelerators, e.g. "tensorrt"
    cuda_graphs: bool = False
    max_batch_size: int = 0  # the config's; 0: the model does not batch
    input_names: tuple[str, ...] = ()  # names from the config, for backends whose files carry none
    output_names: tuple[str, ...] = ()


@runtime_checkable
class Engine(Protocol):
    """One loaded instance of a model. ``infer`` is called from a worker thread, never concurrently
    on the same instance; it returns only the outputs named in ``outputs``."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]: ...

    def close(self) -> None: ...


def missing_extra(library: str, extra: str) -> ImportError:
    """The error raised when a backend's library is not installed."""
    return ImportError(f"{library} is not installed; install it with: pip install 'rapidserve[{extra}]'")
