"""Start ``rapidserve serve`` (the demo) on free ports and wait until it is ready; exit 1 if it is not.

Run with the Python of the environment under test: readiness is read with tritonclient (the client
whose protobuf cap this check is about), and the gRPC health service is checked with rapidserve's own
messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_S = 300  # the first start trains the demo model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def main() -> int:
    import google.protobuf
    import grpc
    import tritonclient.grpc as triton

    from rapidserve import protos

    print(f"protobuf {google.protobuf.__version__}, grpcio {grpc.__version__}", flush=True)
    grpc_port, metrics_port = free_port(), free_port()
    rapidserve = Path(sys.executable).with_name("rapidserve")
    command = [str(rapidserve), "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    server = subprocess.Popen([*command, "--metrics-port", str(metrics_port)])
    url = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + START_S
    try:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(f"rapidserve serve exited with {server.returncode} before it was ready", file=sys.stderr)
                return 1
            if listening(grpc_port):  # (a channel that failed to connect would back off for long)
                client = triton.InferenceServerClient(url)
                try:
                    if client.is_server_ready():
                        break
                finally:
                    client.close()
            time.sleep(0.5)
        else:
            print(f"rapidserve serve was not ready within {START_S} s", file=sys.stderr)
            return 1
        with grpc.insecure_channel(url) as channel:
            check = channel.unary_unary(
                f"/{protos.HEALTH_SERVICE_NAME}/Check",
                request_serializer=protos.HealthCheckRequest.SerializeToString,
                response_deserializer=protos.HealthCheckResponse.FromString,
            )
            status = check(protos.HealthCheckRequest(), timeout=10).status
        if status != protos.HealthCheckResponse.SERVING:
            print(f"gRPC health says {protos.HealthCheckResponse.ServingStatus.Name(status)}", file=sys.stderr)
            return 1
        print(f"rapidserve serve is ready on {url} (gRPC health: SERVING)", flush=True)
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
