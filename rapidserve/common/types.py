"""Small value types that requests, responses and model descriptions share on both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ParamValue", "TensorSpec"]

ParamValue = bool | int | float | str


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor: v2 datatype (e.g. ``"FP32"``) and shape, ``-1`` for a dimension of any size.

    Engines report full shapes, batch dimension included. ``datatype`` is ``None`` and ``shape``
    ``None`` when the model file does not say (TorchScript); the model config must then provide them.
    """

    name: str
    datatype: str | None
    shape: tuple[int, ...] | None
