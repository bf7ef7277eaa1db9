"""deploy/kubernetes and deploy/kserve, checked offline: no cluster is run here.

Each kustomization is rendered (a small strategic-merge renderer, compared with `kubectl kustomize` where
kubectl is installed) and every object is validated against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail). The server's container is then started on paper: its args and RAPIDSERVE_*
environment go through the real `rapidserve serve` parser and settings, and the ports, probes,
Services, ServiceMonitor and autoscaler are checked against the settings that come out, so none can
drift from the CLI.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rapidserve import cli
from rapidserve._options import PREFIX, bad_variable, variable
from rapidserve._serve import settings_of

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve"
SERVICEMONITOR_SCHEMA = REPO / "tests" / "data" / "servicemonitor-v1.schema.json"
# the newest Kubernetes release whose schemas kubernetes-validate ships (its version number follows it)
KUBERNETES_VERSION = "1.37.0"
# (model format, version, priority) that KServe's own runtimes select automatically for the v2 protocol
# (kserve-tritonserver's onnx; its other formats are ones this runtime does not select automatically)
KSERVE_AUTO_SELECTED = [("onnx", "1", 1)]

KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
KUSTOMIZATION_IDS = [str(p.relative_to(KUBERNETES)) for p in KUSTOMIZATIONS]

# Strategic merge: the key that identifies an item of these lists (Kubernetes' patchMergeKey); every
# other list is replaced whole by the patch's.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": ("containerPort", "port"),  # a container's ports, a Service's
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch, restricted to what these overlays use: maps merge, null deletes, the
    lists of MERGE_KEYS merge item by item (items new to a list come first, as kustomize puts them)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        keys = MERGE_KEYS[field] if isinstance(MERGE_KEYS[field], tuple) else (MERGE_KEYS[field],)
        key = next(k for k in keys if all(k in item for item in base + patch))
        changes = {item[key]: item for item in patch}
        merged = [merge(old, changes[old[key]]) if old[key] in changes else old for old in base]
        known = {old[key] for old in base}
        return [copy.deepcopy(item) for item in patch if item[key] not in known] + merged  # (new items first)
    return copy.deepcopy(patch)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` prints, for kustomizations made of resources, patches
    (strategic merge, by path) and labels (without selectors)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "labels"}
    assert not unsupported, f"{folder}: the test's renderer does not know {sorted(unsupported)}"
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render(path) if path.is_dir() else load_all(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only patches by path are rendered here"
        for change in load_all(folder / patch["path"]):
            index = one(i for i, d in enumerate(docs) if identity(d) == identity(change))
            docs[index] = merge(docs[index], change)
    for group in kustomization.get("labels", []):
        assert not group.get("includeSelectors") and not group.get("includeTemplates")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    return docs


def identity(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def one(items: Any) -> Any:
    found = list(items)
    assert len(found) == 1, f"expected exactly one, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def server_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Deployment's pod spec, its rapidserve container)."""
    pod = one(of_kind(docs, "Deployment"))["spec"]["template"]["spec"]
    return pod, one(c for c in pod["containers"] if c["name"] == "rapidserve")


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def start_on_paper(
    container: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch, extra_mounts: tuple[str, ...] = ()
) -> Any:
    """The server's settings from the container's args and environment, through the real parser: every
    mounted path is moved under ``root``, and files the flags name are created there (a secret's)."""
    mounts = sorted({m["mountPath"] for m in container.get("volumeMounts", [])} | set(extra_mounts), key=len)
    mounts.reverse()  # the longest first, so /etc/a/b is not taken for /etc/a

    def moved(text: str) -> str:
        for mount in mounts:
            if mount in text:
                return text.replace(mount, str(root / mount.strip("/")))
        return text

    for mount in mounts:
        (root / mount.strip("/")).mkdir(parents=True, exist_ok=True)
    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    limits = container.get("resources", {}).get("limits", {})
    values: list[str] = []
    for item in container.get("env", []):
        if not item["name"].startswith(PREFIX):
            continue  # (TMPDIR and the like matter in the pod, not to the parser)
        if "value" in item:
            value = moved(str(item["value"]))
        else:
            field = item["valueFrom"]["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1"
            value = str(math.ceil(cpu_cores(limits["cpu"])))  # the downward API rounds CPUs up
        monkeypatch.setenv(item["name"], value)
        values.append(value)
    args = [moved(a) for a in container["args"]]
    for text in args + values:  # the files a flag names (a secret's certificate or key) exist in a real pod
        for word in text.replace("=", " ").replace("@", " ").replace(";", " ").split():
            path = Path(word)
            if word.startswith(str(root)) and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("secret-value\n")
    assert args[0] == "serve", "the image's entrypoint is `rapidserve`: args start with the subcommand"
    parser = cli._parser()
    known = {variable(o[2:]) for a in serve_parser(parser)._actions for o in a.option_strings if o.startswith("--")}
    misspelled = {e["name"] for e in container.get("env", []) if e["name"].startswith(PREFIX)} - known
    assert not misspelled, f"no serve flag reads {sorted(misspelled)} (the server would ignore them)"
    parsed = parser.parse_args(args)
    assert bad_variable(parsed) is None, bad_variable(parsed).message()
    settings, demo = settings_of(parsed)
    assert not demo, "the manifests serve a model repository, never the demo"
    return settings


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = one(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def probe_handler(probe: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    handlers = [k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe]
    assert len(handlers) == 1, f"a probe has exactly one handler, found {handlers}"  # (the schema allows several)
    return handlers[0], probe[handlers[0]]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_the_renderer_agrees_with_kubectl(folder: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are checked as this test renders them")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    theirs = {identity(d): d for d in yaml.safe_load_all(out) if d}
    ours = {identity(d): d for d in render(folder)}
    assert ours == theirs


def test_every_folder_is_rendered() -> None:
    assert {"base", "overlays/object-storage", "overlays/secure"} <= set(KUSTOMIZATION_IDS)
    for folder in KUSTOMIZATIONS:  # every manifest file is a resource or a patch of some kustomization
        listed = yaml.safe_load((folder / "kustomization.yaml").read_text())
        named = set(listed.get("resources", [])) | {p["path"] for p in listed.get("patches", [])}
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert files <= named, f"{folder}: {sorted(files - named)} belong to no kustomization"


def test_objects_match_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    monitor_schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    kinds = set()
    for doc in rendered:
        kinds.add(doc["kind"])
        if doc["apiVersion"] == "monitoring.coreos.com/v1":  # a CRD: its schema is not Kubernetes'
            jsonschema.validate(doc, monitor_schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds


def test_the_schemas_catch_a_misspelled_field(rendered: list[dict[str, Any]]) -> None:
    """The validation above is strict: a field Kubernetes does not know fails it, not just a wrong type."""
    deployment = copy.deepcopy(one(of_kind(rendered, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    monitor = copy.deepcopy(one(of_kind(rendered, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads(SERVICEMONITOR_SCHEMA.read_text()))


def test_the_container_follows_the_cli(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, container = server_container(rendered)
    settings = start_on_paper(container, tmp_path, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "http": settings.http_port, "metrics": settings.metrics_port}
    # probes: the kubelet's gRPC probe speaks plaintext, so it is used exactly when gRPC has no TLS
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        kind, handler = probe_handler(container[name])
        if kind == "grpc":
            assert settings.tls is None, f"{name}: the kubelet's gRPC probe cannot speak TLS"
            assert handler["port"] == settings.grpc_port and handler.get("service", "") == ""
        else:
            assert kind == "httpGet" and settings.tls is not None, f"{name}: gRPC probes unless TLS forbids them"
            assert handler["port"] == settings.http_port
            assert handler["scheme"] == ("HTTPS" if settings.http_tls is not None else "HTTP")
            ready = name != "livenessProbe"
            assert handler["path"] == ("/v2/health/ready" if ready else "/v2/health/live")
    # a drain (--exit-timeout-secs) and the preStop pause fit in the grace period
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings.grace_period_s + pause
    # one front end per CPU of a Guaranteed container
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert settings.frontends == math.ceil(cpu_cores(resources["limits"]["cpu"]))
    # the Services say which ports speak TLS (meshes and gateways choose their protocol by it)
    tls_of = {"grpc": settings.tls, "http": settings.http_tls, "metrics": None}
    for service in of_kind(rendered, "Service"):
        for port in service["spec"]["ports"]:
            plain = "kubernetes.io/h2c" if port["targetPort"] == "grpc" else "http"
            wanted = "https" if tls_of[port["targetPort"]] is not None else plain
            assert port.get("appProtocol") == wanted, f"{service['metadata']['name']}: {port['name']}'s appProtocol"
    # TLS and access keys cover both ports, or the other one is a way around them
    assert (settings.tls is None) == (settings.http_tls is None)
    assert {p for group in settings.restricted_protocols for p in group[0]} == {
        p for group in settings.http_restricted_api for p in group[0]
    }


def test_the_pod_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    pod, container = server_container(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for each in pod["containers"] + pod.get("initContainers", []):
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
    # the root file system is read-only: the temporary and cache folders are on a writable volume
    env = {e["name"]: e.get("value") for e in container["env"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    for name in ("TMPDIR", "XDG_CACHE_HOME"):
        assert any(env[name] == m or env[name].startswith(m + "/") for m in writable), name
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(
        m["name"] in volumes for c in pod["containers"] + pod.get("initContainers", []) for m in c["volumeMounts"]
    )


def test_service_links_are_off_because_they_would_set_flags(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes puts NAME_PORT=tcp://IP:PORT (and more) in every pod for each Service NAME of the
    namespace. For a Service named rapidserve-grpc that is RAPIDSERVE_GRPC_PORT, --grpc-port's variable:"""
    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAPIDSERVE_GRPC_PORT", "tcp://10.96.0.12:8001")
    assert bad_variable(cli._parser().parse_args(["serve"])) is not None
    pod, _ = server_container(rendered)
    assert pod["enableServiceLinks"] is False


def test_services_reach_the_container(rendered: list[dict[str, Any]]) -> None:
    deployment = one(of_kind(rendered, "Deployment"))
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    _, container = server_container(rendered)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = of_kind(rendered, "Service")
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named and port["port"] == named[port["targetPort"]]
    headless = one(s for s in services if s["spec"].get("clusterIP") == "None")
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert one(s for s in services if s["spec"].get("type") == "ClusterIP")
    # the ServiceMonitor picks one Service (two would scrape each pod twice), on its metrics port
    monitor = one(of_kind(rendered, "ServiceMonitor"))
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = one(s for s in services if wanted <= s["metadata"]["labels"].items())
    endpoint = one(monitor["spec"]["endpoints"])
    port = one(p for p in scraped["spec"]["ports"] if p["name"] == endpoint["port"])
    assert port["targetPort"] == "metrics" and endpoint["path"] == "/metrics"
    budget = one(of_kind(rendered, "PodDisruptionBudget"))
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def exported_families(tmp_path: Path) -> dict[str, str]:
    """The families the server's own /metrics collector exports (tests/unit/test_deploy.py builds them)."""
    spec = importlib.util.spec_from_file_location("deploy_checks", Path(__file__).with_name("test_deploy.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.exported_families(tmp_path))


def test_the_autoscaler_scales_on_an_exported_metric(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    hpa = one(of_kind(rendered, "HorizontalPodAutoscaler"))
    deployment = one(of_kind(rendered, "Deployment"))
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "one pod would leave no one serving while it is evicted or restarted"
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu", "CPU is the fallback when the custom metric is absent"
    _, container = server_container(rendered)
    assert "cpu" in container["resources"]["requests"], "CPU utilization is measured against the request"
    wanted = by_type["Pods"]["pods"]["metric"]["name"]
    rules = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"]
    rule = one(r for r in rules if r["name"]["as"] == wanted)
    series = rule["seriesQuery"].split("{")[0].strip("'\"")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["metricsQuery"].startswith("sum("), "a pod's models and versions add up"
    families = exported_families(tmp_path)
    for each in rules:
        name = each["seriesQuery"].split("{")[0].strip("'\"")
        assert families.get(name) == "gauge", f"{name} is not a gauge the server exports"
    assert series == wanted


def test_the_kserve_runtime_follows_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = one(load_all(KSERVE / "servingruntime.yaml"))
    assert runtime["kind"] == "ClusterServingRuntime" and runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"onnx", "pytorch", "triton"}
    container = one(spec["containers"])
    assert container["name"] == "kserve-container"
    settings = start_on_paper(container, tmp_path, monkeypatch, extra_mounts=("/mnt/models",))
    assert settings.model_repositories == (tmp_path / "mnt" / "models",), (
        "KServe's storage initializer fills /mnt/models"
    )
    assert settings.http_port == 8080, "KServe routes HTTP to 8080"
    # KServe refuses (admission webhook) two auto-selected runtimes of one format, version and protocol
    # at the same priority; its own Triton runtime selects onnx version 1 at priority 1 on v2 and grpc-v2
    for name, version, priority in KSERVE_AUTO_SELECTED:
        clash = formats.get(name, {})
        if clash.get("autoSelect") and clash.get("version") == version:
            assert clash.get("priority") not in (None, priority), f"{name} clashes with KServe's own runtime"
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == settings.metrics_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    for path in sorted(KSERVE.glob("inferenceservice*.yaml")):
        service = one(load_all(path))
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in spec["protocolVersions"]
        assert model["storageUri"].split("://")[0] in {"s3", "gs", "pvc", "https", "hf"}
        for port in model.get("ports", []):  # h2c names KServe's gRPC port: it must be the server's
            assert port["name"] == "h2c" and port["containerPort"] == settings.grpc_port


def test_the_readme_commands_name_real_folders() -> None:
    text = (KUBERNETES / "README.md").read_text()
    assert "no cluster" in text.lower()
    folders = {word for line in text.splitlines() for word in line.split() if word.startswith("deploy/")}
    assert folders, "the README gives the commands to run"
    for folder in folders:
        assert (REPO / folder.rstrip("`.,)")).exists(), folder
