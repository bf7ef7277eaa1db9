"""The model to prepare, and how any variant runs on a batch: PyTorch eager, TorchScript or ONNX Runtime."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Array, Dataset

__all__ = ["Runner", "Source", "TensorInfo", "load_source", "onnx_runner", "predict", "torch_runner"]

Runner = Callable[[dict[str, Array]], list[Array]]  # inputs by name -> outputs in order


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


def predict(runner: Runner, data: Dataset, batch_size: int = 32) -> list[Array]:
    """Every output over the whole dataset, batch by batch."""
    parts: list[list[Array]] = []
    for batch in data.batches(batch_size):
        for i, out in enumerate(runner(batch)):
            if len(parts) <= i:
                parts.append([])
            parts[i].append(np.asarray(out))
    return [np.concatenate(p) for p in parts]


def torch_runner(module: Any, threads: int = 1) -> Runner:
    """Eager nn.Module or TorchScript, positional inputs, without gradients."""
    import torch

    torch.set_num_threads(threads)
    eval_mode(module)

    def run(batch: dict[str, Array]) -> list[Array]:
        with torch.inference_mode():
            result = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in batch.values()))
        items = result if isinstance(result, (tuple, list)) else (result,)
        return [t.detach().numpy() for t in items]

    return run


def eval_mode(module: Any) -> None:
    with contextlib.suppress(NotImplementedError):  # a torch.export program's module has no train/eval modes
        module.eval()


def onnx_runner(path: Path, threads: int = 1) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # keep ORT's warnings about its own fusions out of the output
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(batch: dict[str, Array]) -> list[Array]:
        return list(session.run(names, batch))

    return run


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
) -> Source:
    """Load the model and describe its tensors: inputs from the model file or the data, outputs
    from one run on two rows of the data."""
    inputs = [TensorInfo(n, a.dtype, tuple(a.shape[1:])) for n, a in data.inputs.items()]
    module = program = None
    onnx_path = None
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
    elif model_file is not None and model_file.suffix == ".onnx":
        onnx_path = model_file.resolve()  # the quantization tools run in a folder of their own
        inputs = _onnx_inputs(model_file, data)
    else:
        raise ValueError("give --model pkg.module:factory [--weights FILE] or --model-file model.pt2|model.onnx")
    if task not in ("auto", "classify", "regress"):
        raise ValueError(f"--task must be auto, classify or regress, not {task!r}")
    source = Source(name, inputs, [], module, onnx_path, task, program)
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


def _onnx_inputs(path: Path, data: Dataset) -> list[TensorInfo]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    missing = [n for n in names if n not in data.inputs]
    if missing:
        raise ValueError(f"the data has no array for the ONNX model's input(s) {', '.join(missing)}")
    return [TensorInfo(n, data.inputs[n].dtype, tuple(data.inputs[n].shape[1:])) for n in names]
