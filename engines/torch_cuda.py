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

import logging
from collections.abc import Sequence
from typing import Any

from rapidserve.engines.buckets import bucket_for, parse_buckets, unpad

log = logging.getLogger(__name__)

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
        self._pinned: dict[tuple[int, Any], Any] = {}  # (input, dtype) -> a pinned buffer, grown to the largest batch
        self._buckets = parse_buckets(buckets, max_batch) if graphs and max_batch > 0 else ()
        # (bucket, each input's trailing shape and dtype) -> (graph, static inputs, static outputs), or
        # None where capture failed (that shape then runs without a graph)
        self._graphs: dict[tuple[Any, ...], tuple[Any, list[Any], list[Any]] | None] = {}

    @property
    def captured(self) -> list[int]:
        """The buckets with a graph (for tests and logs)."""
        return sorted({key[0] for key, entry in self._graphs.items() if entry is not None})

    def __call__(self, host: Sequence[Any]) -> list[Any]:
        """Host tensors in, host tensors out, each output in the dtype the model computes in FP32."""
        torch = self._torch
        try:
            with torch.cuda.stream(self._stream):
                rows = host[0].shape[0] if self._buckets and host and host[0].dim() > 0 else 0
                bucket = bucket_for(rows, self._buckets) if rows else None
                key = (bucket, *((tuple(t.shape[1:]), t.dtype) for t in host))
                entry = self._graph(key, bucket, host) if bucket is not None else None
                if entry is None:
                    with torch.inference_mode():
                        outputs = _as_list(self._module(*(self._to_device(i, t) for i, t in enumerate(host))))
                else:
                    outputs = self._replay(entry, bucket, rows, host)  # type: ignore[arg-type]
                results = [self._to_host(t) for t in outputs]
        finally:
            self._stream.synchronize()  # before the pinned buffers are written again
        return results

    def _cast_in(self, tensor: Any) -> Any:
        """FP32 inputs run in the chosen precision; other dtypes as they are."""
        return tensor.to(self._dtype) if tensor.dtype == self._torch.float32 else tensor

    def _to_device(self, index: int, tensor: Any) -> Any:
        """Through a pinned staging buffer, so the copy to the device is asynchronous."""
        key = (index, tensor.dtype)
        staging = self._pinned.get(key)
        if staging is None or staging.numel() < tensor.numel():
            staging = self._pinned[key] = self._torch.empty(tensor.numel(), dtype=tensor.dtype).pin_memory()
        view = staging[: tensor.numel()].view(tensor.shape)
        view.copy_(tensor)
        return self._cast_in(view.to(self._device, non_blocking=True))

    def _to_host(self, tensor: Any) -> Any:
        if self._dtype != self._torch.float32 and tensor.dtype == self._dtype:
            tensor = tensor.float()  # computed in reduced precision; the model declares FP32
        return tensor.to("cpu", non_blocking=False)

    def _graph(self, key: tuple[Any, ...], bucket: int, host: Sequence[Any]) -> Any:
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(bucket, host)
            except RuntimeError as exc:  # e.g. an operation that cannot be captured
                log.warning("no CUDA graph for batch bucket %d (running without one): %s", bucket, exc)
                self._graphs[key] = None
        return self._graphs[key]

    def _replay(
        self, entry: tuple[Any, list[Any], list[Any]], bucket: int, rows: int, host: Sequence[Any]
    ) -> list[Any]:
        graph, static_inputs, static_outputs = entry
        for index, (static, tensor) in enumerate(zip(static_inputs, host, strict=True)):
            static[:rows].copy_(self._to_device(index, tensor))
            if rows < bucket:
                static[rows:].zero_()  # padding rows: their results are cut below
        graph.replay()
        named = unpad(dict(enumerate(static_outputs)), rows, bucket)
        return [named[i].clone() for i in range(len(static_outputs))]

    def _capture(self, bucket: int, host: Sequence[Any]) -> tuple[Any, list[Any], list[Any]]:
        """Warm up on the instance's stream, then capture one forward pass at ``bucket`` rows. The
        capture is local to this thread, so other instances on the GPU may go on meanwhile."""
        torch = self._torch
        static_inputs = [
            self._cast_in(torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=self._device)) for t in host
        ]
        with torch.inference_mode():
            for _ in range(3):
                self._module(*static_inputs)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                static_outputs = _as_list(self._module(*static_inputs))
        return graph, static_inputs, static_outputs


def _as_list(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (tuple, list)) else [result]
