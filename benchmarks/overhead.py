"""Server overhead on a tiny model: rapidserve vs the no-op ceiling, both driven by perf_analyzer.

MLP 64->256->256->10, max batch 32, 1 ms batching delay, batch-1 requests, ONNX Runtime with one
thread. Server pinned to core 0, perf_analyzer to core 1. Prints infer/s, latency percentiles and
the server's CPU microseconds per inference for each load point, and rapidserve's throughput as a
fraction of the no-op ceiling measured in the same run.

    python benchmarks/overhead.py [--client perf_analyzer|rapidserve] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _harness import (
    ROOT,
    ROW_HEADER,
    Server,
    add_client_arguments,
    build_mlp,
    driver,
    in_process,
    print_table,
    table_row,
)

HEADER = [*ROW_HEADER, "x ceiling"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_client_arguments(parser)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    load = driver(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = build_mlp(repo)
        ((rate, p50),) = in_process(model, (64,), [1], core=0).values()
        print(f"in-process ONNX Runtime, batch 1, one thread: {rate:,.0f} infer/s, {p50 * 1000:.1f} us per call")

        def run(server: Server, name: str, streaming: bool, concurrency: int) -> dict[str, float]:
            row = load(server, "mlp", concurrency, streaming, args.interval_ms, Path(tmp))
            rows.append([*table_row(name, streaming, concurrency, row), ""])
            return row

        ceiling: dict[bool, float] = {}
        noop = Server([sys.executable, str(ROOT / "noop_server.py")], ready_line="server ready")
        try:
            for streaming in (False, True):
                ceiling[streaming] = run(noop, "no-op", streaming, max(levels))["Inferences/Second"]
        finally:
            noop.stop()
        server = Server.rapidserve(repo)
        try:
            for concurrency in levels:
                row = run(server, "rapidserve", False, concurrency)
                rows[-1][-1] = f"{row['Inferences/Second'] / ceiling[False]:.2f}"
            row = run(server, "rapidserve", True, max(levels))
            rows[-1][-1] = f"{row['Inferences/Second'] / ceiling[True]:.2f}"
        finally:
            server.stop()
    print_table(f"MLP 64->256->256->10, batch-1 requests ({args.client}, gRPC)", HEADER, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
