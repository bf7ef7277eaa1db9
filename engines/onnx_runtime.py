"""ONNX Runtime backend (``model.onnx``): CPU by default, CUDA / TensorRT providers on request.

Reads Triton's onnxruntime-backend parameter names from the config (``intra_op_thread_count``,
``inter_op_thread_count``, ``execution_mode``, ``enable_mem_arena``, ``enable_mem_pattern``) and
``optimization.graph.level`` with Triton's meaning: -1 basic, 1 extended, 2 none, unset all.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from rapidserve.common.types import TensorSpec
from rapidserve.engines.base import EngineInputError, EngineOptions, missing_extra

__all__ = ["OnnxRuntimeEngine", "external_data_locations", "has_ep_context_nodes", "load", "select_providers"]

# ONNX tensor element types (as ORT names them) -> v2 datatypes
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
_GRAPH_LEVELS = {-1: "ORT_ENABLE_BASIC", 1: "ORT_ENABLE_EXTENDED", 2: "ORT_DISABLE_ALL"}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise missing_extra("onnxruntime", "cpu") from exc
    return onnxruntime


def load(path: Path, options: EngineOptions) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(path, options)


def external_data_locations(path: Path) -> list[str]:
    """The ``location`` of every tensor of an ONNX model whose data lives in another file (ONNX Runtime
    opens those itself, relative to the model's folder), read without that data. A model whose bytes
    hold no ``location`` key has none, which spares parsing the usual model."""
    with open(path, "rb") as file:
        if not file.seek(0, 2):
            return []
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"location") < 0:
                return []
    try:
        import onnx
    except ImportError as exc:
        raise missing_extra("onnx", "cpu") from exc
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(_graph_tensors(model.graph))
    tensors += [t for function in model.functions for node in function.node for t in _node_tensors(node)]
    return [entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"]


EP_CONTEXT = "EPContext"


def has_ep_context_nodes(model: bytes) -> bool:
    """Whether an ONNX model (its bytes) has an EPContext node anywhere: in its graph, a subgraph or a
    function. Such a node carries an execution provider's compiled engine (a TensorRT engine, whose
    plugins run code). Bytes that never spell the op's name have none, which spares parsing the usual
    model; a model that does is parsed, and invalid protobuf raises."""
    if EP_CONTEXT.encode() not in model:
        return False
    try:
        import onnx
    except ImportError as exc:
        raise missing_extra("onnx", "cpu") from exc
    proto = onnx.load_model_from_string(model)
    nodes = [*_nodes(proto.graph.node), *(node for function in proto.functions for node in _nodes(function.node))]
    return any(node.op_type == EP_CONTEXT for node in nodes)


def _nodes(nodes: Iterable[Any]) -> Iterator[Any]:
    """Every node, and the nodes of their subgraphs (If, Loop, Scan bodies)."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            graphs = [attribute.g] if attribute.HasField("g") else []
            for graph in [*graphs, *attribute.graphs]:
                yield from _nodes(graph.node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    """The tensors in a node's attributes, subgraphs (If, Loop, Scan bodies) included."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
        for tensor in [*sparse, *attribute.sparse_tensors]:
            yield from (tensor.values, tensor.indices)
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


class OnnxRuntimeEngine:
    def __init__(self, path: Path, options: EngineOptions) -> None:
        ort = _import_ort()
        self._session = ort.InferenceSession(
            str(path), sess_options=_session_options(ort, options), providers=_providers(ort, options)
        )
        # on a GPU, inputs go to the device once and outputs are bound there (I/O binding)
        self._device_id = int(options.device.partition(":")[2] or 0) if options.device.startswith("cuda") else None
        self._inputs = tuple(_spec(arg) for arg in self._session.get_inputs())
        self._outputs = tuple(_spec(arg) for arg in self._session.get_outputs())
        self._string_inputs = {spec.name for spec in self._inputs if spec.datatype == "BYTES"}
        self._ort = ort
        # ORT's Python API has no numpy bfloat16: such models go through OrtValues instead
        self._bf16 = any(spec.datatype == "BF16" for spec in self._inputs + self._outputs)
        if self._bf16 and any(spec.datatype == "BYTES" for spec in self._inputs + self._outputs):
            raise ValueError("ONNX Runtime's Python API cannot run a model with both BF16 and string tensors")

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        feed = {name: _as_ort_string(arr) if name in self._string_inputs else arr for name, arr in inputs.items()}
        if self._bf16:
            return self._infer_bf16(feed, outputs)
        if self._device_id is not None and not self._string_inputs:
            return self._infer_bound(feed, outputs)
        results = self._session.run(list(outputs), feed)
        return dict(zip(outputs, results, strict=True))

    def _infer_bound(
        self, feed: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """One copy of each input to the device, outputs left there until the one copy back."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            binding.bind_output(name, "cuda", self._device_id)
        self._session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))

    def _infer_bf16(
        self, feed: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        values = {name: _to_ort_value(self._ort, arr) for name, arr in feed.items()}
        results = self._session.run_with_ort_values(list(outputs), values)
        return {name: _from_ort_value(value) for name, value in zip(outputs, results, strict=True)}

    def close(self) -> None:
        del self._session


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"tensor '{arg.name}' has ONNX type {arg.type}, which rapidserve cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def _as_ort_string(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """ORT string tensors take ``str`` elements (it would store ``bytes`` as their repr)."""
    decode = np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])
    try:
        return decode(array) if array.size else array
    except UnicodeDecodeError as exc:
        raise EngineInputError(f"ONNX Runtime string tensors hold UTF-8 text; an element is not: {exc}") from None


_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16


def _to_ort_value(ort: Any, array: np.ndarray[Any, Any]) -> Any:
    if array.dtype == ml_dtypes.bfloat16:
        bits = np.ascontiguousarray(array).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=_ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ort_value(value: Any) -> np.ndarray[Any, Any]:
    if value.data_type() != "tensor(bfloat16)":
        result: np.ndarray[Any, Any] = value.numpy()
        return result
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    bits = np.zeros(count, np.uint16)
    if count:
        bits[:] = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    result = bits.view(ml_dtypes.bfloat16).reshape(shape)
    return result


def _session_options(ort: Any, options: EngineOptions) -> Any:
    params = options.parameters
    so = ort.SessionOptions()
    if "intra_op_thread_count" in params:
        so.intra_op_num_threads = int(params["intra_op_thread_count"])
    if "inter_op_thread_count" in params:
        so.inter_op_num_threads = int(params["inter_op_thread_count"])
    if params.get("execution_mode", "0") == "1":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if "enable_mem_arena" in params:
        so.enable_cpu_mem_arena = params["enable_mem_arena"] in ("1", "true")
    if "enable_mem_pattern" in params:
        so.enable_mem_pattern = params["enable_mem_pattern"] in ("1", "true")
    if options.graph_level is not None and options.graph_level in _GRAPH_LEVELS:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_LEVELS[options.graph_level])
    so.log_severity_level = 4  # fatal only: run-time errors reach the caller (and our log) as exceptions
    return so


def _providers(ort: Any, options: EngineOptions) -> list[Any]:
    return select_providers(options, set(ort.get_available_providers()))


def select_providers(options: EngineOptions, available: set[str]) -> list[Any]:
    """ONNX Runtime's execution providers for an instance, most preferred first: CPU for a CPU
    instance; for a GPU instance TensorRT (when the config names it), CUDA, then CPU for what they
    leave, each on the instance's device."""
    if not options.device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "the model asks for a GPU (instance_group KIND_GPU) but this onnxruntime has no CUDA provider; "
            "install onnxruntime-gpu instead of onnxruntime: pip install 'rapidserve[gpu]'"
        )
    device_id = int(options.device.partition(":")[2] or 0)
    providers: list[Any] = []
    if "tensorrt" in options.gpu_accelerators:
        if "TensorrtExecutionProvider" not in available:
            raise RuntimeError("the config asks for the TensorRT accelerator but ONNX Runtime has no TensorRT provider")
        providers.append(("TensorrtExecutionProvider", {"device_id": device_id}))
    providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    providers.append("CPUExecutionProvider")
    return providers
