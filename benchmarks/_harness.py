"""Shared pieces of the benchmark scripts: models built by code, a pinned server subprocess with CPU
accounting, perf_analyzer runs, and table printing. Not a test: these print numbers."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent


def find_perf_analyzer(explicit: str | None) -> str:
    found = explicit or os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not found:
        raise SystemExit(
            "perf_analyzer not found: pass --perf-analyzer or set PERF_ANALYZER; "
            "benchmarks/install_perf_analyzer.sh DIR installs it as DIR/bin/perf_analyzer"
        )
    return found


def _save(repo: Path, name: str, graph: Any, config: str) -> Path:
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    path = repo / name / "1" / "model.onnx"
    path.write_bytes(model.SerializeToString())
    (repo / name / "config.pbtxt").write_text(config)
    return path


def batching_config(max_batch: int = 32, delay_us: int = 1000, cache: bool = False) -> str:
    return (
        f"max_batch_size: {max_batch}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        + ("response_cache { enable: true }\n" if cache else "")
    )


def build_mlp(repo: Path, name: str = "mlp", config: str | None = None) -> Path:
    """MLP 64->256->256->10 with random weights; input "x" FP32 [batch, 64], output "y"."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [64, 256, 256, 10]
    nodes, inits, prev = [], [], "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _save(repo, name, graph, config or batching_config())


_FIXED_SERVICE_SOURCE = """\
# A Python model whose every batch takes the same time, whatever its size: a GPU that is never busy.
import time

import triton_python_backend_utils as pb_utils

SERVICE_S = {service_s!r}


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(SERVICE_S)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
        return responses
"""


def build_fixed_service_model(repo: Path, name: str = "fixed", service_ms: float = 1.0, max_batch: int = 128) -> Path:
    """A Python-backend model whose ``execute`` sleeps ``service_ms`` once per batch of up to ``max_batch``
    requests, then answers OUTPUT0 = 2 x INPUT0 (FP32 [batch, 16]): what a server feeds a device at most
    is then set by its front end, not the model. One instance; batches grow while it is busy."""
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    path = repo / name / "1" / "model.py"
    path.write_text(_FIXED_SERVICE_SOURCE.format(service_s=service_ms / 1000))
    (repo / name / "config.pbtxt").write_text(
        'backend: "python"\n'
        f"max_batch_size: {max_batch}\n"
        'input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [16] }]\n'
        'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [16] }]\n'
        "instance_group [{ count: 1 kind: KIND_CPU }]\n"
        "dynamic_batching {}\n"
    )
    return path


def build_cnn(repo: Path, name: str = "cnn", config: str | None = None) -> Path:
    """A ResNet-18-shaped CNN (random weights, BN folded away): "x" FP32 [batch, 3, 112, 112] -> "y" [batch, 1000]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes: list[Any] = []
    inits: list[Any] = []
    counter = itertools.count()

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int, relu: bool = True) -> str:
        i = next(counter)
        w = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2 / (c_in * k * k))).astype(np.float32)
        inits.extend(
            [numpy_helper.from_array(w, f"cw{i}"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"cb{i}")]
        )
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"cw{i}", f"cb{i}"],
                [f"c{i}"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        if not relu:
            return f"c{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        return f"r{i}"

    def block(x: str, c_in: int, c_out: int, stride: int) -> str:
        h = conv(conv(x, c_in, c_out, 3, stride), c_out, c_out, 3, 1, relu=False)
        shortcut = x if stride == 1 and c_in == c_out else conv(x, c_in, c_out, 1, stride, relu=False)
        i = next(counter)
        nodes.append(helper.make_node("Add", [h, shortcut], [f"a{i}"]))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"ar{i}"]))
        return f"ar{i}"

    h = conv("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [h], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    h, c = "pool", 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        h = block(block(h, c, c_out, stride), c_out, c_out, 1)
        c = c_out
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc = (rng.standard_normal((512, 1000)) / np.sqrt(512)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fcw"), numpy_helper.from_array(np.zeros(1000, np.float32), "fcb")])
    nodes.append(helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    return _save(repo, name, graph, config or batching_config())


def in_process(
    model: Path, shape: Sequence[int], batch_sizes: Sequence[int], core: int, seconds: float = 3.0
) -> dict[int, tuple[float, float]]:
    """ONNX Runtime (1 thread) in this process on one core: batch size -> (infer/s, p50 ms per call)."""
    import onnxruntime as ort

    os.sched_setaffinity(0, {core})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options)
    results = {}
    for batch in batch_sizes:
        x = np.random.default_rng(1).standard_normal((batch, *shape)).astype(np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        results[batch] = (batch * len(times) / sum(times), float(np.median(times) * 1000))
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return results


class Server:
    """A server subprocess pinned to one core (or a taskset list such as "0-3"; its children inherit it);
    ``cpu_seconds()`` reads its user+system time. ``port`` is the one it says it listens on (gRPC);
    ``http_port`` rapidserve's HTTP port and ``metrics_port`` its /metrics port, when it serves them."""

    def __init__(
        self,
        command: list[str],
        core: int | str = 0,
        ready_line: str = "",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ):
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        assert self.proc.stdout is not None
        self.port = self.http_port = self.metrics_port = 0
        for line in self.proc.stdout:
            if match := re.search(r"(HTTP server )?listening on [\w.:]*?:(\d+)", line):
                if match.group(1):
                    self.http_port = int(match.group(2))
                else:
                    self.port = int(match.group(2))
            if match := re.search(r"Prometheus metrics at http://[\w.:\[\]]*?:(\d+)/metrics", line):
                self.metrics_port = int(match.group(1))
            if self.port and ready_line in line:
                break
        else:
            raise RuntimeError("server exited before it was ready")
        # keep draining its output so that it never blocks on a full pipe
        self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)

    @classmethod
    def rapidserve(
        cls, repo: Path, *flags: str, core: int | str = 0, python: str | None = None, cwd: str | None = None
    ) -> Server:
        """``python``: another installation's interpreter (run it with a ``cwd`` outside this repository,
        so that ``-m rapidserve`` does not import this checkout's folder)."""
        command = [
            python or sys.executable,
            "-m",
            "rapidserve",
            "serve",
            "--model-repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--log-level",
            "INFO",
            *flags,
        ]
        return cls(command, core, ready_line="server ready", cwd=cwd)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and every process under it (a peer may run in children)."""
        total, pending = 0, [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # it ended meanwhile
        return total / CLK_TCK

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._drain.wait(5)


def _run_measured(server: Server, command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run a load generator; also returns the server's CPU seconds per wall second meanwhile, and the
    load generator's own (its whole run, start-up and warm-up included)."""
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - wall0
    client = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
    return result, (server.cpu_seconds() - cpu0) / wall, client


def perf_analyzer(
    binary: str,
    server: Server,
    model: str,
    concurrency: int,
    *,
    streaming: bool = False,
    core: int | str = 1,
    interval_ms: int = 3000,
    stability: int = 15,
    async_mode: bool = False,
    protocol: str = "grpc",
    out: Path,
) -> dict[str, float]:
    """One perf_analyzer load point (``async_mode``: its ``--async``, one thread with N requests in
    flight, instead of its default of one blocking thread per request; ``protocol``: "grpc", or "http"
    to the server's HTTP port); adds ``cpu_util`` (server CPU
    seconds per wall second) and ``cpu_us_per_infer`` (server CPU microseconds per inference) measured
    around the run.

    Small VMs are noisy: when perf_analyzer finds no stable measurement, the point is measured
    again once with windows twice as long and a 30% stability band, and ``relaxed`` is set to 1.
    """
    for attempt, (interval, band) in enumerate(((interval_ms, stability), (2 * interval_ms, 30))):
        command = [
            "taskset", "-c", str(core), binary, "-m", model, "-i", protocol, "-b", "1",
            "-u", server.http_url if protocol == "http" else server.url,
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval),
            "--stability-percentage", str(band), "--max-trials", "10", "-f", str(out),
        ]  # fmt: skip
        if streaming:
            command.append("--streaming")
        if async_mode:
            command.append("--async")
        result, cpu_util, client_cpu = _run_measured(server, command)
        if result.returncode == 0:
            break
        if attempt or "stable measurement" not in result.stdout + result.stderr:
            raise RuntimeError(f"perf_analyzer failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    with out.open() as f:
        row = {k: float(v) for k, v in next(csv.DictReader(f)).items() if v not in ("", None)}
    row["relaxed"] = float(attempt)
    row["cpu_util"] = cpu_util
    row["client_cpu_run"] = client_cpu
    row["cpu_us_per_infer"] = row["cpu_util"] * 1e6 / row["Inferences/Second"]
    return row


def bench(
    server: Server,
    model: str,
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    streaming: bool = False,
    core: int | str = 1,
    interval_ms: int = 3000,
    stability: int = 15,
    extra: Sequence[str] = (),
    out: Path,
) -> dict[str, float]:
    """One ``rapidserve bench`` load point, in perf_analyzer's row shape (``Inferences/Second``,
    ``p50 latency`` and ``p99 latency`` in microseconds) plus bench's own columns and the server's CPU."""
    level = ["--concurrency", str(concurrency)] if request_rate is None else ["--request-rate", str(request_rate)]
    command = [
        "taskset", "-c", str(core), sys.executable, "-m", "rapidserve", "bench", model, "--url", server.url,
        *level, "--measurement-interval", str(interval_ms), "--stability-percentage", str(stability),
        "--max-trials", "10", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip
    if streaming:
        command.append("--streaming")
    result, cpu_util, client_cpu = _run_measured(server, command)
    if result.returncode != 0:
        raise RuntimeError(f"rapidserve bench failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    (row,) = json.loads(out.read_text())
    row["Inferences/Second"] = row["infer_per_s"]
    row["p50 latency"], row["p99 latency"] = row["p50_ms"] * 1000, row["p99_ms"] * 1000
    row["cpu_util"] = cpu_util
    row["client_cpu_run"] = client_cpu
    row["cpu_us_per_infer"] = row["cpu_util"] * 1e6 / row["infer_per_s"] if row["infer_per_s"] else float("nan")
    return row


def add_client_arguments(parser: Any) -> None:
    parser.add_argument(
        "--client",
        choices=("perf_analyzer", "rapidserve"),
        default="perf_analyzer",
        help="the load generator: NVIDIA's perf_analyzer (the reference) or `rapidserve bench`",
    )
    parser.add_argument("--perf-analyzer", help="perf_analyzer's path (default: PERF_ANALYZER or PATH)")


def driver(args: Any) -> Any:
    """A ``load(server, model, concurrency, streaming, interval_ms, tmp)`` for the chosen client."""
    if args.client == "rapidserve":

        def load_bench(server: Server, model: str, concurrency: int, streaming: bool, interval_ms: int, tmp: Path):
            return bench(server, model, concurrency=concurrency, streaming=streaming, interval_ms=interval_ms,
                         out=tmp / "bench.json")  # fmt: skip

        return load_bench
    binary = find_perf_analyzer(args.perf_analyzer)

    def load_pa(server: Server, model: str, concurrency: int, streaming: bool, interval_ms: int, tmp: Path):
        return perf_analyzer(binary, server, model, concurrency, streaming=streaming, interval_ms=interval_ms,
                             out=tmp / "pa.csv")  # fmt: skip

    return load_pa


def table_row(label: str, streaming: bool, concurrency: int, row: dict[str, float]) -> list[Any]:
    """server, mode, conc, infer/s, p50 ms, p99 ms, cpu us/inf: the columns every table starts with."""
    return [
        label,
        "stream" if streaming else "unary",
        concurrency,
        row["Inferences/Second"],
        row["p50 latency"] / 1000,
        row["p99 latency"] / 1000,
        row["cpu_us_per_infer"],
    ]


ROW_HEADER = ["server", "mode", "conc", "infer/s", "p50 ms", "p99 ms", "cpu us/inf"]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [
        [
            f"{v:,.2f}" if isinstance(v, float) and v < 100 else f"{v:,.0f}" if isinstance(v, float) else str(v)
            for v in row
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
