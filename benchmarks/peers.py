"""rapidserve next to its peers on the same models and loads: Seldon MLServer (when installed) runs the
same ONNX files through ONNX Runtime with adaptive batching. Every server pinned to core 0 in turn,
``rapidserve bench`` on core 1.

The peers live in their own environment (their dependencies clash with rapidserve's): make one with
``python -m venv PEERS && PEERS/bin/pip install mlserver onnxruntime`` and pass ``--peers-python
PEERS/bin/python``. NVIDIA Triton through ``nvidia-pytriton`` is not offered: pytriton 0.7.0's Python
backend stub fails to load a model on Python 3.11.7 here (multiprocessing's resource tracker calls
``RLock._recursion_count``, which its embedded interpreter lacks).

    python benchmarks/peers.py --peers-python PEERS/bin/python [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _harness import ROOT, Server, batching_config, bench, build_cnn, build_mlp, in_process, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", required=True, help="the python of an environment with mlserver")
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
        for name, path in models.items():  # the MLServer launcher serves one model
            command = [args.peers_python, str(ROOT / "peers" / "mlserver_server.py"), str(path), "--name", name]
            server = Server(command, ready_line="server ready")
            try:
                measure("MLServer", server, name)
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
