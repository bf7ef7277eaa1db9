"""Dynamic batching on a compute-bound CNN: served throughput vs in-process ONNX Runtime.

A ResNet-18-shaped CNN at 3x112x112 with 1000 outputs (random weights), max batch 32, 1 ms batching
delay, batch-1 requests, ONNX Runtime with one thread. In-process ONNX Runtime at batch 1..32 is
measured first on the same core; the efficiency ratio is served infer/s over the best in-process
infer/s. Server pinned to core 0, perf_analyzer to core 1.

    python benchmarks/batching.py [--client perf_analyzer|rapidserve] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _harness import Server, add_client_arguments, build_cnn, driver, in_process, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_client_arguments(parser)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--interval-ms", type=int, default=5000)
    args = parser.parse_args()
    load = driver(args)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = build_cnn(repo)
        local = in_process(model, (3, 112, 112), [1, 8, 16, 32], core=0, seconds=4.0)
        best = max(rate for rate, _ in local.values())
        print_table(
            "in-process ONNX Runtime, one thread, core 0",
            ["batch", "infer/s", "ms per call"],
            [[b, rate, ms] for b, (rate, ms) in local.items()],
        )
        rows = []
        server = Server.rapidserve(repo)
        try:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                row = load(server, "cnn", concurrency, False, args.interval_ms, Path(tmp))
                rows.append(
                    [
                        concurrency,
                        row["Inferences/Second"],
                        row["p50 latency"] / 1000,
                        row["p99 latency"] / 1000,
                        row["cpu_us_per_infer"],
                        f"{row['Inferences/Second'] / best:.2f}",
                    ]
                )
        finally:
            server.stop()
    print_table(
        f"CNN 3x112x112 served by rapidserve, {args.client} (best in-process: {best:,.0f} infer/s)",
        ["conc", "infer/s", "p50 ms", "p99 ms", "cpu us/inf", "x in-process"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
