"""rapidserve next to its peers on the same models and loads: Seldon MLServer and NVIDIA Triton (each
when installed) serve the same ONNX files through ONNX Runtime with dynamic batching. Every server is
pinned to core 0 in turn, ``rapidserve bench`` on core 1.

The peers live in their own environments (their dependencies clash with rapidserve's):
- MLServer: ``python -m venv MLS && MLS/bin/pip install mlserver onnxruntime``, then ``--mlserver-python
  MLS/bin/python``.
- Triton, through ``nvidia-pytriton`` (which bundles the real server): ``python3.12 -m venv TRI &&
  TRI/bin/pip install nvidia-pytriton onnxruntime``, then ``--triton-python TRI/bin/python``. On Python
  3.11.7 pytriton 0.7.0's Python backend stub fails to load a model (multiprocessing's resource
  tracker calls ``RLock._recursion_count``); 3.12 works.

    python benchmarks/peers.py [--mlserver-python MLS/bin/python] [--triton-python TRI/bin/python]
                               [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _harness import ROOT, Server, batching_config, bench, build_cnn, build_mlp, in_process, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlserver-python", "--peers-python", help="the python of an environment with mlserver")
    parser.add_argument("--triton-python", help="the python of an environment with nvidia-pytriton")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        models = {"mlp": build_mlp(repo), "cnn": build_cnn(repo, config=batching_config())}
        cnn_best = max(rate for rate, _ in in_process(models["cnn"], (3, 112, 112), [16, 32], core=0).values())
        loads = {"mlp": levels, "cnn": [max(levels)]}

        def measure(label: str, server: Server, name: str) -> None:
            for concurrency in loads[name]:
                row = bench(server, name, concurrency=concurrency, interval_ms=args.interval_ms,
                            out=Path(tmp) / "bench.json")  # fmt: skip
                share = f"{row['infer_per_s'] / cnn_best:.2f}" if name == "cnn" else ""
                rows.append([label, name, concurrency, row["infer_per_s"], row["p50_ms"], row["p99_ms"],
                             row["cpu_us_per_infer"], share])  # fmt: skip

        server = Server.rapidserve(repo)
        try:
            for name in models:
                measure("rapidserve", server, name)
        finally:
            server.stop()
        peers = {
            "MLServer": (args.mlserver_python, "mlserver_server.py"),
            "Triton": (args.triton_python, "triton_server.py"),
        }
        for label, (python, launcher) in peers.items():
            if python is None:
                continue
            for name, path in models.items():  # a launcher serves one model
                server = Server(
                    [python, str(ROOT / "peers" / launcher), str(path), "--name", name], ready_line="server ready"
                )
                try:
                    measure(label, server, name)
                finally:
                    server.stop()
    print_table(
        f"Peers, unary gRPC, rapidserve bench (in-process ONNX Runtime best on the CNN: {cnn_best:,.0f} infer/s)",
        ["server", "model", "conc", "infer/s", "p50 ms", "p99 ms", "cpu us/inf", "x in-process"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
