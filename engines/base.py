"""The Engine protocol every backend implements (engines describe their tensors with ``TensorSpec``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rapidserve.common.types import TensorSpec

__all__ = ["USER_CODE_BACKENDS", "Engine", "EngineInputError", "EngineOptions", "may_run_inline", "missing_extra"]

# backends whose instances run the model author's own Python code, which may take any time
USER_CODE_BACKENDS = frozenset({"python"})


class EngineInputError(ValueError):
    """Raised by ``Engine.infer`` when the request's data is what cannot be run (not the engine)."""


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
    model_config: Any = None  # the model's ModelConfig message, for backends that need all of it (python)
    instance_name: str = ""  # e.g. "mymodel_0", for backends that tell their instances apart (python)


@runtime_checkable
class Engine(Protocol):
    """One loaded instance of a model. ``infer`` returns only the outputs named in ``outputs`` and is
    never called concurrently on the same instance.

    It runs in the instance's own worker thread, except for a model whose only instance is on the CPU
    (``may_run_inline``): once its batches take well under a millisecond they run on the event loop
    thread, where a thread hand-off would cost more than the call. A GPU instance (which waits for its
    device) and a model with several instances (which run in parallel) always use their threads.
    ``infer`` raises ``EngineInputError`` when the request's data is what cannot run (the caller's
    error), any other exception for a failure of its own. A batch of several requests that raises is
    run again in parts on the same instance (as far as a budget of reruns pays), so an exception
    must leave the instance usable.

    Optional capability: an engine MAY also offer ``infer_requests(list_of_inputs, outputs) ->
    list[outputs dict | Exception]``, taking a batch's requests unmerged (one inputs dict each, as Triton's
    Python backend hands them to ``execute``) and answering each one, with the exception a request gets
    in place of its outputs. The model layer then runs batches through it instead of ``infer``; a call
    that raises is treated as a failed batch (run again in parts, as above).
    """

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]: ...

    def close(self) -> None: ...


def may_run_inline(devices: Sequence[str], backend: str = "") -> bool:
    """Whether a model whose instances run on ``devices`` ("cpu", "cuda:N") with ``backend`` may run its
    fast batches on the event loop thread: only with exactly one instance, on the CPU, and never for a
    backend that runs the author's code (``USER_CODE_BACKENDS``: a fast call may sleep or block the next
    time). The one statement of the rule: the model layer turns it into the batcher's setting, and the
    batcher checks nothing else."""
    return backend not in USER_CODE_BACKENDS and len(devices) == 1 and devices[0] == "cpu"


def missing_extra(library: str, extra: str) -> ImportError:
    """The error raised when a backend's library is not installed."""
    return ImportError(f"{library} is not installed; install it with: pip install 'rapidserve[{extra}]'")
