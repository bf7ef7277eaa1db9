"""Prediction cache: throughput and latency as more requests repeat, from all misses to all hits.

The MLP of overhead.py with ``response_cache { enable: true }``, driven by ``rapidserve bench`` with
``--duplicate-ratio`` 0, 0.5, 0.9 and 1.0 (a repeat is one of the last 256 distinct inputs, so it
is in the cache), unary and streaming, next to the no-op ceiling of noop_server.py measured in the
same run. Server pinned to core 0, the client to core 1.

    python benchmarks/cache.py [--concurrency 16] [--ratios 0,0.5,0.9,1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _harness import ROOT, Server, batching_config, bench, build_mlp, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ratios", default="0,0.5,0.9,1")
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp(repo, "mlp", batching_config(cache=True))
        out = Path(tmp) / "bench.json"
        ceiling = {}
        noop = Server([sys.executable, str(ROOT / "noop_server.py")], ready_line="server ready")
        try:
            for streaming in (False, True):
                row = bench(noop, "mlp", concurrency=args.concurrency, streaming=streaming,
                            interval_ms=args.interval_ms, out=out)  # fmt: skip
                ceiling[streaming] = row["infer_per_s"]
                rows.append(["no-op ceiling", "stream" if streaming else "unary", "-", row["infer_per_s"],
                             row["p50_ms"], row["p99_ms"], row["cpu_us_per_infer"], "-", ""])  # fmt: skip
        finally:
            noop.stop()
        server = Server.rapidserve(repo)
        try:
            for streaming in (False, True):
                for ratio in (float(r) for r in args.ratios.split(",")):
                    duplicates = ["--duplicate-ratio", str(ratio)]
                    row = bench(server, "mlp", concurrency=args.concurrency, streaming=streaming,
                                interval_ms=args.interval_ms, extra=duplicates, out=out)  # fmt: skip
                    hits = row.get("server_cache_hit_ratio")
                    rows.append(["rapidserve", "stream" if streaming else "unary", ratio, row["infer_per_s"],
                                 row["p50_ms"], row["p99_ms"], row["cpu_us_per_infer"],
                                 "-" if hits is None else f"{hits:.0%}",
                                 f"{row['infer_per_s'] / ceiling[streaming]:.2f}"])  # fmt: skip
        finally:
            server.stop()
    print_table(
        f"MLP with response_cache, {args.concurrency} concurrent (rapidserve bench, gRPC)",
        ["server", "mode", "dup ratio", "infer/s", "p50 ms", "p99 ms", "cpu us/inf", "hits", "x ceiling"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
