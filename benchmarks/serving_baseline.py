"""Baseline: single requests on a tiny model, measured with NVIDIA's perf_analyzer.

Builds an MLP 64->256->256->10 (random weights) as an ONNX model, serves it with `rapidserve serve`
pinned to one core, and drives it with perf_analyzer (gRPC, unary, batch 1) pinned to another core
at each concurrency. In-process ONNX Runtime on the same core gives the floor. Prints a table.

    python benchmarks/serving_baseline.py --perf-analyzer /path/to/perf_analyzer [--concurrency 1,16]

Install perf_analyzer with ../shared/tools/install-perf-analyzer DIR (or have it on PATH).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = """
backend: "onnxruntime"
max_batch_size: 32
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def build_mlp(repo: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [64, 256, 256, 10]
    nodes, inits, prev = [], [], "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / "mlp" / "1").mkdir(parents=True)
    (repo / "mlp" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (repo / "mlp" / "config.pbtxt").write_text(CONFIG)
    return repo / "mlp" / "1" / "model.onnx"


def in_process_latency(model: Path, core: int, seconds: float = 3.0) -> tuple[float, float, float]:
    """(infer/s, p50 ms, p99 ms) of ONNX Runtime called in a loop at batch 1 on one core."""
    import onnxruntime as ort

    os.sched_setaffinity(0, {core})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    for _ in range(200):
        session.run(None, {"x": x})
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    ms = np.array(times) * 1000
    return len(times) / sum(times), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def start_server(repo: Path, core: int) -> tuple[subprocess.Popen[str], int]:
    serve = ["serve", "--model-repository", str(repo), "--host", "127.0.0.1", "--grpc-port", "0"]
    command = ["taskset", "-c", str(core), sys.executable, "-m", "rapidserve", *serve]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        if "model 'mlp' ready" in line:
            return proc, port
    raise RuntimeError("server exited before the model was ready")


def perf_analyzer(binary: str, port: int, concurrency: int, core: int, out: Path, stability: int) -> dict[str, float]:
    command = [
        "taskset",
        "-c",
        str(core),
        binary,
        "-m",
        "mlp",
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        "grpc",
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        "5000",
        "--stability-percentage",
        str(stability),
        "--max-trials",
        "10",
        "-f",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{result.stdout}\n{result.stderr}")
    with out.open() as f:
        row = next(csv.DictReader(f))
    return {key: float(value) for key, value in row.items() if value not in ("", None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer", default=os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer"))
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--stability-percentage", type=int, default=15, help="perf_analyzer's (10 is its default)")
    args = parser.parse_args()
    if not args.perf_analyzer:
        parser.error(
            "perf_analyzer not found: pass --perf-analyzer or install it with shared/tools/install-perf-analyzer"
        )
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = build_mlp(repo)
        rate, p50, p99 = in_process_latency(model, core=0)
        print(
            f"in-process ONNX Runtime, batch 1, 1 thread on core 0: {rate:,.0f} infer/s, "
            f"p50 {p50:.3f} ms, p99 {p99:.3f} ms\n"
        )
        proc, port = start_server(repo, core=0)
        try:
            header = (
                f"{'concurrency':>11} {'infer/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} | "
                f"server us: {'queue':>6} {'in':>6} {'infer':>6} {'out':>6}"
            )
            print(header)
            print("-" * len(header))
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                row = perf_analyzer(
                    args.perf_analyzer,
                    port,
                    concurrency,
                    core=1,
                    out=Path(tmp) / f"c{concurrency}.csv",
                    stability=args.stability_percentage,
                )
                print(
                    f"{concurrency:>11} {row['Inferences/Second']:>9,.0f} {row['p50 latency'] / 1000:>7.2f} "
                    f"{row['p90 latency'] / 1000:>7.2f} {row['p99 latency'] / 1000:>7.2f} |            "
                    f"{row['Server Queue']:>6.0f} {row['Server Compute Input']:>6.0f} "
                    f"{row['Server Compute Infer']:>6.0f} {row['Server Compute Output']:>6.0f}"
                )
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
