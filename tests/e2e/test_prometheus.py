"""A real Prometheus scrapes a real server: every Grafana dashboard query answers, and the counters
equal what the clients saw."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as tc
from remote import RemoteServer
from workload import build_workload_repository, run_workload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "rapidserve.json"
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, target: str | list[str], workdir: Path) -> None:
        assert PROMETHEUS is not None
        config = workdir / "prometheus.yml"
        targets = json.dumps([target] if isinstance(target, str) else target)  # (a YAML flow sequence)
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            f"scrape_configs:\n  - job_name: rapidserve\n    static_configs:\n      - targets: {targets}\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def scrapes(self) -> float:
        """How many samples of ``up`` it has stored: one per scrape."""
        result = self.query('count_over_time(up{job="rapidserve"}[10m])')
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for_scrapes(self, more: int) -> None:
        target = self.scrapes() + more
        deadline = time.monotonic() + 60
        while self.scrapes() < target:
            assert time.monotonic() < deadline, "prometheus stopped scraping"
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[RemoteServer, Prometheus]]:
    if PROMETHEUS is None:
        pytest.skip("needs the Prometheus server binary (Debian package 'prometheus'; .ci/run installs it as root)")
    repo = build_workload_repository(tmp_path / "repo")
    server = RemoteServer("--model-repository", str(repo))
    prometheus = None
    try:
        target = server.metrics_url().removeprefix("http://").removesuffix("/metrics")
        prometheus = Prometheus(target, tmp_path)
        yield server, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, with Grafana's variables as Grafana would fill them."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str) and node["expr"].strip():
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return [re.sub(r"\$\{?(?:model|protocol)\}?", ".*", e.replace("$__rate_interval", "1m")) for e in exprs]


def test_every_dashboard_query_answers_and_counts_are_exact(stack: tuple[RemoteServer, Prometheus]) -> None:
    server, prometheus = stack
    client = tc.InferenceServerClient(server.url)
    server.wait_ready(client)
    client.close()
    prometheus.wait_for_scrapes(2)  # the series exist at zero before the load
    expected = run_workload(server.url)
    expected_again = run_workload(server.url)  # a second round, a few scrapes later: rates see both
    prometheus.wait_for_scrapes(3)

    assert prometheus.query('up{job="rapidserve"}')[0]["value"][1] == "1"
    for model in ("scale", "cached", "slow_full", "slow_timeout", "reshape"):
        for metric, counts in (
            ("rapidserve_request_success_total", expected.success + expected_again.success),
            ("rapidserve_inference_total", expected.inferences + expected_again.inferences),
        ):
            (sample,) = prometheus.query(f'{metric}{{model="{model}"}}')
            assert float(sample["value"][1]) == counts[model], (metric, model)
    failures = {
        (s["metric"].get("model", ""), s["metric"]["reason"]): float(s["value"][1])
        for s in prometheus.query("sum by (model, reason) (rapidserve_request_failure_total) > 0")
    }
    assert failures == dict(expected.failures + expected_again.failures)
    lookups = prometheus.query('sum(rapidserve_cache_hit_total{model="cached"} + rapidserve_cache_miss_total)')
    assert float(lookups[0]["value"][1]) == sum((expected.cache_lookups + expected_again.cache_lookups).values())

    queries = dashboard_queries()
    assert len(queries) >= 10
    for expr in queries:
        values = [float(s["value"][1]) for s in prometheus.query(expr)]
        assert any(math.isfinite(v) for v in values), f"no data for dashboard query: {expr}"
