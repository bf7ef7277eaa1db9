"""GPU metrics for Prometheus through NVIDIA's management library (``nvidia-ml-py``, in the gpu
extra): utilization and memory per GPU, labelled by the GPU's UUID.

Read when Prometheus scrapes, in the scrape's own thread (NVML is thread-safe). Without the library,
without a driver, or without GPUs, the collector reports nothing: a CPU machine is not a fault, so it
says why in one debug line when the server starts (``probe``) and never at scrape time. It advises no
install: ``rapidserve[gpu]`` beside ``rapidserve[cpu]`` would put both ONNX Runtime builds in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GpuCollector"]

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self) -> None:
        self._nvml: Any = None
        self._unavailable = ""

    def probe(self) -> bool:
        """Start NVML once; whether GPU metrics will be reported (why not goes to the debug log)."""
        if self._nvml is None and not self._unavailable:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except ImportError:
                self._unavailable = "the NVIDIA management library for Python (nvidia-ml-py) is not installed"
            except Exception as exc:  # pynvml.NVMLError: no driver, no library, no device
                self._unavailable = f"NVML did not start ({exc}): no NVIDIA driver here"
            if self._unavailable:
                log.debug("no GPU metrics: %s", self._unavailable)
        return self._nvml is not None

    def describe(self) -> Iterator[Metric]:
        yield from self._families([])

    def collect(self) -> Iterator[Metric]:
        if not self.probe():
            return
        nvml = self._nvml
        readings = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            except nvml.NVMLError as exc:  # e.g. utilization is not supported on a MIG slice or vGPU
                log.debug("GPU %d skipped in this scrape: %s", index, exc)
                continue
            name = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            readings.append((name, utilization.gpu / 100, float(memory.used), float(memory.total)))
        yield from self._families(readings)

    @staticmethod
    def _families(readings: list[tuple[str, float, float, float]]) -> Iterator[Metric]:
        """Gauges from (uuid, utilization 0..1, memory used, memory total) per GPU."""
        utilization = GaugeMetricFamily(
            "rapidserve_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy.",
            labels=["gpu_uuid"],
        )
        used = GaugeMetricFamily("rapidserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu_uuid"])
        total = GaugeMetricFamily("rapidserve_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu_uuid"])
        for uuid, busy, memory_used, memory_total in readings:
            utilization.add_metric([uuid], busy)
            used.add_metric([uuid], memory_used)
            total.add_metric([uuid], memory_total)
        yield from (utilization, used, total)
