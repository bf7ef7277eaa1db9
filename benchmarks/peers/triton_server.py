"""NVIDIA Triton (the real server, bundled by ``nvidia-pytriton``) serving an ONNX model: the model is
a Python function running ONNX Runtime, bound with Triton's dynamic batching (max batch and delay as
rapidserve's). Triton owns the gRPC endpoint, the protocol handling and the batching; inference runs
in pytriton's Python process behind it. Run it with the peers' own environment (``pip install
nvidia-pytriton onnxruntime``; Python 3.12 works, 3.11.7 does not):

    python benchmarks/peers/triton_server.py MODEL.onnx --name mlp [--grpc-port 0]

Prints ``listening on 127.0.0.1:PORT`` and ``server ready`` once Triton serves, like ``rapidserve serve``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sysconfig
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-us", type=int, default=1000)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, Any]:
        return dict(zip(names, session.run(names, inputs), strict=True))

    def spec(v: Any) -> Tensor:
        return Tensor(
            name=v.name, dtype=DTYPES[v.type], shape=tuple(d if isinstance(d, int) else -1 for d in v.shape[1:])
        )

    # Triton's Python backend stub links libpython; a pyenv build keeps it outside the loader's path
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    port = args.grpc_port or free_port()
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=port, http_address="127.0.0.1", http_port=free_port(),
                          metrics_port=free_port())  # fmt: skip
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[spec(v) for v in session.get_inputs()],
            outputs=[spec(v) for v in session.get_outputs()],
            config=ModelConfig(
                max_batch_size=args.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us)
            ),
        )
        triton.run()
        print(f"listening on 127.0.0.1:{port}\nserver ready", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
