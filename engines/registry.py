"""Backends by name. Each backend module is imported only when a model needs it, so a CPU install
never touches torch or TensorRT."""

from __future__ import annotations

import importlib
from pathlib import Path

from rapidserve.engines.base import Engine, EngineOptions

__all__ = ["BACKENDS", "DEFAULT_FILENAMES", "PLATFORMS", "backend_for_file", "load_engine"]

# backend name -> module defining `load(path, options) -> Engine`
BACKENDS: dict[str, str] = {
    "onnxruntime": "rapidserve.engines.onnx_runtime",
    "pytorch": "rapidserve.engines.pytorch",
    "tensorrt": "rapidserve.engines.tensorrt",
    "python": "rapidserve.engines.python_backend",
}

# backend -> model file names it understands, in order of preference
DEFAULT_FILENAMES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("model.onnx",),
    "pytorch": ("model.pt2", "model.pt"),
    "tensorrt": ("model.plan",),
    "python": ("model.py",),  # its I/O comes only from config.pbtxt, which it therefore needs
}

# Triton platform strings <-> backends (a Python model has no platform: ``backend: "python"`` picks it)
PLATFORMS: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
}
PLATFORM_OF_BACKEND = {backend: platform for platform, backend in PLATFORMS.items()}


def backend_for_file(filename: str) -> str | None:
    """The backend that reads a model file, by its name (``model.onnx`` -> ``onnxruntime``)."""
    suffix = Path(filename).suffix
    for backend, names in DEFAULT_FILENAMES.items():
        if any(Path(name).suffix == suffix for name in names):
            return backend
    return None


def load_engine(backend: str, path: Path, options: EngineOptions) -> Engine:
    """Load one instance of a model with the named backend (blocking; run it off the event loop)."""
    module_name = BACKENDS.get(backend)
    if module_name is None:
        available = ", ".join(sorted(BACKENDS))
        raise ValueError(f"backend '{backend}' is not available; this server has: {available}")
    module = importlib.import_module(module_name)
    engine: Engine = module.load(path, options)
    return engine
