"""In-process benchmark of one variant: p50/p99 latency at batch 1, throughput per batch size, and
the resident memory it added while loaded and running. Every variant runs in this same process, on
the same data, with the same thread count, the original's figures measured in the same run."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.runners import Runner

__all__ = ["benchmark", "resident_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _timed(run: Runner, batch: dict[str, Any], seconds: float, max_calls: int) -> list[float]:
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        run(batch)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < end):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return times


def benchmark(
    make_runner: Callable[[], Runner], data: Dataset, batch_sizes: Sequence[int], seconds: float = 1.0
) -> dict[str, Any]:
    gc.collect()
    before = resident_bytes()
    run = make_runner()
    peak = resident_bytes()
    single = np.array(_timed(run, data.rows(1), seconds, 5000)) * 1000
    peak = max(peak, resident_bytes())
    throughput: dict[str, float] = {}
    for size in batch_sizes:
        times = _timed(run, data.rows(size), seconds, 5000)
        throughput[str(size)] = round(size * len(times) / sum(times), 1)
        peak = max(peak, resident_bytes())
    return {
        "p50_ms_batch1": round(float(np.percentile(single, 50)), 4),
        "p99_ms_batch1": round(float(np.percentile(single, 99)), 4),
        "throughput_per_s": throughput,
        "memory_added_mb": round(max(peak - before, 0) / 2**20, 1),
    }
