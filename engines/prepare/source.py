"""The model to prepare: a PyTorch module, a torch.export program or an ONNX file, and its tensors."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.progress import Progress
from rapidserve.engines.prepare.runners import Runner, eval_mode, onnx_runner, torch_runner

__all__ = ["Source", "TensorInfo", "load_source"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]  # without the batch dimension


@dataclass
class Source:
    """The original model: a PyTorch module (``module``) or only an ONNX file (``onnx_path``)."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    module: Any = None
    onnx_path: Path | None = None
    task: str = "auto"  # classify | regress | auto: a classifier when the data has labels
    program: Any = None  # the torch.export program, when the model came as a .pt2
    fixed_batch: int | None = None  # the batch size an ONNX file fixes in its inputs' first dimension

    @property
    def scores(self) -> bool:
        """Its first output could be a score per class ([batch, classes], floating point)."""
        first = self.outputs[0]
        return len(first.dims) == 1 and first.dims[0] > 1 and first.dtype.kind == "f"

    def is_classifier(self, data: Dataset, recipe: Any = None) -> bool:
        """Top-1 measures it: asked for (``task``), or its output can be scores and the data has labels
        or the recipe's budget is in top-1 points (then top-1 agreement with the original)."""
        if self.task == "classify":
            if not self.scores:
                raise ValueError(f"--task classify needs a [batch, classes] output; '{self.outputs[0].name}' is not")
            return True
        top1_budget = recipe is not None and recipe.budget_top1 is not None
        return self.task == "auto" and self.scores and (data.labels is not None or top1_budget)

    def runner(self, threads: int = 1) -> Runner:
        if self.module is not None:
            return torch_runner(self.module, threads)
        assert self.onnx_path is not None
        return onnx_runner(self.onnx_path, threads)

    def example(self, data: Dataset, rows: int = 2) -> tuple[Any, ...]:
        """Torch tensors of the first rows of ``data``, in input order (for tracing and export)."""
        import torch

        batch = data.rows(rows)
        return tuple(torch.from_numpy(batch[spec.name]) for spec in self.inputs)


def import_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:function`` -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model wants pkg.module:factory, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"{spec}: {attr!r} is not a callable in {module_name}")
    return factory  # type: ignore[no-any-return]


def load_source(
    name: str,
    data: Dataset,
    *,
    factory: str = "",
    weights: Path | None = None,
    model_file: Path | None = None,
    output_names: Sequence[str] = (),
    task: str = "auto",
    progress: Progress | None = None,
    data_file: str | Path = "the validation data",
) -> Source:
    """Load the model and describe its tensors: inputs from the model file or the data, outputs
    from one run on two rows of the data."""
    if not factory and (model_file is None or model_file.suffix not in (".pt2", ".onnx")):
        raise ValueError("give --model pkg.module:factory [--weights FILE] or --model-file model.pt2|model.onnx")
    if task not in ("auto", "classify", "regress"):
        raise ValueError(f"--task must be auto, classify or regress, not {task!r}")
    progress = progress or Progress(enabled=False)
    inputs = [TensorInfo(n, a.dtype, tuple(a.shape[1:])) for n, a in data.inputs.items()]
    module = program = onnx_path = fixed = graph = None
    where = model_file or factory
    with progress.step("loading the model", where):
        if factory:
            import torch

            module = import_factory(factory)()
            if weights is not None:
                module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            eval_mode(module)
        elif model_file is not None and model_file.suffix == ".pt2":
            import torch

            program = torch.export.load(str(model_file))
            module = program.module()
            inputs = _program_inputs(program, data)
        elif model_file is not None:
            import onnx

            onnx_path = model_file.resolve()  # the quantization tools run in a folder of their own
            graph = onnx.load(str(model_file), load_external_data=False).graph
    if graph is not None:
        with progress.step(f"checking {data_file} against the model's inputs", where):
            inputs, fixed = _onnx_inputs(graph, data)
    source = Source(name, inputs, [], module, onnx_path, task, program, fixed)
    with progress.step(f"running the model on {data_file}", where):
        outputs = source.runner()(data.rows(2))
    names = list(output_names) or (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    if len(names) != len(outputs):
        raise ValueError(f"the model returns {len(outputs)} outputs but {len(names)} output names were given")
    if onnx_path is not None:
        import onnx

        names = [o.name for o in onnx.load(str(model_file), load_external_data=False).graph.output]
    source.outputs = [TensorInfo(n, o.dtype, tuple(o.shape[1:])) for n, o in zip(names, outputs, strict=True)]
    return source


def _program_inputs(program: Any, data: Dataset) -> list[TensorInfo]:
    """The program's user inputs, in its own order (the data's arrays are matched by name)."""
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(names) != len(data.inputs):
        raise ValueError(f"the program takes {len(names)} inputs ({', '.join(names)}); the data has {len(data.inputs)}")
    if set(names) != set(data.inputs):
        if len(names) > 1:
            raise ValueError(f"the data's arrays ({', '.join(data.inputs)}) must be named as the program's inputs "
                             f"({', '.join(names)}), so that each goes to its place")  # fmt: skip
        names = list(data.inputs)  # one input: its name in the data is the name it is served under
    data.inputs = {n: data.inputs[n] for n in names}
    return [TensorInfo(n, data.inputs[n].dtype, tuple(data.inputs[n].shape[1:])) for n in names]


def _onnx_inputs(graph: Any, data: Dataset) -> tuple[list[TensorInfo], int | None]:
    """An ONNX graph's inputs, checked against the data (type, rank, every fixed dimension but the
    batch), and the batch size the graph fixes (None when any input leaves it free)."""
    from onnx import helper

    initializers = {i.name for i in graph.initializer}
    values = [i for i in graph.input if i.name not in initializers]
    missing = [v.name for v in values if v.name not in data.inputs]
    if missing:
        raise ValueError(f"the data has no array for the ONNX model's input(s) {', '.join(missing)}")
    firsts: list[int | None] = []
    for value in values:
        array, tensor = data.inputs[value.name], value.type.tensor_type
        want = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if array.dtype != want:
            raise ValueError(f"input '{value.name}': the data holds {array.dtype}, the model takes {want}")
        if not tensor.HasField("shape"):
            firsts.append(None)
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
        pairs = zip(dims[1:], array.shape[1:], strict=True) if len(dims) == array.ndim else None
        rows_fit = pairs is not None and all(w is None or w == g for w, g in pairs)
        if not rows_fit:
            shape = ", ".join(str(d) if d is not None else "?" for d in dims)
            raise ValueError(
                f"input '{value.name}': the data's rows have shape {list(array.shape[1:])}, the model takes "
                f"[{shape}] (the data holds one row per sample: its first dimension counts the samples)"
            )
        firsts.append(dims[0] if dims else None)
    sizes = {d for d in firsts if d is not None}
    fixed = min(sizes) if sizes and all(d is not None for d in firsts) else None
    return [TensorInfo(v.name, data.inputs[v.name].dtype, tuple(data.inputs[v.name].shape[1:])) for v in values], fixed
