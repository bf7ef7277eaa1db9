"""Running a PyTorch module on a CUDA device: reduced precision, pinned host buffers with
non-blocking copies, one CUDA stream per instance, and CUDA graphs captured per batch-size bucket.

Config (the model's ``parameters`` and ``optimization``):
- ``precision``: ``fp32`` (default), ``fp16`` or ``bf16``: weights and floating inputs are cast to it
  on the device; floating outputs come back in FP32, as the model declares them.
- ``optimization { cuda { graphs: true } }``: a graph is captured the first time a batch falls into
  a bucket (``cuda_graph_batch_sizes``, default 1, 2, 4, ... up to max_batch_size), then replayed. A
  batch is padded with zero rows up to its bucket and the padding rows are cut from the outputs
  before anything reaches a client; a batch larger than every bucket runs without a graph.

Unverified on this project's CPU machines (no GPU): the code paths run only with CUDA, and their
tests carry the ``gpu`` marker. The bucket and padding logic they rely on lives in
``rapidserve.engines.buckets`` and is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rapidserve.engines.buckets import bucket_for, parse_buckets, unpad

__all__ = ["CudaRunner", "precision_dtype"]


def precision_dtype(torch: Any, name: str) -> Any:
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"parameter 'precision' must be fp32, fp16 or bf16, not {name!r}")
    return dtypes[name]


class CudaRunner:
    """Runs ``module`` on ``device`` for positional input tensors given on the host."""

    def __init__(
        self,
        torch: Any,
        module: Any,
        device: Any,
        *,
        precision: str = "fp32",
        graphs: bool = False,
        max_batch: int = 0,
        buckets: str = "",
    ) -> None:
        self._torch = torch
        self._device = device
        self._dtype = precision_dtype(torch, precision)
        module = module.to(device)
        self._module = module.to(dtype=self._dtype) if self._dtype != torch.float32 else module
        self._stream = torch.cuda.Stream(device=device)
        self._pinned: dict[tuple[int, tuple[int, ...], Any], Any] = {}
        self._buckets = parse_buckets(buckets, max_batch) if graphs and max_batch > 0 else ()
        self._graphs: dict[int, tuple[Any, list[Any], list[Any]]] = {}  # bucket -> (graph, inputs, outputs)

    def __call__(self, host: Sequence[Any]) -> list[Any]:
        """Host tensors in, host tensors out (floating outputs in FP32)."""
        torch = self._torch
        with torch.cuda.stream(self._stream):
            rows = host[0].shape[0] if self._buckets and host and host[0].dim() > 0 else 0
            bucket = bucket_for(rows, self._buckets) if rows else None
            if bucket is None:
                with torch.inference_mode():
                    outputs = _as_list(self._module(*(self._to_device(i, t) for i, t in enumerate(host))))
            else:
                outputs = self._replay(bucket, rows, host)
            results = [self._to_host(t) for t in outputs]
        self._stream.synchronize()
        return results

    def _to_device(self, index: int, tensor: Any) -> Any:
        """Through a pinned staging buffer, so the copy to the device is asynchronous."""
        key = (index, tuple(tensor.shape), tensor.dtype)
        staging = self._pinned.get(key)
        if staging is None:
            staging = self._pinned[key] = self._torch.empty_like(tensor).pin_memory()
        staging.copy_(tensor)
        moved = staging.to(self._device, non_blocking=True)
        return moved.to(self._dtype) if moved.is_floating_point() else moved

    def _to_host(self, tensor: Any) -> Any:
        if tensor.is_floating_point() and tensor.dtype != self._torch.float32:
            tensor = tensor.float()
        return tensor.to("cpu", non_blocking=False)

    def _replay(self, bucket: int, rows: int, host: Sequence[Any]) -> list[Any]:
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket, host)
        graph, static_inputs, static_outputs = self._graphs[bucket]
        for index, (static, tensor) in enumerate(zip(static_inputs, host, strict=True)):
            static[:rows].copy_(self._to_device(index, tensor))
            if rows < bucket:
                static[rows:].zero_()  # padding rows: their results are cut below
        graph.replay()
        named = unpad(dict(enumerate(static_outputs)), rows, bucket)
        return [named[i].clone() for i in range(len(static_outputs))]

    def _capture(self, bucket: int, host: Sequence[Any]) -> tuple[Any, list[Any], list[Any]]:
        """Warm up on the instance's stream, then capture one forward pass at ``bucket`` rows."""
        torch = self._torch
        static_inputs = [
            torch.zeros((bucket, *t.shape[1:]), dtype=self._dtype if t.is_floating_point() else t.dtype,
                        device=self._device)
            for t in host
        ]  # fmt: skip
        with torch.inference_mode():
            for _ in range(3):
                self._module(*static_inputs)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                static_outputs = _as_list(self._module(*static_inputs))
        return graph, static_inputs, static_outputs


def _as_list(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (tuple, list)) else [result]
