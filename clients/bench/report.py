"""What ``rapidserve bench`` reports: the table it prints, the CSV or JSON it writes, the plot it draws."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "plot", "print_table", "require_matplotlib", "write_rows"]

COLUMNS = [
    "mode", "concurrency", "request_rate", "infer_per_s", "requests_per_s", "p50_ms", "p90_ms", "p95_ms",
    "p99_ms", "p999_ms", "mean_ms", "errors", "stable", "met_p99_bound", "client_cpu", "server_queue_us",
    "server_compute_input_us", "server_compute_infer_us", "server_compute_output_us", "server_avg_batch",
    "server_cache_hit_ratio", "protocol",
]  # fmt: skip


def require_matplotlib() -> None:
    """Fail before the run, in one line naming the extra that provides it, when ``--plot`` cannot draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f'--plot needs matplotlib, which is not installed; pip install "rapidserve[{_plot_extra()}]" provides it'
        ) from None


def _plot_extra() -> str:
    """The extra of this distribution that lists matplotlib (read from the installed metadata)."""
    try:
        requirements = importlib.metadata.requires("rapidserve") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        found = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if found and re.match(r"matplotlib\b", name.strip()):
            return found.group(1)
    return "torch"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    level = "rate/s" if rows and rows[0]["mode"] == "request_rate" else "conc"
    header = [level, "infer/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "mean ms", "errors", "| queue us",
              "infer us", "batch", "cache hit", "| client cpu"]  # fmt: skip
    table = [header]
    for r in rows:
        errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        hit = r.get("server_cache_hit_ratio")
        table.append([
            _fmt(r["concurrency"] or r["request_rate"]), _fmt(r["infer_per_s"]), _fmt(r["p50_ms"]),
            _fmt(r["p90_ms"]), _fmt(r["p99_ms"]), _fmt(r["p999_ms"]), _fmt(r["mean_ms"]), errors,
            "| " + _fmt(r.get("server_queue_us"), 0), _fmt(r.get("server_compute_infer_us"), 0),
            _fmt(r.get("server_avg_batch"), 1), "-" if hit is None else f"{hit:.0%}", f"| {r['client_cpu']:.0%}",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    via = "ModelStreamInfer streams" if args.streaming else "unary ModelInfer"
    if str(args.url).startswith(("http://", "https://")):
        via = "HTTP/1.1 keep-alive, binary tensor data"
    print(f"\n{args.model} at {args.url}, {via}, batch {args.batch_size} "
          "(server columns: its statistics over the whole load point, warm-up included)")  # fmt: skip
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    if path.suffix == ".json":
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        path.write_text(json.dumps(clean, indent=2, default=str) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "errors": json.dumps(row["errors"])})


def plot(rows: list[dict[str, Any]], path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    throughput = [r["infer_per_s"] for r in rows]
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        axis.plot(throughput, [r[key] for r in rows], marker="o", label=label)
    for r in rows:
        axis.annotate(_fmt(r["concurrency"] or r["request_rate"]), (r["infer_per_s"], r["p50_ms"]),
                      textcoords="offset points", xytext=(3, -12), fontsize=8)  # fmt: skip
    axis.set_xlabel("throughput (inferences/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(f"latency percentiles vs throughput ({'concurrency' if mode == 'concurrency' else 'request rate'})")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
