"""Does ``rapidserve bench`` measure what NVIDIA's perf_analyzer measures? Both drive the same running
server and model (the MLP 64->256->256->10), in turn, at the same concurrency levels, from the same
pinned core; the table gives each one's throughput, p50 and p99 and their ratios.

    python benchmarks/agreement.py [--perf-analyzer PATH] [--concurrency 1,16,64] [--streaming]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _harness import Server, bench, build_mlp, find_perf_analyzer, perf_analyzer, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--streaming", action="store_true")
    args = parser.parse_args()
    binary = find_perf_analyzer(args.perf_analyzer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp(repo)
        server = Server.rapidserve(repo)
        try:
            for level in (int(c) for c in args.concurrency.split(",")):
                pa = perf_analyzer(binary, server, "mlp", level, streaming=args.streaming,
                                   interval_ms=args.interval_ms, out=Path(tmp) / "pa.csv")  # fmt: skip
                rs = bench(server, "mlp", concurrency=level, streaming=args.streaming,
                           interval_ms=args.interval_ms, out=Path(tmp) / "rs.json")  # fmt: skip
                ratio = [rs[k] / pa[k] for k in ("Inferences/Second", "p50 latency", "p99 latency")]
                rows.append([
                    level, pa["Inferences/Second"], rs["Inferences/Second"], f"{ratio[0]:.2f}",
                    pa["p50 latency"] / 1000, rs["p50 latency"] / 1000, f"{ratio[1]:.2f}",
                    pa["p99 latency"] / 1000, rs["p99 latency"] / 1000, f"{ratio[2]:.2f}", f"{rs['client_cpu']:.0%}",
                ])  # fmt: skip
        finally:
            server.stop()
    header = ["conc", "PA infer/s", "bench infer/s", "ratio", "PA p50 ms", "bench p50 ms", "ratio",
              "PA p99 ms", "bench p99 ms", "ratio", "bench cpu"]  # fmt: skip
    mode = "ModelStreamInfer" if args.streaming else "unary ModelInfer"
    print_table(f"rapidserve bench vs perf_analyzer, same server, MLP, {mode} (goal: 10% / 10% / 25%)", header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
