"""How any model or variant runs on a batch of numpy arrays: PyTorch eager, TorchScript, ONNX Runtime
or a TensorRT plan. Every runner takes batches of any size: an ONNX model whose batch dimension is
fixed (model-zoo files often fix it at 1) is run in chunks of the size it admits."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Array, Dataset

__all__ = [
    "Runner",
    "chunked",
    "eval_mode",
    "fixed_batch_of",
    "load_torchscript",
    "onnx_runner",
    "plan_runner",
    "predict",
    "torch_runner",
]

Runner = Callable[[dict[str, Array]], list[Array]]  # inputs by name -> outputs in order


def predict(runner: Runner, data: Dataset, batch_size: int = 32) -> list[Array]:
    """Every output over the whole dataset, batch by batch."""
    parts: list[list[Array]] = []
    for batch in data.batches(batch_size):
        for i, out in enumerate(runner(batch)):
            if len(parts) <= i:
                parts.append([])
            parts[i].append(np.asarray(out))
    return [np.concatenate(p) for p in parts]


def eval_mode(module: Any) -> None:
    with contextlib.suppress(NotImplementedError):  # a torch.export program's module has no train/eval modes
        module.eval()


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


def load_torchscript(path: Path) -> Any:
    """``torch.jit.load`` without its deprecation notice: TorchScript is what Triton's PyTorch backend
    (and ours) serves, and a traced file is loaded without unpickling Python code."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
        return torch.jit.load(str(path))


def fixed_batch_of(session: Any) -> int | None:
    """The batch size an ONNX Runtime session's inputs fix (their first dimension), or None when it is free."""
    firsts = {i.shape[0] if i.shape else None for i in session.get_inputs()}
    sizes = {d for d in firsts if isinstance(d, int) and d > 0}
    return min(sizes) if sizes and len(firsts) == len(sizes) else None


def chunked(run: Runner, size: int) -> Runner:
    """``run`` on batches of exactly ``size`` rows: larger batches are split, and the last chunk is filled
    up with copies of its last row, whose outputs are dropped."""

    def run_chunks(batch: dict[str, Array]) -> list[Array]:
        rows = len(next(iter(batch.values())))
        if rows == size:
            return run(batch)
        parts: list[list[Array]] = []
        for start in range(0, rows, size):
            chunk = {k: v[start : start + size] for k, v in batch.items()}
            short = size - len(next(iter(chunk.values())))
            if short:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            for i, out in enumerate(run(chunk)):
                if len(parts) <= i:
                    parts.append([])
                parts[i].append(np.asarray(out)[: size - short])
        return [np.concatenate(p) for p in parts]

    return run_chunks


def onnx_runner(path: Path, threads: int = 1, *, log_severity: int = 3) -> Runner:
    """``log_severity`` 3 keeps ORT's warnings about its own fusions out of the output; 4 its errors too,
    for a run whose failure is an expected answer."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = log_severity
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(batch: dict[str, Array]) -> list[Array]:
        return list(session.run(names, batch))

    fixed = fixed_batch_of(session)
    return run if fixed is None else chunked(run, fixed)


def plan_runner(path: Path) -> Runner:
    """Run a TensorRT plan on batches of numpy arrays (for validation and benchmarks), with the server's engine."""
    from rapidserve.engines.base import EngineOptions
    from rapidserve.engines.tensorrt import TensorRTEngine

    engine = TensorRTEngine(path, EngineOptions(device="cuda:0"))
    names = [spec.name for spec in engine.outputs]

    def run(batch: dict[str, Array]) -> list[Array]:
        results = engine.infer(batch, names)
        return [results[name] for name in names]

    return run
