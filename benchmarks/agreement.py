"""Does ``rapidserve bench`` measure what NVIDIA's perf_analyzer measures? Both drive the same running
server and model (the MLP 64->256->256->10), in turn, at the same concurrency levels, from the same
pinned core. A small VM drifts over minutes, so each level is measured in ``--rounds`` pairs in
ABBA order (perf_analyzer, bench, bench, perf_analyzer, ...) and the table compares the means; every
single run is printed below it.

    python benchmarks/agreement.py [--perf-analyzer PATH] [--concurrency 1,16,64] [--rounds 2] [--streaming]
                                   [--pa-async]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _harness import Server, bench, build_mlp, find_perf_analyzer, perf_analyzer, print_table

KEYS = ("Inferences/Second", "p50 latency", "p99 latency")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2, help="measurement pairs per level (ABBA order)")
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--pa-async", action="store_true", help="run perf_analyzer with --async")
    args = parser.parse_args()
    binary = find_perf_analyzer(args.perf_analyzer)
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp(repo)
        server = Server.rapidserve(repo)

        def measure(client: str, level: int) -> dict[str, float]:
            if client == "perf_analyzer":
                return perf_analyzer(binary, server, "mlp", level, streaming=args.streaming, async_mode=args.pa_async,
                                     interval_ms=args.interval_ms, out=Path(tmp) / "pa.csv")  # fmt: skip
            return bench(server, "mlp", concurrency=level, streaming=args.streaming,
                         interval_ms=args.interval_ms, out=Path(tmp) / "rs.json")  # fmt: skip

        try:
            for level in (int(c) for c in args.concurrency.split(",")):
                got: dict[str, list[dict[str, float]]] = {"perf_analyzer": [], "rapidserve": []}
                for i in range(args.rounds):
                    for client in ("perf_analyzer", "rapidserve")[:: 1 if i % 2 == 0 else -1]:
                        row = measure(client, level)
                        got[client].append(row)
                        runs.append([level, client, row[KEYS[0]], row[KEYS[1]] / 1000, row[KEYS[2]] / 1000,
                                     f"{row['client_cpu_run']:.0%}"])  # fmt: skip
                pa = {k: float(np.mean([r[k] for r in got["perf_analyzer"]])) for k in KEYS}
                rs = {k: float(np.mean([r[k] for r in got["rapidserve"]])) for k in KEYS}
                cpu = [float(np.mean([r["client_cpu_run"] for r in got[c]])) for c in got]
                ratio = [rs[k] / pa[k] for k in KEYS]
                rows.append([
                    level, pa[KEYS[0]], rs[KEYS[0]], f"{ratio[0]:.2f}",
                    pa[KEYS[1]] / 1000, rs[KEYS[1]] / 1000, f"{ratio[1]:.2f}",
                    pa[KEYS[2]] / 1000, rs[KEYS[2]] / 1000, f"{ratio[2]:.2f}", f"{cpu[0]:.0%}", f"{cpu[1]:.0%}",
                ])  # fmt: skip
        finally:
            server.stop()
    header = ["conc", "PA infer/s", "bench infer/s", "ratio", "PA p50 ms", "bench p50 ms", "ratio",
              "PA p99 ms", "bench p99 ms", "ratio", "PA cpu", "bench cpu"]  # fmt: skip
    mode = "ModelStreamInfer" if args.streaming else "unary ModelInfer"
    mode += ", perf_analyzer --async" if args.pa_async else ", perf_analyzer's default sync threads"
    print_table(f"rapidserve bench vs perf_analyzer, same server, MLP, {mode}, means of {args.rounds} runs each "
                "(goal: 10% / 10% / 25%)", header, rows)  # fmt: skip
    print_table("every run, in the order measured (cpu: the client's, its whole run)",
                ["conc", "client", "infer/s", "p50 ms", "p99 ms", "cpu"], runs)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
