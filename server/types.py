"""Domain types that flow between the servicer, the model manager, the scheduler and the engines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rapidserve.common.types import ParamValue

__all__ = ["InferRequest", "InferResponse"]


@dataclass(slots=True)
class InferRequest:
    """One decoded inference request. ``outputs`` empty means every output of the model."""

    model_name: str
    model_version: str
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...] = ()
    id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() after which the client no longer waits
    checked: bool = False  # already checked against the model's spec (by the decoder): no need again


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray[Any, Any]]  # in the order the client should see them
    id: str = ""
