"""PyTorch backend: ``model.pt2`` (a ``torch.export`` program) or ``model.pt`` (TorchScript).

Inputs bind to ``forward`` positionally. A ``.pt2`` program describes its inputs (names, dtypes,
dynamic dims) itself; TorchScript has only argument names, so its config must give datatypes and dims.
Outputs are named ``OUTPUT__0``, ``OUTPUT__1``, ... (Triton's PyTorch convention) unless the config
names them, in the order ``forward`` returns them. Runs on CPU, or CUDA for a KIND_GPU instance
(``rapidserve.engines.torch_cuda``: FP16/BF16, pinned buffers, a stream per instance, CUDA graphs).
The parameter ``torch_compile`` (``true`` for inductor, or a backend's name) compiles the module at load.

``intra_op_thread_count`` sets torch's thread count, which is one setting for the whole process:
the last PyTorch model loaded with it wins.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from rapidserve.common.types import TensorSpec
from rapidserve.engines.base import EngineOptions, missing_extra
from rapidserve.engines.torch_cuda import CudaRunner

__all__ = ["TorchEngine", "load"]

_DATATYPE_OF_TORCH = {
    "torch.bool": "BOOL",
    "torch.uint8": "UINT8",
    "torch.uint16": "UINT16",
    "torch.uint32": "UINT32",
    "torch.uint64": "UINT64",
    "torch.int8": "INT8",
    "torch.int16": "INT16",
    "torch.int32": "INT32",
    "torch.int64": "INT64",
    "torch.float16": "FP16",
    "torch.float32": "FP32",
    "torch.float64": "FP64",
    "torch.bfloat16": "BF16",
}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise missing_extra("torch", "torch") from exc
    return torch


def load(path: Path, options: EngineOptions) -> TorchEngine:
    return TorchEngine(path, options)


class TorchEngine:
    def __init__(self, path: Path, options: EngineOptions) -> None:
        torch = self._torch = _import_torch()
        self._device = torch.device(options.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the model asks for a GPU (instance_group KIND_GPU) but torch sees no CUDA device")
        if "intra_op_thread_count" in options.parameters:
            torch.set_num_threads(int(options.parameters["intra_op_thread_count"]))
        if path.suffix == ".pt2":
            program = torch.export.load(str(path))
            inputs = _exported_inputs(program)
            if self._device.type == "cuda":
                # constants lifted out of the graph, and devices written into it, move too
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self._device)
            self._module = program.module().to(self._device)
        else:
            with warnings.catch_warnings():  # TorchScript is the format Triton's PyTorch backend serves
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
                self._module = torch.jit.load(str(path), map_location=self._device).eval()
            names = [arg.name for arg in self._module.forward.schema.arguments[1:]]
            inputs = [TensorSpec(name, None, None) for name in names]
        if options.input_names:
            if len(options.input_names) != len(inputs):
                raise ValueError(
                    f"the config names {len(options.input_names)} inputs but forward() takes {len(inputs)}"
                )
            inputs = [TensorSpec(n, s.datatype, s.shape) for n, s in zip(options.input_names, inputs, strict=True)]
        self._inputs = tuple(inputs)
        self._output_names = options.output_names
        self._outputs: tuple[TensorSpec, ...] = tuple(TensorSpec(n, None, None) for n in options.output_names)
        if path.suffix == ".pt2" and not options.output_names:
            self._outputs = _exported_outputs(program)
            self._output_names = tuple(spec.name for spec in self._outputs)
        compile_backend = options.parameters.get("torch_compile", "")
        if compile_backend not in ("", "0", "false"):  # "1"/"true": inductor; or a backend's name
            backend = "inductor" if compile_backend in ("1", "true") else compile_backend
            self._module = torch.compile(self._module, backend=backend)
        precision = options.parameters.get("precision", "fp32")
        self._cuda: CudaRunner | None = None
        if self._device.type == "cuda":
            self._cuda = CudaRunner(
                torch, self._module, self._device, precision=precision, graphs=options.cuda_graphs,
                max_batch=options.max_batch_size, buckets=options.parameters.get("cuda_graph_batch_sizes", ""),
            )  # fmt: skip
        elif precision != "fp32" or options.cuda_graphs:
            raise ValueError("parameter 'precision' other than fp32, and CUDA graphs, need a GPU instance (KIND_GPU)")

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        torch = self._torch
        args = [self._to_tensor(inputs[spec.name]) for spec in self._inputs]
        if self._cuda is not None:
            tensors = self._cuda(args)
        else:
            with torch.inference_mode():
                result = self._module(*args)
            tensors = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(tensors) != len(self._output_names):
            raise RuntimeError(f"forward() returned {len(tensors)} tensors, expected {len(self._output_names)}")
        by_name = dict(zip(self._output_names, tensors, strict=True))
        return {name: _to_numpy(torch, by_name[name]) for name in outputs}

    def close(self) -> None:
        del self._module

    def _to_tensor(self, array: np.ndarray[Any, Any]) -> Any:
        torch = self._torch
        if array.dtype == ml_dtypes.bfloat16:
            tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            # Request tensors are read-only views of the gRPC message; torch needs writable memory.
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        return tensor  # on the host: the CUDA runner stages it through pinned memory


def _to_numpy(torch: Any, tensor: Any) -> np.ndarray[Any, Any]:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        bits: np.ndarray[Any, Any] = tensor.view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    array: np.ndarray[Any, Any] = tensor.numpy()
    return array


def _tensor_spec(name: str, fake: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in fake.shape)
    return TensorSpec(name, _DATATYPE_OF_TORCH.get(str(fake.dtype)), shape)


def _exported_inputs(program: Any) -> list[TensorSpec]:
    user_inputs = set(program.graph_signature.user_inputs)
    return [
        _tensor_spec(node.name, node.meta["val"])
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs
    ]


def _exported_outputs(program: Any) -> tuple[TensorSpec, ...]:
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    values = output_node.args[0]
    values = values if isinstance(values, (tuple, list)) else [values]
    return tuple(_tensor_spec(f"OUTPUT__{i}", value.meta["val"]) for i, value in enumerate(values))
