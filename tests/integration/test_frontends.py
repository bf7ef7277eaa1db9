"""The server split into front-end processes (``--frontends 2``): one cache, one set of statistics and
metrics across them, a front end's death confined to its own requests, the engine's death and SIGTERM
taking every process along, and the new surface (shared memory, the engine channel) under attack.

Which front end serves a connection is the kernel's choice (SO_REUSEPORT hashes each new connection), so
the tests open new connections until one lands where they need it, told by the front ends' own records.

Covered elsewhere and not repeated here:
- a reload under load loses nothing, for a new version directory and for the same version uploaded
  again: tests/integration/test_reload_under_load.py (run with ``frontends=2`` too);
- a Python model.py upload is refused and its code never runs: tests/security/test_repository_attacks.py
  (in one process; with front ends the refusal is the same, in the engine's model manager, which a
  front end's load call reaches as tests/integration/test_model_control.py checks with ``frontends=2``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import ServerThread
from prometheus_client.parser import text_string_to_metric_families
from remote import RemoteServer
from testmodels import SUM_CONFIG, scale_graph, sum_graph, tile_graph, write_model, write_python_model
from tritonclient.utils import InferenceServerException

from rapidserve.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]  # /metrics: (name, labels) -> value

INT64 = 7
MiB = 1 << 20
GATE = "rapidserve_frontends_gate"  # registered by the tests; the models in this (the engine's) process import it

# x FP32 [batch, 4] -> y = 2x. Every execute call is counted, then waits while the gate is held.
HELD = f"""
    import triton_python_backend_utils as pb_utils
    import {GATE} as gate


    class TritonPythonModel:
        def execute(self, requests):
            with gate.changed:
                gate.executions.append(len(requests))
                gate.waiting += len(requests)
                gate.changed.notify_all()
            gate.release.wait(60)
            with gate.changed:
                gate.waiting -= len(requests)
            answers = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                answers.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x * 2)]))
            return answers
"""
TILE_CONFIG = """max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""
HELD_IO = """input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }]
"""


@pytest.fixture(scope="module", autouse=True)
def gate_module() -> Iterator[Any]:
    """The gate, importable while this module's servers load and run their models (a model binds the
    module object when it loads, so the tests reset this one object rather than replace it)."""
    module = types.ModuleType(GATE)
    module.changed = threading.Condition()  # type: ignore[attr-defined]
    module.release = threading.Event()  # type: ignore[attr-defined]
    sys.modules[GATE] = module
    yield module
    module.release.set()  # type: ignore[attr-defined]
    del sys.modules[GATE]


@pytest.fixture
def gate(gate_module: Any) -> Iterator[Any]:
    """The gate open, with nothing counted yet."""
    gate_module.release.set()
    gate_module.executions, gate_module.waiting = [], 0
    yield gate_module
    gate_module.release.set()


def wait_until(gate: Any, predicate: Callable[[], bool], what: str) -> None:
    with gate.changed:
        assert gate.changed.wait_for(predicate, 30), what


# ------------------------------------------------------------------------------------- which front end


def edge_calls(server: ServerThread, protocol: str) -> list[int]:
    """Health calls each front end has answered over ``protocol`` so far (its own records, asked directly):
    the tests find where a connection landed by a health call, while inference may go on elsewhere."""
    counts = []
    for frontend in server.server.frontends:
        records = server.run(frontend.ask("stats"))
        assert records is not None, f"front end {frontend.index} did not answer"
        counts.append(
            sum(n for (proto, endpoint, _), n in records[1].items() if (proto, endpoint) == (protocol, "health"))
        )
    return counts


def grpc_client(url: str) -> tc.InferenceServerClient:
    """A client on a connection of its own (gRPC would otherwise share one between the channels of a process)."""
    return tc.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])


def landed(server: ServerThread, protocol: str, call: Callable[[], Any]) -> int:
    """The front end that answered ``call``, a health call (no other may reach the server meanwhile)."""
    before = edge_calls(server, protocol)
    call()
    after = edge_calls(server, protocol)  # (counted before its answer was sent)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b != a]
    assert len(moved) == 1, (before, after)
    return moved[0]


def pinned_grpc(server: ServerThread, frontend: int, attempts: int = 64) -> tc.InferenceServerClient:
    """A gRPC client whose connection front end ``frontend`` serves."""
    for _ in range(attempts):
        client = grpc_client(server.url)
        if landed(server, "grpc", client.is_server_live) == frontend:
            return client
        client.close()
    pytest.fail(f"no new connection landed on front end {frontend} in {attempts} tries")


def pinned_http(server: ServerThread, frontend: int, attempts: int = 64) -> http.client.HTTPConnection:
    """A keep-alive HTTP connection that front end ``frontend`` serves."""
    for _ in range(attempts):
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)

        def ready(connection: http.client.HTTPConnection = connection) -> None:
            connection.request("GET", "/v2/health/ready")
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200

        if landed(server, "http", ready) == frontend:
            return connection
        connection.close()
    pytest.fail(f"no new HTTP connection landed on front end {frontend} in {attempts} tries")


def infer(
    client: tc.InferenceServerClient, model: str, x: np.ndarray, datatype: str = "FP32", output: str = "y"
) -> np.ndarray:
    tensor = tc.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy(output)


def infer_http(connection: http.client.HTTPConnection, model: str, x: np.ndarray) -> list[int]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "INT64", "data": x.reshape(-1).tolist()}]}
    connection.request("POST", f"/v2/models/{model}/infer", json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    data = json.loads(answer.read())
    assert answer.status == 200, data
    return data["outputs"][0]["data"]  # type: ignore[no-any-return]


def scrape(url: str) -> Samples:
    """Every sample of the /metrics page, by name and labels."""
    with urllib.request.urlopen(url, timeout=30) as page:
        text = page.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def status_of(error: InferenceServerException) -> str:
    return str(error.status()).removeprefix("StatusCode.")


# ------------------------------------------------------------------------ one server for most tests here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("frontends-repo")
    write_model(repo, "cached", scale_graph("cached", INT64, 3), "max_batch_size: 8\nresponse_cache { enable: true }\n")
    write_model(repo, "scale", scale_graph("scale", INT64, 3), "max_batch_size: 8\n")
    write_model(repo, "sum", sum_graph(), SUM_CONFIG)
    write_model(repo, "tile", tile_graph(8), TILE_CONFIG)
    write_python_model(
        repo,
        "held_cached",
        HELD,
        f"max_batch_size: 8\n{HELD_IO}dynamic_batching {{}}\nresponse_cache {{ enable: true }}\n",
    )
    settings = ServerSettings(
        model_repositories=(repo,),
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        frontends=2,
        frontend_shm_bytes=MiB,
        grpc_max_message_bytes=8 * MiB,
    )
    thread = ServerThread(settings).start()
    yield thread
    thread.stop()


def statistics(client: tc.InferenceServerClient, model: str) -> Any:
    return client.get_inference_statistics(model, as_json=False).model_stats[0]


def test_an_answer_computed_through_one_front_end_is_a_cache_hit_through_the_other(server: ServerThread) -> None:
    first, second = pinned_grpc(server, 0), pinned_grpc(server, 1)
    x = np.arange(8, dtype=np.int64).reshape(2, 4)
    np.testing.assert_array_equal(infer(first, "cached", x, "INT64"), x * 3)
    np.testing.assert_array_equal(infer(second, "cached", x, "INT64"), x * 3)
    stats = statistics(second, "cached")
    assert stats.execution_count == 1
    assert (stats.inference_stats.cache_miss.count, stats.inference_stats.cache_hit.count) == (1, 1)
    assert stats.inference_stats.success.count == 2
    first.close()
    second.close()


def test_identical_misses_through_both_front_ends_run_once(server: ServerThread, gate: Any) -> None:
    """The first request holds the model's only instance; the same request through the other front end
    then finds the computation in flight and joins it."""
    clients = [pinned_grpc(server, 0), pinned_grpc(server, 1)]
    x = np.full((1, 4), 7.0, np.float32)
    answers: list[Any] = [None, None]

    def send(index: int) -> None:
        try:
            answers[index] = infer(clients[index], "held_cached", x)
        except InferenceServerException as exc:
            answers[index] = exc

    cache = server.server.manager.cache
    joins = cache.stats.joins
    gate.release.clear()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    threads[0].start()
    wait_until(gate, lambda: gate.waiting == 1, "the first request never reached execute")
    threads[1].start()
    deadline = time.monotonic() + 30
    while cache.stats.joins == joins:  # the second request waits on the first's computation
        assert time.monotonic() < deadline, "the second request never joined the first"
        time.sleep(0.005)
    gate.release.set()
    for thread in threads:
        thread.join(30)
    for answer in answers:
        np.testing.assert_array_equal(answer, x * 2)
    assert gate.executions == [1]
    stats = statistics(clients[1], "held_cached")
    assert stats.execution_count == 1 and stats.inference_stats.success.count == 2
    for client in clients:
        client.close()


def test_metrics_and_statistics_add_up_what_both_front_ends_served(server: ServerThread) -> None:
    before = scrape(server.metrics_url)
    grpc_clients = [pinned_grpc(server, 0), pinned_grpc(server, 1)]
    http_connections = [pinned_http(server, 0), pinned_http(server, 1)]
    records_before = [server.run(frontend.ask("stats"))[1] for frontend in server.server.frontends]
    sent = {(0, "grpc"): 3, (1, "grpc"): 2, (0, "http"): 2, (1, "http"): 4}
    for (frontend, protocol), count in sent.items():
        for i in range(count):
            x = np.full((1, 4), 10 * frontend + i, np.int64)
            if protocol == "grpc":
                np.testing.assert_array_equal(infer(grpc_clients[frontend], "scale", x, "INT64"), x * 3)
            else:
                assert infer_http(http_connections[frontend], "scale", x) == (x * 3).reshape(-1).tolist()
    for frontend, records in enumerate(records_before):  # each front end served what was sent through it

        def served(index: int = frontend, records: dict[Any, int] = records) -> dict[str, int]:
            now = server.run(server.server.frontends[index].ask("stats"))[1]
            return {p: now[p, "inference", True] - records.get((p, "inference", True), 0) for p in ("grpc", "http")}

        assert served() == {p: sent[frontend, p] for p in ("grpc", "http")}, frontend

    after = scrape(server.metrics_url)  # (every call was counted before its answer was sent)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for protocol in ("grpc", "http"):
        total = sent[0, protocol] + sent[1, protocol]
        assert delta("rapidserve_call_total", protocol=protocol, endpoint="inference", outcome="success") == total
        assert delta("rapidserve_call_total", protocol=protocol, endpoint="inference", outcome="failure") == 0
    assert delta("rapidserve_request_success_total", model="scale", version="1") == sum(sent.values())
    answers = [client.get_inference_statistics("scale", as_json=False) for client in grpc_clients]
    assert answers[0] == answers[1]
    assert answers[0].model_stats[0].inference_stats.success.count == sum(sent.values())
    for client in grpc_clients:
        client.close()
    for connection in http_connections:
        connection.close()


def test_a_python_model_answers_behind_two_front_ends(server: ServerThread, gate: Any) -> None:
    client = grpc_client(server.url)
    x = np.array([[1.5, -2.0, 0.0, 4.25]], np.float32)
    np.testing.assert_array_equal(infer(client, "held_cached", x), x * 2)
    assert gate.executions == [1]
    client.close()


def test_a_request_or_an_answer_larger_than_the_shared_memory_is_refused_and_serving_goes_on(
    server: ServerThread,
) -> None:
    client = grpc_client(server.url)
    big = np.ones(MiB // 4 + 1, np.float32)  # one element over the 1 MiB the requests' memory holds
    for model, x in (("sum", big), ("tile", np.ones(MiB // 32 + 1, np.float32))):  # tile: 8 x the input
        with pytest.raises(InferenceServerException) as info:
            infer(client, model, x, output="total" if model == "sum" else "y")
        assert status_of(info.value) == "RESOURCE_EXHAUSTED", (model, info.value.message())
        assert "--frontend-shm-bytes" in info.value.message()
    # nothing was left taken: requests and answers that fill most of the memory still go through
    near = np.ones(MiB // 4 - 1024, np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(infer(client, "sum", near, output="total"), [near.size])
        y = infer(client, "tile", near[: MiB // 32 - 1024])
        assert y.shape == ((MiB // 32 - 1024) * 8,)
    client.close()


def test_a_front_end_listens_on_the_served_ports_only(server: ServerThread) -> None:
    ports = {server.server.port, server.server.http_port}
    for frontend in server.server.frontends:
        pid = frontend.process.pid
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.exists(f"/proc/{pid}/fd/{fd}") else ""
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        listening = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and fields[3] == "0A":  # LISTEN
                    listening.add(int(fields[1].rsplit(":", 1)[1], 16))
        assert listening == ports, (pid, listening, ports)
        unix = [line.split() for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]]
        own = [fields for fields in unix if fields[6] in inodes]
        assert own, "the front end's end of the engine channel is a unix socket"
        for fields in own:
            assert len(fields) == 7, f"a unix socket of front end {frontend.index} is bound to a name: {fields[7]}"
            assert fields[3] != "00010000", "a unix socket of a front end listens"


# -------------------------------------------------------------------------------- a front end killed


def test_a_killed_front_end_fails_only_its_own_requests_and_is_started_again(
    tmp_path: Path, serve: Callable[..., ServerThread], gate: Any
) -> None:
    """Three clients on each front end, their requests held in the model (one instance each); the first
    front end is killed: its clients' requests fail UNAVAILABLE, the others' are all answered."""
    write_python_model(tmp_path, "held", HELD, f"max_batch_size: 0\n{HELD_IO}instance_group [{{ count: 6 }}]\n")
    server = serve(tmp_path, frontends=2)
    groups = [[pinned_grpc(server, frontend) for _ in range(3)] for frontend in (0, 1)]
    outcomes: list[list[str]] = [[], []]
    stop = threading.Event()

    def load(group: int, client: tc.InferenceServerClient) -> None:
        x = np.full((4,), group, np.float32)
        while not stop.is_set():
            try:
                np.testing.assert_array_equal(infer(client, "held", x), x * 2)
                outcomes[group].append("OK")
            except InferenceServerException as exc:
                outcomes[group].append(status_of(exc))
            with gate.changed:
                gate.changed.notify_all()

    workers = [threading.Thread(target=load, args=(g, c), daemon=True) for g, group in enumerate(groups) for c in group]
    victim = server.server.frontends[0]
    gate.release.clear()
    try:
        for worker in workers:
            worker.start()
        wait_until(gate, lambda: gate.waiting == 6, "the six clients' requests never all reached the model")
        os.kill(victim.process.pid, signal.SIGKILL)
        wait_until(gate, lambda: len(outcomes[0]) >= 3, "the killed front end's clients got no answer")
        # (a client that reconnects at once may land in the dying process's queue: UNAVAILABLE again)
        assert set(outcomes[0]) == {"UNAVAILABLE"} and outcomes[1] == [], outcomes
        gate.release.set()
        wait_until(gate, lambda: len(outcomes[1]) >= 30, "the other front end's clients stopped being answered")
        deadline = time.monotonic() + 60
        while victim.restarts < 1:
            assert time.monotonic() < deadline, "the killed front end was not started again"
            time.sleep(0.05)
        again = pinned_grpc(server, 0)  # new connections reach it
        np.testing.assert_array_equal(infer(again, "held", np.ones(4, np.float32)), np.full(4, 2.0, np.float32))
        again.close()
    finally:
        stop.set()
        gate.release.set()
        for worker in workers:
            worker.join(30)
    assert victim.restarts == 1
    assert set(outcomes[1]) == {"OK"}, outcomes[1]
    assert set(outcomes[0]) <= {"OK", "UNAVAILABLE"}, outcomes[0]  # (they reconnected meanwhile)
    for client in (*groups[0], *groups[1]):
        client.close()


# ------------------------------------------------------------------------------------- the real CLI


# x FP32 [batch, 4] -> y = 2x, 20 ms a batch; the first value of every request it ran is written to
# served.txt in the model's directory (when its batch is done), so a test can tell which requests ran.
SLOW = """
    import os
    import time
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.log = open(os.path.join(args["model_repository"], "served.txt"), "a")

        def execute(self, requests):
            time.sleep(0.02)
            inputs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
            self.log.write("".join(f"{x[0, 0]:.0f}\\n" for x in inputs))
            self.log.flush()
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x * 2)]) for x in inputs]
"""


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def marked(mark: str) -> list[int]:
    """The processes started with ``FRONTENDS_TEST_MARK=mark`` in their environment (alive or not reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"FRONTENDS_TEST_MARK={mark}".encode() in environ.split(b"\0") and alive(int(entry)):
                found.append(int(entry))
    return found


def wait_gone(pids: list[int], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
        time.sleep(0.05)


@pytest.fixture
def cli_repo(tmp_path: Path) -> Path:
    write_python_model(tmp_path, "slow", SLOW, f"max_batch_size: 8\n{HELD_IO}dynamic_batching {{}}\n")
    return tmp_path


def start_cli(repo: Path) -> tuple[RemoteServer, list[int]]:
    remote = RemoteServer("--frontends", "2", "--model-repository", str(repo), "--exit-timeout-secs", "20")
    remote.wait_for_line("server ready")
    frontends = children(remote.proc.pid)
    assert len(frontends) == 2, frontends
    return remote, frontends


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request_and_every_process_exits(cli_repo: Path) -> None:
    """Every request the model ran was answered OK, every other one was refused (nothing ran and was lost),
    the engine exits 0 and its front ends with it."""
    remote, frontends = start_cli(cli_repo)
    codes: dict[int, str] = {}  # each request's own value -> the code its client got
    counted = threading.Condition()
    stop = threading.Event()

    def load(worker: int) -> None:
        client = grpc_client(remote.url)
        for i in itertools.count():
            if stop.is_set():
                break
            value = worker * 100_000 + i
            x = np.full((1, 4), value, np.float32)
            try:
                np.testing.assert_array_equal(infer(client, "slow", x), x * 2)
                code = "OK"
            except InferenceServerException as exc:
                code = status_of(exc)
            with counted:
                codes[value] = code
                counted.notify_all()
        client.close()

    workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(6)]
    try:
        for worker in workers:
            worker.start()
        with counted:
            assert counted.wait_for(lambda: len(codes) >= 60, 60), codes
        remote.proc.send_signal(signal.SIGTERM)
        assert remote.proc.wait(60) == 0, remote.log
        with counted:  # every client has seen the server gone
            seen = len(codes)
            assert counted.wait_for(lambda: len(codes) >= seen + 6, 60)
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        remote.stop()
    wait_gone(frontends)
    ran = {int(line) for line in (cli_repo / "slow" / "served.txt").read_text().split()}
    answered = {value for value, code in codes.items() if code == "OK"}
    assert ran == answered, ("ran, not answered OK:", {v: codes.get(v) for v in ran - answered})
    refused = {code for value, code in codes.items() if code != "OK"}
    # CANCELLED: a call that reaches gRPC as the server stops is cancelled by gRPC before the servicer
    # sees it (with --frontends 1 as well); such a call never ran (checked above), but it should be
    # UNAVAILABLE, which a client knows it may retry.
    assert refused <= {"UNAVAILABLE", "CANCELLED"}, sorted(refused)
    assert "UNAVAILABLE" in refused
    assert "Traceback" not in remote.log, remote.log


@pytest.mark.slow
def test_an_engine_killed_takes_its_front_ends_down(cli_repo: Path) -> None:
    remote, frontends = start_cli(cli_repo)
    with grpc_client(remote.url) as client:
        np.testing.assert_array_equal(infer(client, "slow", np.ones((1, 4), np.float32)), np.full((1, 4), 2.0))
    os.kill(remote.proc.pid, signal.SIGKILL)
    try:
        wait_gone(frontends)
    finally:
        remote.stop()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_a_busy_port_fails_at_once_and_starts_no_front_end(cli_repo: Path, flag: str) -> None:
    mark = uuid.uuid4().hex
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--grpc-port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        command = [sys.executable, "-m", "rapidserve", "serve", "--frontends", "2", "--host", "127.0.0.1",
                   *(item for pair in ports.items() for item in pair), "--model-repository", str(cli_repo)]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env={**os.environ, "FRONTENDS_TEST_MARK": mark}
        )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert str(port) in output and flag in output, output
    assert "listening" not in output and "server ready" not in output, output  # it stopped before serving anything
    assert marked(mark) == []


def test_the_grpc_channel_options_pin_one_connection_per_client(server: ServerThread) -> None:
    """What the tests above rely on: two clients of this process hold two connections, so they can land
    on different front ends."""
    seen = set()
    for _ in range(64):
        client = grpc_client(server.url)
        seen.add(landed(server, "grpc", client.is_server_live))
        client.close()
        if seen == {0, 1}:
            break
    assert seen == {0, 1}
