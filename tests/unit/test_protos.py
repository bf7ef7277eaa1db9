from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rapidserve import protos

ROOT = Path(__file__).resolve().parents[2]


def test_generated_descriptor_set_matches_the_proto_files() -> None:
    """Fails when someone edits a .proto without running `python protos/generate.py`."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("first", ["tritonclient", "rapidserve"])
def test_tritonclient_and_rapidserve_import_together(first: str) -> None:
    """Both define package `inference`; ours lives in a private pool, so either import order works."""
    triton = "import tritonclient.grpc, tritonclient.grpc.service_pb2 as t"
    ours = "import rapidserve.protos as p, rapidserve.server.app, rapidserve.clients"
    check = (
        "r = p.ModelInferRequest(model_name='m', id='7'); r.raw_input_contents.append(b'abc');"
        "assert t.ModelInferRequest.FromString(r.SerializeToString()).id == '7';"
        "assert t.ModelInferRequest.DESCRIPTOR.file.pool is not p.POOL"
    )
    code = ";".join([triton, ours] if first == "tritonclient" else [ours, triton]) + ";" + check
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _messages(file_descriptor):
    stack = list(file_descriptor.message_types_by_name.values())
    while stack:
        message = stack.pop()
        yield message
        stack.extend(message.nested_types)


@pytest.mark.parametrize("module", ["service_pb2", "model_config_pb2"])
def test_every_field_matches_tritonclient_on_the_wire(module: str) -> None:
    """Each field we define has the number, type and cardinality tritonclient's messages use."""
    import importlib

    theirs = importlib.import_module(f"tritonclient.grpc.{module}").DESCRIPTOR
    ours = protos.POOL.FindFileByName("grpc_service.proto" if module == "service_pb2" else "model_config.proto")
    compared = 0
    for message in _messages(ours):
        try:
            other = theirs.pool.FindMessageTypeByName(message.full_name)
        except KeyError:
            continue
        for field in message.fields:
            match = other.fields_by_name.get(field.name)
            if match is None:
                continue  # e.g. `runtime`, newer than this tritonclient
            assert (field.number, field.type) == (match.number, match.type), f"{message.full_name}.{field.name}"
            assert field.is_repeated == match.is_repeated, f"{message.full_name}.{field.name}"
            compared += 1
    assert compared > 50


def test_service_paths_match_tritonclient() -> None:
    from tritonclient.grpc import service_pb2

    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in protos.SERVICE.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert method.client_streaming == other.client_streaming


@pytest.mark.parametrize(
    ("ours", "module"),
    [
        ("health.proto", "grpc_health.v1.health_pb2"),
        ("reflection_v1alpha.proto", "grpc_reflection.v1alpha.reflection_pb2"),
    ],
)
def test_health_and_reflection_match_grpcs_own_messages_on_the_wire(ours: str, module: str) -> None:
    """Our health and reflection files against the generated code of grpcio-health-checking and
    grpcio-reflection (dev extras): every message, field number, type and cardinality, every method."""
    other = pytest.importorskip(module, reason="grpcio-health-checking and grpcio-reflection are dev extras").DESCRIPTOR
    mine = protos.POOL.FindFileByName(ours)
    assert mine.package == other.package
    messages = list(_messages(mine))
    assert {m.full_name for m in messages} >= {m.full_name for m in _messages(other)}
    for message in messages:
        match = other.pool.FindMessageTypeByName(message.full_name)
        assert {f.name: (f.number, f.type, f.is_repeated) for f in message.fields} == {
            f.name: (f.number, f.type, f.is_repeated) for f in match.fields
        }, message.full_name
    for service in other.services_by_name.values():
        for method in service.methods:
            ours_method = mine.services_by_name[service.name].methods_by_name[method.name]
            assert ours_method.input_type.full_name == method.input_type.full_name
            assert ours_method.output_type.full_name == method.output_type.full_name
            assert ours_method.server_streaming == method.server_streaming


def test_reflection_v1_has_the_messages_of_v1alpha() -> None:
    """Served with one set of classes: the two versions must agree field by field."""
    alpha = protos.POOL.FindFileByName("reflection_v1alpha.proto")
    stable = protos.POOL.FindFileByName("reflection_v1.proto")
    shape = {
        name: {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}
        for name, message in alpha.message_types_by_name.items()
    }
    assert shape == {
        name: {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}
        for name, message in stable.message_types_by_name.items()
    }
    assert stable.package == "grpc.reflection.v1" and "ServerReflection" in stable.services_by_name
