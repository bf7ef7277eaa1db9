"""HTTP/REST beside gRPC: the same server, models and load generator (perf_analyzer -i http / -i grpc).

One rapidserve server (core 0) serves the MLP of overhead.py and the CNN of batching.py on both ports;
perf_analyzer (core 1) loads each model over each protocol at each concurrency, the protocols
alternating within a point (gRPC, HTTP, then HTTP, gRPC, ...), so that the ratios HTTP/gRPC come
from measurements taken side by side. perf_analyzer sends HTTP tensors with the binary data extension.

    python benchmarks/http_vs_grpc.py [--models mlp,cnn] [--concurrency 1,16,64] [--rounds 2]
                                      [--interval-ms 3000] [--stability 15] [--perf-analyzer PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _harness import Server, build_cnn, build_mlp, find_perf_analyzer, perf_analyzer, print_table

PROTOCOLS = ("grpc", "http")
COLUMNS = ("Inferences/Second", "p50 latency", "p99 latency", "cpu_us_per_infer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each protocol per point")
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--stability", type=int, default=15, help="perf_analyzer's --stability-percentage")
    parser.add_argument("--perf-analyzer", help="perf_analyzer's path (default: PERF_ANALYZER or PATH)")
    args = parser.parse_args()
    binary = find_perf_analyzer(args.perf_analyzer)
    models = args.models.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        builders = {"mlp": build_mlp, "cnn": build_cnn}
        for name in models:
            builders[name](repo)
        server = Server.rapidserve(repo)
        try:
            for name in models:
                for concurrency in levels:
                    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PROTOCOLS}
                    for round_ in range(args.rounds):
                        for protocol in PROTOCOLS if round_ % 2 == 0 else PROTOCOLS[::-1]:
                            row = perf_analyzer(
                                binary, server, name, concurrency, protocol=protocol,
                                interval_ms=args.interval_ms, stability=args.stability, out=Path(tmp) / "pa.csv",
                            )  # fmt: skip
                            runs[protocol].append(row)
                    mean = {p: {c: float(np.mean([r[c] for r in runs[p]])) for c in COLUMNS} for p in PROTOCOLS}
                    relaxed = any(r["relaxed"] for p in PROTOCOLS for r in runs[p])
                    grpc, http = mean["grpc"], mean["http"]
                    rows.append(
                        [name, concurrency,
                         grpc["Inferences/Second"], http["Inferences/Second"],
                         f"{http['Inferences/Second'] / grpc['Inferences/Second']:.2f}",
                         grpc["p50 latency"] / 1000, http["p50 latency"] / 1000,
                         f"{http['p50 latency'] / grpc['p50 latency']:.2f}",
                         f"{http['p99 latency'] / grpc['p99 latency']:.2f}",
                         grpc["cpu_us_per_infer"], http["cpu_us_per_infer"],
                         f"{http['cpu_us_per_infer'] / grpc['cpu_us_per_infer']:.2f}",
                         "*" if relaxed else ""]
                    )  # fmt: skip
        finally:
            server.stop()
    print_table(
        f"rapidserve over HTTP and gRPC, perf_analyzer, means of {args.rounds} runs per protocol "
        "(x: HTTP/gRPC; *: a run needed perf_analyzer's relaxed retry)",
        ["model", "conc", "grpc inf/s", "http inf/s", "x inf/s", "grpc p50 ms", "http p50 ms", "x p50", "x p99",
         "grpc cpu us", "http cpu us", "x cpu", ""],
        rows,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
