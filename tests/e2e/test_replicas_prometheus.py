"""Three ``rapidserve serve`` replicas behind one redis-server, loaded round-robin by ``rapidserve bench
--url a,b,c`` and scraped by one real Prometheus: the Grafana dashboard's queries add the replicas up,
and the counters Prometheus holds equal what the replicas' own statistics count."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e.test_prometheus import PROMETHEUS, Prometheus, dashboard_queries
from prometheus_client.parser import text_string_to_metric_families
from redisserver import RedisServer, needs_redis
from remote import RemoteServer
from testmodels import ONNX_TYPES, scale_graph, write_model

from rapidserve import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120), needs_redis]
CONFIG = "max_batch_size: 8\nresponse_cache { enable: true }\n"
CONCURRENCY = 3
# the counters behind the dashboard panels this test checks: requests, inferences, the cache hit ratio
COUNTERS = (
    "rapidserve_request_success_total",
    "rapidserve_inference_total",
    "rapidserve_cache_hit_total",
    "rapidserve_cache_miss_total",
)


def _query_at(prometheus: Prometheus, expr: str, at: float) -> dict[str, float]:
    """``expr`` evaluated at the instant ``at``, as {instance or model: value}."""
    query = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/query?{query}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", (expr, body)
    return {
        s["metric"].get("instance", s["metric"].get("model", "")): float(s["value"][1]) for s in body["data"]["result"]
    }


def _wait_for_scrapes_of_all(prometheus: Prometheus, targets: int, more: int) -> None:
    """Until every target has been scraped ``more`` times from now on (so its counters are the last ones)."""

    def fewest() -> float:
        counts = _query_at(prometheus, 'count_over_time(up{job="rapidserve"}[10m])', time.time())
        return min(counts.values()) if len(counts) == targets else 0.0

    wanted = fewest() + more
    deadline = time.monotonic() + 60
    while fewest() < wanted:
        assert time.monotonic() < deadline, "prometheus stopped scraping a replica"
        time.sleep(0.25)


def _counters(metrics_url: str) -> dict[str, float]:
    """The model's counters as the replica itself exposes them, read straight from its /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in counters and sample.labels.get("model") == "scale":
                counters[sample.name] += sample.value
    return counters


def _statistics(url: str) -> Any:
    with Client(url) as client:
        return client.model_statistics("scale").model_stats[0]


def test_the_dashboard_adds_up_three_replicas_that_a_bench_loads_round_robin(tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("needs the Prometheus server binary (Debian package 'prometheus'; .ci/run installs it as root)")
    repo = tmp_path / "repo"
    write_model(repo, "scale", scale_graph("scale", ONNX_TYPES["INT64"], 3), CONFIG)
    redis = RedisServer(tmp_path).start()
    replicas: list[RemoteServer] = []
    prometheus = None
    try:
        flags = ("--model-repository", str(repo), "--cache-redis", redis.url, "--cache-redis-timeout-ms", "2000")
        replicas = [RemoteServer(*flags) for _ in range(3)]
        metrics_urls = [r.metrics_url() for r in replicas]
        targets = [url.removeprefix("http://").removesuffix("/metrics") for url in metrics_urls]
        for replica in replicas:
            replica.wait_for_line("server ready")
        prometheus = Prometheus(targets, tmp_path)
        _wait_for_scrapes_of_all(prometheus, 3, 2)  # the series exist at zero before the load

        urls = ",".join(r.url for r in replicas)
        bench = subprocess.run(
            [sys.executable, "-m", "rapidserve", "bench", "scale", "--url", urls, "--concurrency", str(CONCURRENCY),
             "--duplicate-ratio", "0.5", "--measurement-interval", "300", "--warmup-s", "0.2",
             "--stability-percentage", "1000", "--max-trials", "3", "--quiet"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr
        _wait_for_scrapes_of_all(prometheus, 3, 2)
        at = time.time()

        stats = [_statistics(r.url) for r in replicas]
        successes = [s.inference_stats.success.count for s in stats]
        assert min(successes) > 0, successes  # every replica got its share
        assert max(successes) - min(successes) <= CONCURRENCY + 1, successes  # request i to replica i mod 3
        # the counters Prometheus adds up across replicas equal each replica's own /metrics, added up here
        scraped = [_counters(url) for url in metrics_urls]
        for metric in COUNTERS:
            expected = sum(counters[metric] for counters in scraped)
            assert _query_at(prometheus, f'sum by (model) ({metric}{{model="scale"}})', at) == {"scale": expected}
        assert sum(c["rapidserve_request_success_total"] for c in scraped) == sum(successes)  # and the statistics
        hits = sum(s.inference_stats.cache_hit.count for s in stats)
        assert hits > 0  # the bench's repeats were hits

        # the dashboard's request and inference rate panels: one series per model, the sum of the replicas' rates
        def rates(metric: str) -> dict[str, float]:
            per_replica = _query_at(prometheus, f'rate({metric}{{model="scale"}}[1m])', at)
            assert sorted(per_replica) == sorted(targets), (metric, per_replica)
            return per_replica

        queries = dashboard_queries()
        for metric in ("rapidserve_request_success_total", "rapidserve_inference_total"):
            (expr,) = [q for q in queries if q.startswith(f"sum by (model) (rate({metric}{{")]
            total = _query_at(prometheus, expr, at)
            assert list(total) == ["scale"] and total["scale"] > 0, (expr, total)
            assert total["scale"] == pytest.approx(sum(rates(metric).values()), rel=1e-9), expr
        # the cache hit ratio panel: the replicas' hits over their lookups, all added up before dividing
        (expr,) = [q for q in queries if q.startswith("sum by (model) (rate(rapidserve_cache_hit_total{")]
        hit_rate = sum(rates("rapidserve_cache_hit_total").values())
        miss_rate = sum(rates("rapidserve_cache_miss_total").values())
        ratio = _query_at(prometheus, expr, at)
        assert list(ratio) == ["scale"] and 0 < ratio["scale"] < 1, (expr, ratio)
        assert ratio["scale"] == pytest.approx(hit_rate / (hit_rate + miss_rate), rel=1e-9)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for replica in replicas:
            replica.stop()
        redis.stop()
