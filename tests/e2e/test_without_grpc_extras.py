"""``rapidserve serve`` with grpcio-health-checking and grpcio-reflection unimportable, as in an
environment whose protobuf runtime is older than their generated code wants: health and reflection
are served from rapidserve's own descriptors, so the server starts and answers both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc
from remote import RemoteServer
from standard_services import health_check, reflect
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model

from rapidserve import protos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BLOCK = "import sys\nfor _name in ('grpc_health', 'grpc_reflection'):\n    sys.modules[_name] = None\n"


def test_serve_answers_health_and_reflection_without_grpc_health_and_grpc_reflection(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    blocked = subprocess.run(
        [sys.executable, "-c", "import grpc_health.v1.health"], env={**os.environ, **env}, capture_output=True
    )
    assert blocked.returncode != 0 and b"ModuleNotFoundError" in blocked.stderr  # the block works
    repo = tmp_path / "repo"
    write_model(repo, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    server = RemoteServer("--model-repository", str(repo), env=env)
    try:
        client = tc.InferenceServerClient(server.url)
        server.wait_ready(client)
        client.close()
        with grpc.insecure_channel(server.url) as channel:
            assert health_check(channel)(protos.HealthCheckRequest(), timeout=10).status == (
                protos.HealthCheckResponse.SERVING
            )
            listed = next(reflect(channel, [protos.ServerReflectionRequest(list_services="")]))
            names = {service.name for service in listed.list_services_response.service}
            assert {protos.SERVICE_NAME, protos.HEALTH_SERVICE_NAME} <= names
    finally:
        assert server.stop() == 0, server.log
    assert "Traceback" not in server.log, server.log
