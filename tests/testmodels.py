"""Small models the tests build themselves (ONNX graphs written with onnx.helper)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ONNX_TYPES = {
    "BOOL": 9,
    "UINT8": 2,
    "UINT16": 4,
    "UINT32": 12,
    "UINT64": 13,
    "INT8": 3,
    "INT16": 5,
    "INT32": 6,
    "INT64": 7,
    "FP16": 10,
    "FP32": 1,
    "FP64": 11,
    "BF16": 16,
    "BYTES": 8,
}


def write_model(repo: Path, name: str, graph: Any, config: str | None = None, version: int = 1) -> Path:
    """Save an ONNX graph as ``repo/name/version/model.onnx`` (plus config.pbtxt when given)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory = repo / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return repo / name


def write_python_model(repo: Path, name: str, source: str, config: str, version: int = 1) -> Path:
    """Write a Python-backend model: ``repo/name/version/model.py`` (``source``, dedented) and its
    config.pbtxt (``backend: "python"`` added in front of ``config``)."""
    import textwrap

    directory = repo / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(textwrap.dedent(source))
    (repo / name / "config.pbtxt").write_text(f'backend: "python"\n{config}')
    return repo / name


def add_sub_graph(width: int = 16) -> Any:
    """INPUT0, INPUT1 (FP32 [batch, width]) -> OUTPUT0 = sum, OUTPUT1 = difference."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", width]) for n in ("INPUT0", "INPUT1")]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", width]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return helper.make_graph(nodes, "add_sub", io, out)


def identity_graph(datatypes: list[str]) -> Any:
    """One Identity per datatype: ``in_<TYPE>`` -> ``out_<TYPE>``, shape [batch, 3]."""
    from onnx import helper

    inputs = [helper.make_tensor_value_info(f"in_{t}", ONNX_TYPES[t], ["batch", 3]) for t in datatypes]
    outputs = [helper.make_tensor_value_info(f"out_{t}", ONNX_TYPES[t], ["batch", 3]) for t in datatypes]
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in datatypes]
    return helper.make_graph(nodes, "identity", inputs, outputs)


def scale_graph(name: str, onnx_type: int, factor: float | int) -> Any:
    """x (any numeric type, [batch, 4]) -> y = x * factor, same type."""
    from onnx import helper, numpy_helper

    from rapidserve.common.datatypes import numpy_dtype

    datatype = next(k for k, v in ONNX_TYPES.items() if v == onnx_type)
    factor_tensor = numpy_helper.from_array(np.array(factor, dtype=numpy_dtype(datatype)), "factor")
    return helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", onnx_type, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx_type, ["batch", 4])],
        [factor_tensor],
    )


def slow_graph(rows: int = 256, size: int = 256, repeats: int = 48) -> Any:
    """x FP32 [batch, rows, size] -> y = relu(x), through ``repeats`` matmul+relu layers whose weight is
    the identity (the relus keep ONNX Runtime from folding the chain): about 0.1 ms a repeat, so the
    default 48 take a few ms a call, on the order of a loopback RPC carrying its 256 kB."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(size, dtype=np.float32), "w")
    nodes, prev = [], "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    shape = ["batch", rows, size]
    return helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [weight],
    )


def strings_graph() -> Any:
    """text (BYTES [n]) -> echo, the same strings."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [-1])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [-1])],
    )


def sum_graph() -> Any:
    """x FP32 [n] (any length) -> total FP32 [1]: big requests, small answers (memory probes)."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])],
    )


def tile_graph(times: int) -> Any:
    """x FP32 [n] -> y FP32 [n * times], x repeated: small requests, large answers."""
    from onnx import TensorProto, helper, numpy_helper

    return helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])],
        [numpy_helper.from_array(np.array([times], np.int64), "repeats")],
    )


SUM_CONFIG = """
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "total", data_type: TYPE_FP32, dims: [ 1 ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


ALL_DATATYPES = list(ONNX_TYPES)
ADD_SUB_CONFIG = """
name: "add_sub"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, { name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def build_repository(repo: Path) -> Path:
    """The standard test repository: add_sub (with config), identity (every datatype, no config),
    fp16 / int64 scalers, and a no-batching BYTES model."""
    write_model(repo, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    # ORT's Python API cannot mix BF16 and string tensors in one model, so BF16 gets its own
    write_model(repo, "identity", identity_graph([t for t in ALL_DATATYPES if t != "BF16"]))
    write_model(repo, "identity_bf16", identity_graph(["BF16", "FP32"]))
    write_model(repo, "fp16_double", scale_graph("fp16_double", ONNX_TYPES["FP16"], 2.0))
    write_model(repo, "int64_triple", scale_graph("int64_triple", ONNX_TYPES["INT64"], 3))

    write_model(
        repo,
        "strings",
        strings_graph(),
        'max_batch_size: 0\ninput [{ name: "text" data_type: TYPE_STRING dims: [-1] }]\n'
        'output [{ name: "echo" data_type: TYPE_STRING dims: [-1] }]\n',
    )
    return repo


def seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    """``build()`` with torch's random generator seeded for it alone: the same weights on every run,
    and the caller's random state left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_classifier() -> Any:
    """A PyTorch MLP 16 -> 32 -> 32 -> 4 (a factory for `rapidserve prepare` tests)."""
    from torch import nn

    return seeded(lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))


def tiny_student() -> Any:
    """A smaller MLP 16 -> 8 -> 4, the distillation student of ``tiny_classifier``."""
    from torch import nn

    return seeded(lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), seed=1)


def tiny_regressor() -> Any:
    """A PyTorch MLP 8 -> 24 -> 3 with no classes: its fidelity is cosine similarity."""
    from torch import nn

    return seeded(lambda: nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 3)), seed=2)


def classification_data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian points labelled by which of 4 fixed directions they lean towards most."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    directions = np.random.default_rng(99).standard_normal((16, 4)).astype(np.float32)
    return x, (x @ directions).argmax(axis=1).astype(np.int64)


class TwoInputs:
    """Factory of a PyTorch module with two inputs of different widths: ``forward(a [.,8], b [.,3])``."""

    def __new__(cls) -> Any:  # type: ignore[misc]
        import torch

        class Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(8, 3)

            def forward(self, a: Any, b: Any) -> Any:
                return self.linear(a) - b

        return seeded(Module, seed=3)
