"""Front-end processes (``serve --frontends N``): infer/s, p50/p99 and server CPU per request for N = 1, 2, 4, ...

Two models: the MLP of overhead.py (the server's own cost is most of a request) and a fixed-service-time
Python model (1 ms per batch of up to 128: a device that is never busy, so what the front ends pass on sets
the rate). Every server runs on the server cores (the engine and its front ends: taskset is inherited), the
load generator (perf_analyzer, or ``rapidserve bench``) on the client cores. Before any timing, N = 2 must
answer as N = 1 does and its /metrics must count every request sent (over several connections, so that
both front ends take some). ``--baseline-python`` adds another installation (the previous version) at
N = 1 to the same rounds. Within a point the servers take turns (A, B, C, then C, B, A, ...).

Server CPU per request: the user + system time of the server's whole process tree (/proc/PID/stat of the
engine and every front end) over one load run, divided by the requests its /metrics counted over that run.
With the server on one core, N = 2 minus N = 1 is what the split costs a request.

    python benchmarks/frontends.py [--frontends-list 1,2,4,8] [--models mlp,fixed] [--concurrency 1,64]
        [--rounds 2] [--baseline-python OLD/bin/python] [--server-cores 0] [--client-cores 1]
        [--client perf_analyzer|rapidserve] [--perf-analyzer PATH] [--interval-ms 2000] [--skip-check]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _harness import (
    CLK_TCK,
    Server,
    bench,
    build_fixed_service_model,
    build_mlp,
    find_perf_analyzer,
    perf_analyzer,
    print_table,
)

# name -> (builder, input, per-request shape, output)
MODELS: dict[str, tuple[Callable[[Path], Any], str, tuple[int, ...], str]] = {
    "mlp": (build_mlp, "x", (64,), "y"),
    "fixed": (build_fixed_service_model, "INPUT0", (16,), "OUTPUT0"),
}
GOAL = 0.7  # the scaling goal: N front ends serve at least GOAL x N x the N = 1 rate (fixed-service model)
CHECK_CONNECTIONS = 8  # gRPC connections of the check: SO_REUSEPORT spreads connections, not calls


@dataclasses.dataclass
class Variant:
    """One server under test: this version with N front ends, or the baseline installation at N = 1."""

    label: str
    frontends: int
    models: tuple[str, ...]
    server: Server


def core_list(spec: str) -> list[int]:
    """A taskset list ("0", "0-11", "0,2-3") as core numbers."""
    cores: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cores += range(int(low), int(high or low) + 1)
    return cores


def default_cores() -> tuple[str, str]:
    """Server and load-generator cores: a quarter of the cores (at least one) for the load generator."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return str(cores[0]), str(cores[0])
    client = max(1, len(cores) // 4)
    server = cores[:-client]
    return f"{server[0]}-{server[-1]}" if len(server) > 1 else str(server[0]), f"{cores[-client]}-{cores[-1]}"


def default_frontends() -> str:
    """1 and the powers of two up to the usable cores, at most 8 (what ``--frontends auto`` would take)."""
    usable = min(8, len(os.sched_getaffinity(0)))
    return ",".join(str(1 << i) for i in range(usable.bit_length()) if 1 << i <= usable)


def success_count(server: Server, model: str) -> float:
    """Successful requests to ``model`` in the server's /metrics (every process's, added up by the engine)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    pattern = rf'^rapidserve_request_success_total\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def infer(client: Any, kind: Any, model: str, x: np.ndarray) -> np.ndarray:
    """One batch-1 request through tritonclient (``kind``: its grpc or http module)."""
    _, input_name, _, output_name = MODELS[model]
    tensor = kind.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy(output_name)


def check(one: Server, two: Server, models: list[str], requests: int) -> list[str]:
    """N = 2 against N = 1: the same answers (requests one at a time, so that batches are the same), the
    fixed model's answers equal to 2 x the input also when many come at once, and N = 2's /metrics counting
    every request sent. Returns what went wrong (nothing: an empty list)."""
    try:
        import tritonclient.grpc as grpc_client
        import tritonclient.http as http_client
    except ImportError as exc:
        raise SystemExit(f"the N = 2 check needs tritonclient[grpc,http] ({exc}); or pass --skip-check") from exc

    problems: list[str] = []
    rng = np.random.default_rng(0)
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection per client: gRPC shares them by default
    grpc_clients = {
        id(s): [grpc_client.InferenceServerClient(s.url, channel_args=own) for _ in range(CHECK_CONNECTIONS)]
        for s in (one, two)
    }
    http_clients = {id(s): http_client.InferenceServerClient(s.http_url) for s in (one, two)}
    fronts = children(two.proc.pid)
    cpu_before = {pid: process_cpu(pid) for pid in fronts}
    for model in models:
        shape = MODELS[model][2]
        counted = success_count(two, model)
        sent = 0
        for i in range(requests):
            x = rng.standard_normal((1, *shape)).astype(np.float32)
            over_http = i % 4 == 3
            answers = [
                infer(http_clients[id(s)], http_client, model, x)
                if over_http
                else infer(grpc_clients[id(s)][i % CHECK_CONNECTIONS], grpc_client, model, x)
                for s in (one, two)
            ]
            sent += 1
            if not np.array_equal(answers[0], answers[1]):
                problems.append(f"{model} request {i}: N = 2 answered {answers[1]!r}, N = 1 {answers[0]!r}")
        if model == "fixed":  # many at once: batches form and travel together
            xs = [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(requests)]
            many = grpc_clients[id(two)]
            with ThreadPoolExecutor(CHECK_CONNECTIONS) as pool:
                futures = [pool.submit(infer, many[i % CHECK_CONNECTIONS], grpc_client, model, x)
                           for i, x in enumerate(xs)]  # fmt: skip
                outs = [future.result() for future in futures]
            sent += len(xs)
            wrong = sum(not np.array_equal(out, 2 * x) for out, x in zip(outs, xs, strict=True))
            if wrong:
                problems.append(f"fixed, {len(xs)} concurrent requests at N = 2: {wrong} answers are not 2 x input")
        counted = success_count(two, model) - counted
        if counted != sent:
            problems.append(f"{model}: N = 2's /metrics counted {counted:.0f} successful requests, {sent} were sent")
        print(f"check {model}: {sent} requests to N = 2 ({requests} also to N = 1, 1 in 4 over HTTP); "
              f"/metrics counted {counted:.0f}", flush=True)  # fmt: skip
    used = {pid: process_cpu(pid) - cpu_before[pid] for pid in fronts}
    print("check: CPU of each front end meanwhile: " + ", ".join(f"pid {p} {s * 1000:.0f} ms" for p, s in used.items()))
    if len(used) != 2 or min(used.values()) == 0:
        problems.append(f"N = 2 should run 2 front ends that both served: CPU seconds by pid {used}")
    for clients in grpc_clients.values():
        for client in clients:
            client.close()
    return problems


def measure(args: argparse.Namespace, server: Server, model: str, concurrency: int, tmp: Path) -> dict[str, float]:
    """One load run; adds ``served`` (requests /metrics counted meanwhile) and ``cpu_us_per_req`` (the server
    tree's CPU over the run divided by them)."""
    counted = success_count(server, model)
    fronts = {pid: process_cpu(pid) for pid in children(server.proc.pid)}
    cpu = server.cpu_seconds()
    if args.client == "rapidserve":
        row = bench(
            server,
            model,
            concurrency=concurrency,
            core=args.client_cores,
            interval_ms=args.interval_ms,
            stability=args.stability,
            extra=("--workers", str(args.bench_workers)),
            out=tmp / "bench.json",
        )
    else:
        row = perf_analyzer(
            args.binary,
            server,
            model,
            concurrency,
            core=args.client_cores,
            interval_ms=args.interval_ms,
            stability=args.stability,
            out=tmp / "pa.csv",
        )
    cpu = server.cpu_seconds() - cpu
    used = [process_cpu(pid) - before for pid, before in fronts.items()]
    row["served"] = success_count(server, model) - counted
    row["front_us_per_req"] = sum(used) * 1e6 / row["served"] if row["served"] else float("nan")
    # the busiest front end's share of the front ends' CPU (1/N: the load spread evenly)
    row["busiest"] = max(used) / sum(used) if used and sum(used) else float("nan")
    row["cpu_us_per_req"] = cpu * 1e6 / row["served"] if row["served"] else float("nan")
    return row


def mean(runs: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))


def spread(runs: list[dict[str, float]]) -> str:
    """How far the rounds' infer/s lie apart, as a share of their mean."""
    rates = [r["Inferences/Second"] for r in runs]
    return f"{(max(rates) - min(rates)) / np.mean(rates) * 100:.0f}%"


def machine_line(args: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0))
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{cpus} cores ({platform.machine()}), server on cores {args.server_cores}, load generator "
            f"({args.client}) on {args.client_cores}; Python {platform.python_version()}; load average "
            f"{' '.join(load)}")  # fmt: skip


def start(args: argparse.Namespace, repo: Path, base_repo: Path, tmp: Path) -> list[Variant]:
    variants = []
    if args.baseline_python:
        server = Server.rapidserve(base_repo, core=args.server_cores, python=args.baseline_python, cwd=str(tmp))
        variants.append(Variant("previous N=1", 1, tuple(args.baseline_models), server))
    for n in args.frontends:
        server = Server.rapidserve(repo, "--frontends", str(n), core=args.server_cores, cwd=str(tmp))
        variants.append(Variant(f"N={n}", n, tuple(args.models), server))
    return variants


def report(args: argparse.Namespace, results: dict[tuple[str, int, str], list[dict[str, float]]],
           variants: list[Variant]) -> None:  # fmt: skip
    multi_core = len(core_list(args.server_cores)) > 1
    rows, base_rows, ipc_rows = [], [], []
    for model in args.models:
        for concurrency in args.concurrency:
            point = {v.label: results[model, concurrency, v.label] for v in variants if model in v.models}
            one = mean(point["N=1"], "Inferences/Second") if "N=1" in point else float("nan")
            for v in variants:
                if v.label not in point:
                    continue
                runs = point[v.label]
                rate = mean(runs, "Inferences/Second")
                row = [model, concurrency, v.label, rate, mean(runs, "p50 latency") / 1000,
                       mean(runs, "p99 latency") / 1000, mean(runs, "cpu_us_per_req"), f"{rate / one:.2f}",
                       spread(runs), mean(runs, "busiest") if v.frontends > 1 else ""]  # fmt: skip
                if multi_core:
                    goal = GOAL * v.frontends * one
                    row += [goal, "yes" if rate >= goal else "no"] if v.label.startswith("N=") else ["", ""]
                rows.append([*row, "*" if any(r.get("relaxed") for r in runs) else ""])
            if "previous N=1" in point and "N=1" in point:
                new, old = point["N=1"], point["previous N=1"]
                base_rows.append([model, concurrency, mean(old, "Inferences/Second"), mean(new, "Inferences/Second"),
                                  *(f"{mean(new, k) / mean(old, k):.2f}" for k in
                                    ("Inferences/Second", "p50 latency", "p99 latency", "cpu_us_per_req")),
                                  spread(old), spread(new)])  # fmt: skip
            if "N=1" in point and "N=2" in point:
                one_runs, two_runs = point["N=1"], point["N=2"]
                cpu1, cpu2 = mean(one_runs, "cpu_us_per_req"), mean(two_runs, "cpu_us_per_req")
                p1, p2 = mean(one_runs, "p50 latency") / 1000, mean(two_runs, "p50 latency") / 1000
                fronts = mean(two_runs, "front_us_per_req")
                ipc_rows.append([model, concurrency, cpu1, cpu2, cpu2 - cpu1, cpu2 - fronts, fronts, p1, p2, p2 - p1])
    header = ["model", "conc", "server", "infer/s", "p50 ms", "p99 ms", "cpu us/req", "x N=1", "spread", "busiest fe"]
    if multi_core:
        header += [f"goal {GOAL} x N x N=1", "met"]
    print_table(f"rapidserve serve --frontends N, {args.client}, means of {args.rounds} runs (spread: of the "
                "runs' infer/s; busiest fe: the busiest front end's share of the front ends' CPU; *: a run needed "
                "the relaxed retry)", [*header, ""], rows)  # fmt: skip
    if base_rows:
        print_table("N = 1, this version / previous (x: ratios new/old of the means)",
                    ["model", "conc", "old inf/s", "new inf/s", "x inf/s", "x p50", "x p99", "x cpu",
                     "old spread", "new spread"], base_rows)  # fmt: skip
    if ipc_rows:
        print_table(f"What the split costs a request: N = 2 - N = 1, server on cores {args.server_cores}",
                    ["model", "conc", "cpu us N=1", "cpu us N=2", "+cpu us", "N=2 engine", "N=2 front ends",
                     "p50 ms N=1", "p50 ms N=2", "+p50 ms"], ipc_rows)  # fmt: skip


def parse_args() -> argparse.Namespace:
    server_cores, client_cores = default_cores()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontends-list", default=default_frontends(), help="the N to run (default: %(default)s)")
    parser.add_argument("--models", default="mlp,fixed")
    parser.add_argument("--concurrency", default="1,64", help="requests in flight (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each server per point")
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--stability", type=int, default=15, help="the load generator's --stability-percentage")
    parser.add_argument("--server-cores", default=server_cores, help="taskset list (default: %(default)s)")
    parser.add_argument("--client-cores", default=client_cores, help="taskset list (default: %(default)s)")
    parser.add_argument("--client", choices=("perf_analyzer", "rapidserve"), default="perf_analyzer")
    parser.add_argument("--perf-analyzer", help="perf_analyzer's path (default: PERF_ANALYZER or PATH)")
    parser.add_argument(
        "--bench-workers",
        type=int,
        default=0,
        help="rapidserve bench's client processes (default: one per client core, at most 8)",
    )
    parser.add_argument("--baseline-python", help="another installation's python, run at N = 1 beside this one")
    parser.add_argument(
        "--baseline-models",
        default="mlp",
        help="the models the baseline can serve (default: %(default)s; older versions have no Python backend)",
    )
    parser.add_argument("--check-requests", type=int, default=200, help="requests per model of the N = 2 check")
    parser.add_argument("--skip-check", action="store_true", help="time without checking N = 2 first")
    args = parser.parse_args()  # fmt: skip
    args.frontends = [int(n) for n in args.frontends_list.split(",")]
    args.models = args.models.split(",")
    args.baseline_models = [m for m in args.baseline_models.split(",") if m in args.models]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.bench_workers = args.bench_workers or min(8, len(core_list(args.client_cores)))
    if args.client == "perf_analyzer":
        args.binary = find_perf_analyzer(args.perf_analyzer)
    return args


def run_points(args: argparse.Namespace, variants: list[Variant], tmp: Path,
               results: dict[tuple[str, int, str], list[dict[str, float]]]) -> None:  # fmt: skip
    """Every (model, concurrency) point, the servers taking turns: A, B, C, then C, B, A, ..."""
    began = time.monotonic()
    for model in args.models:
        chosen = [v for v in variants if model in v.models]
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for v in chosen if round_ % 2 == 0 else chosen[::-1]:
                    row = measure(args, v.server, model, concurrency, tmp)
                    results[model, concurrency, v.label].append(row)
                    elapsed = time.monotonic() - began
                    print(f"  {model} conc {concurrency} {v.label}: {row['Inferences/Second']:,.0f} infer/s, "
                          f"p50 {row['p50 latency'] / 1000:.2f} ms, {row['cpu_us_per_req']:.0f} cpu us/req, "
                          f"busiest fe {row['busiest']:.2f} [{elapsed:.0f} s]", flush=True)  # fmt: skip


def main() -> int:
    args = parse_args()
    print(machine_line(args), flush=True)
    results: dict[tuple[str, int, str], list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo, base_repo = tmp / "repo", tmp / "base_repo"
        for model in args.models:
            MODELS[model][0](repo)
        for model in args.baseline_models:
            MODELS[model][0](base_repo)
        variants = start(args, repo, base_repo, tmp)
        extra: list[Server] = []
        try:
            if not args.skip_check:
                by_n = {v.frontends: v.server for v in variants if v.label.startswith("N=")}
                for n in (1, 2):
                    if n not in by_n:
                        by_n[n] = Server.rapidserve(repo, "--frontends", str(n), core=args.server_cores, cwd=tmp_name)
                        extra.append(by_n[n])
                problems = check(by_n[1], by_n[2], args.models, args.check_requests)
                for server in extra:
                    server.stop()
                extra.clear()
                if problems:
                    print("N = 2 check FAILED; nothing timed:\n  " + "\n  ".join(problems[:20]))
                    return 1
                print("check: N = 2 answers as N = 1 does and its /metrics counts every request", flush=True)
            run_points(args, variants, tmp, results)
        finally:
            for server in extra + [v.server for v in variants]:
                server.stop()
    report(args, results, variants)
    print(f"\n{machine_line(args)} (at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
