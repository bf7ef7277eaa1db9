"""Start ``rapidserve serve`` (the demo) on a free port and wait until it is ready; exit 1 if it is not.

Run with the Python of the environment under test. Readiness is read through the gRPC health service
with rapidserve's own messages and, where tritonclient is installed (the client whose protobuf cap
this check is about), with tritonclient too. ``--protobuf-major-below N`` / ``--protobuf-major-at-least N``
fail the check when the environment's protobuf is not the one the scenario needs.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def serving(url: str) -> bool:
    import grpc

    from rapidserve import protos

    with grpc.insecure_channel(url) as channel:
        check = channel.unary_unary(
            f"/{protos.HEALTH_SERVICE_NAME}/Check",
            request_serializer=protos.HealthCheckRequest.SerializeToString,
            response_deserializer=protos.HealthCheckResponse.FromString,
        )
        return bool(check(protos.HealthCheckRequest(), timeout=10).status == protos.HealthCheckResponse.SERVING)


def triton_ready(url: str) -> bool | None:
    """tritonclient's view of readiness; None where tritonclient is not installed."""
    if importlib.util.find_spec("tritonclient") is None:
        return None
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url)
    try:
        return bool(client.is_server_ready())
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protobuf-major-below", type=int)
    parser.add_argument("--protobuf-major-at-least", type=int)
    args = parser.parse_args()
    import google.protobuf
    import grpc

    version = google.protobuf.__version__
    major = int(version.split(".")[0])
    print(f"protobuf {version}, grpcio {grpc.__version__}", flush=True)
    if args.protobuf_major_below is not None and major >= args.protobuf_major_below:
        print(f"expected protobuf below {args.protobuf_major_below}, found {version}", file=sys.stderr)
        return 1
    if args.protobuf_major_at_least is not None and major < args.protobuf_major_at_least:
        print(f"expected protobuf {args.protobuf_major_at_least} or later, found {version}", file=sys.stderr)
        return 1
    grpc_port = free_port()
    rapidserve = Path(sys.executable).with_name("rapidserve")
    command = [str(rapidserve), "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", "0",
               "--http-port", "0"]  # fmt: skip
    server = subprocess.Popen(command)
    url = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + START_S
    try:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(f"rapidserve serve exited with {server.returncode} before it was ready", file=sys.stderr)
                return 1
            if listening(grpc_port) and serving(url):  # (a channel that failed to connect would back off)
                break
            time.sleep(0.5)
        else:
            print(f"rapidserve serve was not ready within {START_S} s", file=sys.stderr)
            return 1
        if triton_ready(url) is False:
            print("tritonclient says the server is not ready", file=sys.stderr)
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
