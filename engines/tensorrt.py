"""TensorRT backend (``model.plan``, platform ``tensorrt_plan``), written against the TensorRT 10
Python API.

The engine describes its own inputs and outputs (names, dtypes, shapes with -1 for dynamic dims), so
no config.pbtxt is needed. Each request picks the first optimization profile whose range admits its
shapes (``rapidserve.engines.buckets.select_profile``), sets the input shapes, binds device buffers
and runs ``execute_async_v3`` on the instance's own CUDA stream.

Device memory and the stream come from torch, already a dependency of the GPU install: it keeps
rapidserve to one CUDA wrapper (no cuda-python or pycuda beside torch), and torch's caching allocator
reuses buffers between requests.

Not yet run against a real TensorRT installation (its wheels fetch their libraries from NVIDIA's
index, and the test machines have no GPU). Its tests skip without ``tensorrt`` and CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from rapidserve.common.types import TensorSpec
from rapidserve.engines.base import EngineInputError, EngineOptions, missing_extra
from rapidserve.engines.buckets import select_profile

__all__ = ["TensorRTEngine", "load"]

_DATATYPES = {
    "FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8",
}  # fmt: skip


_TORCH_DTYPES = {
    "FP32": lambda t: t.float32, "FP16": lambda t: t.float16, "BF16": lambda t: t.bfloat16,
    "INT8": lambda t: t.int8, "INT32": lambda t: t.int32, "INT64": lambda t: t.int64,
    "BOOL": lambda t: t.bool, "UINT8": lambda t: t.uint8,
}  # fmt: skip


def _to_torch(torch: Any, array: np.ndarray[Any, Any]) -> Any:
    """A host tensor of a request array (read-only views of the message are copied; BF16 goes
    through its 16-bit pattern, which numpy and torch share)."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array if array.flags.writeable and array.flags.c_contiguous else np.array(array))


def _to_numpy(torch: Any, tensor: Any) -> np.ndarray[Any, Any]:
    if tensor.dtype == torch.bfloat16:
        bits: np.ndarray[Any, Any] = tensor.view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    array: np.ndarray[Any, Any] = tensor.numpy()
    return array


def load(path: Path, options: EngineOptions) -> TensorRTEngine:
    return TensorRTEngine(path, options)


class TensorRTEngine:
    def __init__(self, path: Path, options: EngineOptions) -> None:
        try:
            import torch
        except ImportError as exc:
            raise missing_extra("torch", "torch") from exc
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ImportError(
                "TensorRT is not installed: install it as NVIDIA's documentation says (`pip install tensorrt`, "
                "which fetches its libraries from NVIDIA's package index), on a machine with an NVIDIA GPU"
            ) from exc
        if not options.device.startswith("cuda") or not torch.cuda.is_available():
            raise RuntimeError("a TensorRT plan runs on a GPU instance (instance_group KIND_GPU) with CUDA")
        self._trt, self._torch = trt, torch
        self._device = torch.device(options.device)
        with torch.cuda.device(self._device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT could not load {path.name} (built for another GPU or TensorRT version?)")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self._device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = tuple(self._spec(n) for n in names if is_input[n])
        self._outputs = tuple(self._spec(n) for n in names if not is_input[n])
        # per profile, per input: the (min, max) shapes it admits
        self._ranges = [
            [tuple(tuple(d) for d in self._engine.get_tensor_profile_shape(spec.name, p)[::2]) for spec in self._inputs]
            for p in range(self._engine.num_optimization_profiles)
        ]
        self._profile = -1

    def _spec(self, name: str) -> TensorSpec:
        dtype = self._engine.get_tensor_dtype(name)
        datatype = _DATATYPES.get(dtype.name)
        if datatype is None:
            raise ValueError(f"tensor '{name}' has TensorRT type {dtype.name}, which rapidserve cannot serve")
        return TensorSpec(name, datatype, tuple(self._engine.get_tensor_shape(name)))

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        torch, context = self._torch, self._context
        shapes = [tuple(inputs[spec.name].shape) for spec in self._inputs]
        profile = select_profile(self._ranges, shapes)
        keep = []  # device buffers must outlive the asynchronous run
        with torch.cuda.stream(self._stream):
            if profile != self._profile:
                context.set_optimization_profile_async(profile, self._stream.cuda_stream)
                self._profile = profile
            for spec, shape in zip(self._inputs, shapes, strict=True):
                tensor = _to_torch(torch, inputs[spec.name]).to(self._device, non_blocking=True)
                if not context.set_input_shape(spec.name, shape):
                    raise EngineInputError(
                        f"input '{spec.name}' shape {list(shape)} is outside optimization profile {profile} "
                        f"of the engine"
                    )
                context.set_tensor_address(spec.name, tensor.data_ptr())
                keep.append(tensor)
            results = {}
            for spec in self._outputs:
                dtype = _TORCH_DTYPES[spec.datatype or "FP32"](torch)
                tensor = torch.empty(tuple(context.get_tensor_shape(spec.name)), dtype=dtype, device=self._device)
                context.set_tensor_address(spec.name, tensor.data_ptr())
                results[spec.name] = tensor
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            host = {name: results[name].to("cpu", non_blocking=False) for name in outputs}
        self._stream.synchronize()
        return {name: _to_numpy(torch, tensor) for name, tensor in host.items()}

    def close(self) -> None:
        del self._context, self._engine
