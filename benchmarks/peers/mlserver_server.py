"""Seldon MLServer serving an ONNX model through ``mlserver_runtime.OnnxModel``, with adaptive
batching and inference in the gRPC process (its best setting on this kind of machine, per the
hot-path issue). Run it with the peers' own environment (``pip install mlserver onnxruntime``):

    python benchmarks/peers/mlserver_server.py MODEL.onnx --name mlp [--grpc-port 0]

Prints ``listening on 127.0.0.1:PORT`` and ``server ready`` once MLServer answers, like ``rapidserve serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import onnxruntime as ort

HERE = Path(__file__).resolve().parent
DATATYPE = {"tensor(float)": "FP32", "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(double)": "FP64"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensors(values: list) -> list[dict]:
    return [
        {"name": v.name, "datatype": DATATYPE[v.type], "shape": [d if isinstance(d, int) else -1 for d in v.shape]}
        for v in values
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-us", type=int, default=1000)
    args = parser.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    grpc_port, http_port = args.grpc_port or free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "settings.json").write_text(json.dumps({
            "grpc_port": grpc_port, "http_port": http_port, "metrics_port": free_port(), "host": "127.0.0.1",
            "parallel_workers": 0, "debug": False,
        }))  # fmt: skip
        model = folder / args.name
        model.mkdir()
        (model / "model-settings.json").write_text(json.dumps({
            "name": args.name, "implementation": "mlserver_runtime.OnnxModel",
            "parameters": {"uri": str(Path(args.model).resolve())},
            "max_batch_size": args.max_batch, "max_batch_time": args.delay_us / 1e6,
            "inputs": tensors(session.get_inputs()), "outputs": tensors(session.get_outputs()),
        }))  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        mlserver = Path(sys.executable).with_name("mlserver")
        child = subprocess.Popen([str(mlserver), "start", str(folder)], env=env)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        print(f"MLServer listening on 127.0.0.1:{grpc_port}", flush=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{args.name}/ready", timeout=2):
                    break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    print("MLServer did not become ready", file=sys.stderr)
                    child.kill()
                    return 1
                time.sleep(0.5)
        print("server ready", flush=True)
        return child.wait()


if __name__ == "__main__":
    raise SystemExit(main())
