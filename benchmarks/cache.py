"""Prediction cache: hits vs the miss path vs the no-op ceiling, unary and streaming.

The MLP of overhead.py served twice: "mlp" without a cache (every request computed) and "mlp_cached"
with ``response_cache { enable: true }``. perf_analyzer sends the same input every time, so after the
first request every call to mlp_cached is a hit. Server pinned to core 0, perf_analyzer to core 1.

    python benchmarks/cache.py [--perf-analyzer PATH] [--concurrency 16,64]
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
    batching_config,
    build_mlp,
    find_perf_analyzer,
    perf_analyzer,
    print_table,
    table_row,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    binary = find_perf_analyzer(args.perf_analyzer)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp(repo)
        build_mlp(repo, "mlp_cached", batching_config(cache=True))

        def run(server: Server, label: str, model: str, streaming: bool, concurrency: int) -> None:
            row = perf_analyzer(
                binary,
                server,
                model,
                concurrency,
                streaming=streaming,
                interval_ms=args.interval_ms,
                out=Path(tmp) / "pa.csv",
            )
            rows.append(table_row(label, streaming, concurrency, row))

        noop = Server([sys.executable, str(ROOT / "noop_server.py")], ready_line="server ready")
        try:
            for streaming in (False, True):
                run(noop, "no-op ceiling", "mlp", streaming, max(levels))
        finally:
            noop.stop()
        server = Server.rapidserve(repo)
        try:
            for streaming in (False, True):
                for concurrency in levels:
                    run(server, "miss path (no cache)", "mlp", streaming, concurrency)
                    run(server, "cache hits", "mlp_cached", streaming, concurrency)
        finally:
            server.stop()
    print_table(
        "MLP, identical inputs (perf_analyzer, gRPC)",
        ROW_HEADER,
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
