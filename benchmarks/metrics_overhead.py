"""What recording metrics costs per request: the recording calls alone, and the whole request path
with and without them, measured in one run.

The request path is rapidserve's own (servicer -> decode -> batcher -> ONNX Runtime -> encode) on the
tiny MLP (64->256->256->10), driven in-process by 64 concurrent coroutines on uvloop, pinned to one
core: no gRPC, so the recording cost is a larger share of it than of a served request (whose gRPC
call adds ~250-350 us of CPU on this kind of machine; see overhead.py). Variants, interleaved over
several rounds (medians reported):

- full: what the server records (statistics counters, Prometheus histograms, percentile windows);
- counters only: the statistics-extension counters alone, as before metrics existed;
- nothing: every recording method a no-op.

With perf_analyzer at hand (``--perf-analyzer``, ``PERF_ANALYZER`` or on PATH), it also serves the MLP
(server pinned to core 0, perf_analyzer on core 1, 64 concurrent, unary and streaming) and reports the
recording calls as a share of the server CPU per request measured there.

    python benchmarks/metrics_overhead.py [--requests 20000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import timeit
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from _harness import Server, build_mlp, find_perf_analyzer, perf_analyzer, print_table

from rapidserve import protos
from rapidserve.server.manager import ModelManager
from rapidserve.server.servicer import InferenceServicer
from rapidserve.server.stats import ModelStats
from rapidserve.server.transport import serialize

FULL = {name: getattr(ModelStats, name) for name in ("succeeded", "queued", "record_execution", "failed")}


def _counters_succeeded(self: ModelStats, ns: int) -> None:
    self.success.add(ns)


def _counters_queued(self: ModelStats, ns: int) -> None:
    self.queue.add(ns)


def _counters_execution(self: ModelStats, requests: int, size: int, input_ns: int, infer_ns: int, out_ns: int) -> None:
    self.inference_count += size
    self.execution_count += 1
    self.compute_input.add(input_ns * requests, requests)
    self.compute_infer.add(infer_ns * requests, requests)
    self.compute_output.add(out_ns * requests, requests)


def _nothing(*args: Any) -> None:
    return None


VARIANTS = {
    "full": FULL,
    "counters only": {
        "succeeded": _counters_succeeded,
        "queued": _counters_queued,
        "record_execution": _counters_execution,
        "failed": FULL["failed"],
    },
    "nothing": dict.fromkeys(FULL, _nothing),
}


@contextmanager
def variant(name: str) -> Any:
    for attr, fn in VARIANTS[name].items():
        setattr(ModelStats, attr, fn)
    try:
        yield
    finally:
        for attr, fn in FULL.items():
            setattr(ModelStats, attr, fn)


def recording_calls_us(batch: int) -> float:
    """CPU microseconds of the calls one request makes, with its share of its batch's call."""
    stats = ModelStats()
    number = 100_000

    def one_request() -> None:
        stats.queued(120_000)
        stats.succeeded(450_000)

    def one_batch() -> None:
        stats.record_execution(batch, batch, 2_000, 60_000, 5_000)

    per_request = min(timeit.repeat(one_request, number=number, repeat=5)) / number
    per_batch = min(timeit.repeat(one_batch, number=number, repeat=5)) / number
    return (per_request + per_batch / batch) * 1e6


async def request_path_us(repo: Path, requests: int, rounds: int, concurrency: int = 64) -> dict[str, list[float]]:
    manager = ModelManager([repo])
    await manager.start()
    servicer = InferenceServicer(manager)
    message = protos.ModelInferRequest(model_name="mlp")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    wire = message.SerializeToString()

    async def client(count: int) -> None:
        for _ in range(count):
            serialize(await servicer.inference.infer(protos.ModelInferRequest.FromString(wire), None, len(wire)))

    async def run(count: int) -> float:
        start = time.process_time()
        await asyncio.gather(*(client(count // concurrency) for _ in range(concurrency)))
        return (time.process_time() - start) / (count // concurrency * concurrency) * 1e6

    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    await run(requests // 4)  # warm-up
    for _ in range(rounds):
        for name in VARIANTS:
            with variant(name):
                results[name].append(await run(requests))
    await manager.stop()
    return results


def _counts(url: str) -> tuple[int, int]:
    from rapidserve import Client

    with Client(url) as client:
        stats = client.model_statistics("mlp").model_stats[0]
    return int(stats.inference_count), int(stats.execution_count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--perf-analyzer")
    args = parser.parse_args()
    try:
        binary: str | None = find_perf_analyzer(args.perf_analyzer)
    except SystemExit:
        binary = None
    os.sched_setaffinity(0, {0})
    rows = [[f"recording calls, batch {b}", f"{recording_calls_us(b):.2f}", ""] for b in (1, 8, 32)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp(repo)
        results = uvloop.run(request_path_us(repo, args.requests, args.rounds))
        medians = {name: statistics.median(values) for name, values in results.items()}
        for name, value in medians.items():
            share = (medians["full"] - value) / medians["full"]
            rows.append([f"request path, {name}", f"{value:.1f}", f"{share:.1%}" if name != "full" else ""])
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        if binary is not None:
            server = Server.rapidserve(repo)
            try:
                for streaming in (False, True):
                    before = _counts(server.url)
                    row = perf_analyzer(binary, server, "mlp", 64, streaming=streaming, out=Path(tmp) / "pa.csv")
                    inferences, executions = (a - b for a, b in zip(_counts(server.url), before, strict=True))
                    batch = max(1, round(inferences / max(executions, 1)))
                    served = row["cpu_us_per_infer"]
                    recording = recording_calls_us(batch)
                    mode = "stream" if streaming else "unary"
                    rows.append([f"served, {mode} 64: server CPU", f"{served:.0f}", ""])
                    share = f"{recording / served:.1%}"
                    rows.append([f"  recording at its mean batch {batch}", f"{recording:.2f}", share])
            finally:
                server.stop()
    print_table(
        f"Metrics recording cost (one core; request path in-process, {args.rounds} interleaved rounds of "
        f"{args.requests:,} requests at concurrency 64, medians; 'share' = the part of the full path's CPU "
        "that the variant saves, or the recording calls' part of a served request's CPU)",
        ["what", "cpu us per request", "share"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
