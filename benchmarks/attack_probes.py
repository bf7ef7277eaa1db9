"""The hostile-caller probes at full size, against a real server process: what each costs the server
(peak RSS from /proc, the worst ServerLive latency while it runs, how long until it is over).

Probes: one 1.5 GB message; a 180 MB BYTES tensor sent to an FP32 input; 8 concurrent 256 MB requests
(1 GiB in-flight budget); 5,000 TCP connections that never send the HTTP/2 preface; SIGTERM with open
streams. ``--python`` runs the server from another environment (an older version, to compare in one run);
flags an older server does not know are left out with ``--legacy``.

    python benchmarks/attack_probes.py [--python PATH] [--legacy] [--skip stalled]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testmodels import SUM_CONFIG, sum_graph, write_model  # noqa: E402

from rapidserve import protos  # noqa: E402

MiB = 2**20
INFER = protos.method_path("ModelInfer")


class Server:
    def __init__(self, python: str, repo: Path, *args: str) -> None:
        command = [python, "-m", "rapidserve", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                   "--grpc-port", "0", "--no-metrics", *args]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
        self.log = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log += line
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                self.url = f"127.0.0.1:{found.group(1)}"
                break
        else:
            raise RuntimeError(self.log)
        threading.Thread(target=self._drain_log, daemon=True).start()
        self.channel = grpc.insecure_channel(self.url, options=[("grpc.max_send_message_length", 2**31 - 1)])
        self.infer = self.channel.unary_unary(INFER)
        while True:
            try:
                self.infer(sum_request(4), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        self.baseline_mb = self.memory_mb("VmRSS")

    def _drain_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log += line

    def memory_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def call(self, data: bytes, timeout_s: float = 120) -> str:
        try:
            self.infer(data, timeout=timeout_s)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Liveness:
    """ServerLive every 20 ms from a process of its own (so that the probe's own sending cannot delay
    it); the worst latency seen is how long the server's event loop stalled."""

    def __init__(self, url: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--poll-live", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "polling": the first call has been answered

    def stop(self) -> float:
        worst, _ = self._proc.communicate("", timeout=180)
        return float(worst)


def poll_live(url: str) -> None:
    """The body of ``Liveness``'s process: poll until stdin closes, then print the worst seconds."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    request = protos.ServerLiveRequest().SerializeToString()
    worst = 0.0
    with grpc.insecure_channel(url) as channel:
        live = channel.unary_unary(protos.method_path("ServerLive"))
        live(request, timeout=30)
        print("polling", flush=True)
        while not stop.is_set():
            start = time.monotonic()
            with contextlib.suppress(grpc.RpcError):
                live(request, timeout=120)
            worst = max(worst, time.monotonic() - start)
            stop.wait(0.02)
    print(worst, flush=True)


def sum_request(count: int) -> bytes:
    request = protos.ModelInferRequest(model_name="sum")
    request.inputs.add(name="x", datatype="FP32", shape=[count])
    request.raw_input_contents.append(np.ones(count, np.float32).tobytes())
    return request.SerializeToString()


def bytes_request(total_bytes: int) -> bytes:
    """A BYTES tensor of empty strings (4-byte length prefixes only): the most elements per byte."""
    count = total_bytes // 4
    request = protos.ModelInferRequest(model_name="sum")
    request.inputs.add(name="x", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(bytes(count * 4))
    return request.SerializeToString()


def probe_big_message(python: str, repo: Path, legacy: bool) -> list[str]:
    server = Server(python, repo)
    try:
        data = sum_request(1536 * MiB // 4)
        live = Liveness(server.url)
        start = time.monotonic()
        outcome = server.call(data)
        took = time.monotonic() - start
        return ["1.5 GB message", outcome, f"{server.memory_mb('VmHWM') - server.baseline_mb:,.0f}",
                f"{live.stop() * 1e3:,.0f}", f"{took:.1f}"]  # fmt: skip
    finally:
        server.stop()


def probe_bytes_to_fp32(python: str, repo: Path, legacy: bool) -> list[str]:
    server = Server(python, repo, "--grpc-max-message-bytes", str(256 * MiB))
    try:
        data = bytes_request(180 * 10**6)
        live = Liveness(server.url)
        start = time.monotonic()
        outcome = server.call(data)
        took = time.monotonic() - start
        growth = server.memory_mb("VmHWM") - server.baseline_mb
        return ["180 MB BYTES tensor to an FP32 input", outcome, f"{growth:,.0f}", f"{live.stop() * 1e3:,.0f}",
                f"{took:.1f}"]  # fmt: skip
    finally:
        server.stop()


def probe_concurrent(python: str, repo: Path, legacy: bool) -> list[str]:
    args = ["--grpc-max-message-bytes", str(300 * MiB)] + ([] if legacy else ["--max-inflight-bytes", str(2**30)])
    server = Server(python, repo, *args)
    try:
        data = sum_request(256 * MiB // 4)
        outcomes: list[str] = []
        live = Liveness(server.url)
        start = time.monotonic()
        threads = [threading.Thread(target=lambda: outcomes.append(server.call(data))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.monotonic() - start
        summary = ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes)))
        return ["8 x 256 MB at once (1 GiB budget)", summary, f"{server.memory_mb('VmHWM') - server.baseline_mb:,.0f}",
                f"{live.stop() * 1e3:,.0f}", f"{took:.1f}"]  # fmt: skip
    finally:
        server.stop()


def probe_stalled(python: str, repo: Path, legacy: bool) -> list[str]:
    server = Server(python, repo)
    host, port = server.url.rsplit(":", 1)
    sockets = [socket.create_connection((host, int(port))) for _ in range(5000)]
    try:
        live = Liveness(server.url)
        healthy_start = time.monotonic()
        outcome = server.call(sum_request(4), timeout_s=30)
        healthy_ms = (time.monotonic() - healthy_start) * 1e3
        start = time.monotonic()
        for sock in sockets:
            sock.settimeout(max(start + 200 - time.monotonic(), 0.01))
            try:
                while sock.recv(4096):
                    pass
            except TimeoutError:
                break
        closed_after = time.monotonic() - start
        return ["5,000 connections without a preface", f"healthy call {outcome} in {healthy_ms:.0f} ms",
                f"{server.memory_mb('VmHWM') - server.baseline_mb:,.0f}", f"{live.stop() * 1e3:,.0f}",
                f"all closed after {closed_after:.0f}"]  # fmt: skip
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def probe_drain(python: str, repo: Path, legacy: bool) -> list[str]:
    server = Server(python, repo, "--exit-timeout-secs", "30")
    try:

        async def open_streams_then_term() -> float:
            channel = grpc.aio.insecure_channel(server.url)
            queues = [asyncio.Queue() for _ in range(4)]

            async def requests(queue: asyncio.Queue) -> object:
                while (item := await queue.get()) is not None:
                    yield item

            stream = channel.stream_stream(protos.method_path("ModelStreamInfer"))
            calls = [stream(requests(q)) for q in queues]
            for queue in queues:
                queue.put_nowait(sum_request(4))
            for call in calls:
                await call.read()  # each stream has answered once and stays open
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.proc.wait, 60)
            took = time.monotonic() - start
            await channel.close()
            return took

        took = asyncio.run(open_streams_then_term())
        return ["SIGTERM with 4 open streams (exit timeout 30 s)", f"exit {server.proc.returncode}", "", "",
                f"{took:.1f}"]  # fmt: skip
    finally:
        server.stop()


PROBES = {
    "big": probe_big_message,
    "bytes": probe_bytes_to_fp32,
    "concurrent": probe_concurrent,
    "stalled": probe_stalled,
    "drain": probe_drain,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python whose rapidserve serves")
    parser.add_argument("--legacy", action="store_true", help="leave out flags an older server lacks")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(PROBES))
    parser.add_argument("--poll-live", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll_live:
        poll_live(args.poll_live)
        return
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder)
        write_model(repo, "sum", sum_graph(), SUM_CONFIG)
        rows = [["probe", "outcome", "peak RSS growth MB", "worst ServerLive ms", "seconds"]]
        for name, probe in PROBES.items():
            if name not in args.skip:
                rows.append(probe(args.python, repo, args.legacy))
                print(" | ".join(rows[-1]), flush=True)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
