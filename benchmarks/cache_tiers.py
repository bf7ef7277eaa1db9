"""Prediction cache tiers: the in-process LRU alone, Redis behind it, and Redis alone, as more requests repeat.

The MLP of overhead.py with ``response_cache { enable: true }``, driven by ``rapidserve bench`` with
``--duplicate-ratio`` 0, 0.5 and 0.9 (a repeat is one of the last 256 distinct inputs) under three
set-ups of one server: the in-process LRU only; the LRU plus a real ``redis-server`` as the second
level (``--cache-redis``); and Redis only (``--cache-size 0``). The server is pinned to core 0,
redis-server and the load generator to core 1; Redis is emptied before each set-up.

What a Redis round trip costs a request comes from ratio 0 (every request misses both levels, so each
pays one lookup, a round trip, and a background store), Redis only against the in-process LRU only, at
concurrency 1 (p50) and under load: the server's CPU per request (its /proc CPU time over a run divided
by the requests its /metrics counted) and redis-server's. A lookup answered later than
``--cache-redis-timeout-ms`` is computed instead and counted as an error, so the lookups answered in
time per request are given too (``L2 lookups/req``), and the server's extra CPU per such lookup;
``batch`` is the server's mean batch size (the requests that reached the model per execution).

    python benchmarks/cache_tiers.py [--concurrency 16] [--ratios 0,0.5,0.9] [--interval-ms 1500]
        [--rounds 1] [--redis-timeout-ms MS]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from _harness import CLK_TCK, Server, batching_config, bench, build_mlp, print_table

MODEL = "mlp"
SETUPS = ("in-process", "in-process+redis", "redis only")
# what each set-up adds to `rapidserve serve`; {url} is the Redis URL
SETUP_FLAGS = {
    "in-process": (),
    "in-process+redis": ("--cache-redis", "{url}"),
    "redis only": ("--cache-redis", "{url}", "--cache-size", "0"),
}
COUNTERS = {
    "served": rf'^rapidserve_request_success_total\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$',
    "hits": rf'^rapidserve_cache_hit_total\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$',
    "l2_hits": r"^rapidserve_cache_l2_hits_total (\S+)$",
    "l2_misses": r"^rapidserve_cache_l2_misses_total (\S+)$",
    "l2_errors": r"^rapidserve_cache_l2_errors_total (\S+)$",
}


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Redis:
    """A ``redis-server`` on a free loopback port, pinned to ``core``, without persistence."""

    def __init__(self, directory: Path, core: int | str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found (Debian's redis-server package)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while self.command("PING") != b"+PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, line: str) -> bytes:
        """One inline command's first reply line (b"" when Redis does not answer)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(line.encode() + b"\r\n")
                return sock.recv(256).split(b"\r\n", 1)[0]
        except OSError:
            return b""

    def cpu_seconds(self) -> float:
        return process_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def counters(server: Server) -> dict[str, float]:
    """The served requests of the model and the Redis level's counters, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {name: sum(float(v) for v in re.findall(pattern, text, re.MULTILINE)) for name, pattern in COUNTERS.items()}


def measure(
    server: Server, redis: Redis, concurrency: int, ratio: float, interval_ms: int, out: Path
) -> dict[str, Any]:
    """One load point, with the server's and redis-server's CPU per request the server counted, and the
    Redis level's lookups over the run."""
    before, server_cpu, redis_cpu = counters(server), server.cpu_seconds(), redis.cpu_seconds()
    row = bench(server, MODEL, concurrency=concurrency, interval_ms=interval_ms,
                extra=("--duplicate-ratio", str(ratio)), out=out)  # fmt: skip
    server_cpu, redis_cpu = server.cpu_seconds() - server_cpu, redis.cpu_seconds() - redis_cpu
    delta = {name: value - before[name] for name, value in counters(server).items()}
    served = delta["served"] or float("nan")
    lookups = delta["l2_hits"] + delta["l2_misses"]
    return {
        "infer/s": row["infer_per_s"],
        "p50": row["p50_ms"],
        "p99": row["p99_ms"],
        "batch": row["server_avg_batch"],  # the requests that reached the model, per execution
        "server_us": server_cpu * 1e6 / served,
        "redis_us": redis_cpu * 1e6 / served,
        "hits": delta["hits"] / served,  # answered by either level
        "l2_hits": delta["l2_hits"] / lookups if lookups else float("nan"),
        "l2_lookups": lookups / served,
        "l2_errors": delta["l2_errors"],
    }


def points(args: argparse.Namespace) -> list[tuple[int, float]]:
    """(concurrency, ratio): ratio 0 at concurrency 1 (a lone request's latency), then each ratio under load."""
    return [(1, 0.0)] + [(args.concurrency, float(r)) for r in args.ratios.split(",")]


def run(args: argparse.Namespace, tmp: Path) -> dict[tuple[str, int, float], list[dict[str, Any]]]:
    """Every set-up's points, ``--rounds`` times (the set-ups' order reversed every other round)."""
    repo = tmp / "repo"
    build_mlp(repo, MODEL, batching_config(cache=True))
    results: dict[tuple[str, int, float], list[dict[str, Any]]] = defaultdict(list)
    redis = Redis(tmp, args.redis_core)
    try:
        for round_ in range(args.rounds):
            for setup in SETUPS if round_ % 2 == 0 else SETUPS[::-1]:
                if redis.command("FLUSHALL") != b"+OK":
                    raise RuntimeError("redis-server did not empty")
                flags = [f.format(url=redis.url) for f in SETUP_FLAGS[setup]]
                if args.redis_timeout_ms and "--cache-redis" in flags:
                    flags += ["--cache-redis-timeout-ms", str(args.redis_timeout_ms)]
                server = Server.rapidserve(repo, *flags, core=args.server_core)
                try:
                    for concurrency, ratio in points(args):
                        row = measure(server, redis, concurrency, ratio, args.interval_ms, tmp / "bench.json")
                        results[setup, concurrency, ratio].append(row)
                        print(f"round {round_ + 1} {setup} c={concurrency} ratio {ratio}: {row['infer/s']:,.0f}/s "
                              f"p50 {row['p50']:.2f} ms, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
                finally:
                    server.stop()
    finally:
        redis.stop()
    return results


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def report(args: argparse.Namespace, results: dict[tuple[str, int, float], list[dict[str, Any]]]) -> None:
    table = []
    for setup in SETUPS:
        for concurrency, ratio in points(args):
            rows = results[setup, concurrency, ratio]
            redis_used = setup != "in-process"
            table.append([
                setup, concurrency, ratio, mean(rows, "infer/s"), mean(rows, "p50"), mean(rows, "p99"),
                mean(rows, "batch"), mean(rows, "server_us"), mean(rows, "redis_us") if redis_used else "-", f"{mean(rows, 'hits'):.0%}",
                f"{mean(rows, 'l2_lookups'):.2f}" if redis_used else "-",
                f"{mean(rows, 'l2_hits'):.0%}" if redis_used else "-",
                f"{sum(r['l2_errors'] for r in rows):.0f}" if redis_used else "-",
            ])  # fmt: skip
    print_table(
        f"MLP with response_cache, rapidserve bench (gRPC, unary), {args.rounds} round(s), means",
        ["set-up", "conc", "dup ratio", "infer/s", "p50 ms", "p99 ms", "batch", "server cpu us/req", "redis cpu us/req",
         "hits", "L2 lookups/req", "L2 hits", "L2 errors"],
        table,
    )  # fmt: skip
    cost = []
    for concurrency in (1, args.concurrency):
        local, remote = results["in-process", concurrency, 0.0], results["redis only", concurrency, 0.0]
        cost.append([
            concurrency, mean(local, "p50"), mean(remote, "p50"), mean(remote, "p50") - mean(local, "p50"),
            mean(local, "server_us"), mean(remote, "server_us"), mean(remote, "server_us") - mean(local, "server_us"),
            mean(remote, "l2_lookups"),
            (mean(remote, "server_us") - mean(local, "server_us")) / mean(remote, "l2_lookups"),
            mean(remote, "redis_us"), mean(remote, "infer/s") / mean(local, "infer/s"),
        ])  # fmt: skip
    print_table(
        "A Redis round trip per request: ratio 0 (all misses), Redis only - in-process only",
        ["conc", "p50 ms local", "p50 ms redis", "+p50 ms", "server us local", "server us redis", "+server us",
         "L2 lookups/req", "+server us/lookup", "redis us", "x infer/s"],
        cost,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ratios", default="0,0.5,0.9")
    parser.add_argument("--interval-ms", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--redis-timeout-ms", type=float, help="the servers' --cache-redis-timeout-ms (default theirs)")
    parser.add_argument("--server-core", default="0")
    parser.add_argument("--redis-core", default="1", help="redis-server's core (the load generator runs on core 1)")
    args = parser.parse_args()
    if 0.0 not in {float(r) for r in args.ratios.split(",")}:
        parser.error("--ratios must include 0: the round-trip cost is measured there")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    report(args, results)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
