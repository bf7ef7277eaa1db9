"""What a load generator's own client costs at one request in flight, where every microsecond it
spends is added to the latency it reports. One server (the MLP on rapidserve, or the no-op server with
``--noop``), pinned to core 0; each client in turn on core 1 sends the same serialized request in a
loop, and the table gives p50/p99 latency and the client's CPU per call, next to perf_analyzer (C++)
measured in the same run, before and after the Python clients.

Clients: grpcio's blocking call and its asyncio call (both with raw bytes, no protobuf work), and the
lean HTTP/2 client ``rapidserve bench`` uses (``rapidserve.clients._h2grpc``) on uvloop.

    python benchmarks/client_overhead.py [--perf-analyzer PATH] [--calls 5000] [--noop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import ROOT, Server, build_mlp, find_perf_analyzer, perf_analyzer, print_table

KINDS = ("grpcio-blocking", "grpcio-asyncio", "h2grpc-uvloop")


def _request() -> tuple[str, bytes]:
    from rapidserve import protos

    request = protos.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.random.default_rng(0).random((1, 64), dtype=np.float32).tobytes())
    return protos.method_path("ModelInfer"), request.SerializeToString()


def client_loop(url: str, kind: str, calls: int) -> dict[str, float]:
    """Runs in the pinned child process: ``calls`` sequential calls, the first fifth as warm-up."""
    import grpc

    path, data = _request()
    latencies: list[float] = []
    clock = time.perf_counter
    cpu = 0.0
    if kind == "grpcio-blocking":
        with grpc.insecure_channel(url) as channel:
            call = channel.unary_unary(path)
            call(data)
            cpu = time.process_time()
            for _ in range(calls):
                start = clock()
                call(data)
                latencies.append(clock() - start)
            cpu = time.process_time() - cpu
    else:

        async def loop() -> float:
            if kind == "grpcio-asyncio":
                channel = grpc.aio.insecure_channel(url)
                call = channel.unary_unary(path)

                async def send() -> None:
                    await call(data)
            else:
                from rapidserve.clients._h2grpc import Connection

                connection = await Connection.open(url)

                async def send() -> None:
                    reply = await connection.unary(path, data)
                    assert reply.response is not None, reply

            await send()
            cpu = time.process_time()
            for _ in range(calls):
                start = clock()
                await send()
                latencies.append(clock() - start)
            return time.process_time() - cpu

        if kind == "grpcio-asyncio":  # grpc.aio on the standard loop, as its users run it
            cpu = asyncio.run(loop())
        else:
            import uvloop

            cpu = uvloop.run(loop())
    measured = np.array(latencies[calls // 5 :]) * 1000
    return {"p50": float(np.median(measured)), "p99": float(np.percentile(measured, 99)), "cpu_us": cpu / calls * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--noop", action="store_true", help="against the no-op server instead of the MLP")
    parser.add_argument("--child", nargs=2, metavar=("URL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(client_loop(args.child[0], args.child[1], args.calls)))
        return 0
    binary = find_perf_analyzer(args.perf_analyzer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.noop:
            server = Server([sys.executable, str(ROOT / "noop_server.py")], ready_line="server ready")
        else:
            build_mlp(Path(tmp) / "repo")
            server = Server.rapidserve(Path(tmp) / "repo")
        try:

            def reference(label: str) -> None:
                pa = perf_analyzer(binary, server, "mlp", 1, interval_ms=2000, out=Path(tmp) / "pa.csv")
                rows.append([label, pa["p50 latency"] / 1000, pa["p99 latency"] / 1000, "", ""])

            reference("perf_analyzer (C++), before")
            for kind in KINDS:
                command = ["taskset", "-c", "1", sys.executable, __file__, "--child", server.url, kind,
                           "--calls", str(args.calls)]  # fmt: skip
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                rows.append([kind, result["p50"], result["p99"], f"{result['cpu_us']:.0f}", ""])
            reference("perf_analyzer (C++), after")
        finally:
            server.stop()
    pa_p50 = (rows[0][1] + rows[-1][1]) / 2
    for row in rows:
        row[4] = f"{row[1] / pa_p50:.2f}"
    target = "the no-op server" if args.noop else "rapidserve, MLP"
    print_table(f"one request in flight against {target}: latency (ms) and client CPU per call",
                ["client", "p50 ms", "p99 ms", "client CPU us/call", "p50 / perf_analyzer's"], rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
