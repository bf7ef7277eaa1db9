"""deploy/kserve's objects built through the KServe Python SDK's models, offline.

The SDK (`kserve` on PyPI) pins python-dateutil below the version the dev environment holds, so it is
not a dev dependency: `.ci/run` runs this file alone in a small environment of its own, and elsewhere it
skips. Building walks the YAML with the models' own field tables, so a field the SDK does not know fails
(the API server would drop it silently), and the models' constructors check required fields.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

with warnings.catch_warnings():  # the SDK's imports are noisy on new Pythons; its warnings are not ours
    warnings.simplefilter("ignore")
    kserve_models = pytest.importorskip(
        "kserve.models", reason="the kserve SDK is not installed here (.ci/run installs it beside, for this file)"
    )
    import kubernetes.client as kubernetes_models

KSERVE = Path(__file__).resolve().parents[2] / "deploy" / "kserve"
SCALARS: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def build(data: Any, kind: str, where: str) -> Any:
    """``data`` as the SDK model ``kind`` (a KServe model, else a Kubernetes one), field by field."""
    if data is None:
        return None
    if match := re.fullmatch(r"[lL]ist\[(.*)\]", kind):
        assert isinstance(data, list), f"{where}: expected a list"
        return [build(item, match.group(1), f"{where}[{i}]") for i, item in enumerate(data)]
    if match := re.fullmatch(r"dict\(str, (.*)\)|Dict\[str, (.*)\]", kind):
        assert isinstance(data, dict), f"{where}: expected a map"
        inner = match.group(1) or match.group(2)
        return {key: build(value, inner, f"{where}.{key}") for key, value in data.items()}
    if kind in SCALARS:
        assert SCALARS[kind] is object or isinstance(data, SCALARS[kind]), f"{where}: expected {kind}, got {data!r}"
        return data
    model = getattr(kserve_models, kind, None) or getattr(kubernetes_models, kind)
    assert isinstance(data, dict), f"{where}: expected a {kind} object"
    attribute_of = {field: attribute for attribute, field in model.attribute_map.items()}
    unknown = sorted(set(data) - set(attribute_of))
    assert not unknown, f"{where}: {kind} has no field {unknown}"
    return model(
        **{
            attribute_of[field]: build(value, model.openapi_types[attribute_of[field]], f"{where}.{field}")
            for field, value in data.items()
        }
    )


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KSERVE / name).read_text())


def test_the_serving_runtime_is_a_kserve_object() -> None:
    runtime = build(load("servingruntime.yaml"), "V1alpha1ClusterServingRuntime", "servingruntime")
    assert runtime.spec.protocol_versions == ["v2", "grpc-v2"]
    assert {f.name for f in runtime.spec.supported_model_formats} == {"onnx", "pytorch", "triton"}
    assert runtime.spec.containers[0].args[0] == "serve"


@pytest.mark.parametrize("name", sorted(p.name for p in KSERVE.glob("inferenceservice*.yaml")))
def test_the_inference_services_are_kserve_objects(name: str) -> None:
    service = build(load(name), "V1beta1InferenceService", name)
    assert service.spec.predictor.model.runtime == "rapidserve"
    assert service.spec.predictor.model.storage_uri


def test_building_refuses_what_kserve_would_not_read() -> None:
    """The check above would catch a misspelled field or a runtime without containers."""
    misspelled = load("servingruntime.yaml")
    misspelled["spec"]["protocolVersion"] = misspelled["spec"].pop("protocolVersions")
    with pytest.raises(AssertionError, match="protocolVersion"):
        build(misspelled, "V1alpha1ClusterServingRuntime", "servingruntime")
    empty = load("servingruntime.yaml")
    del empty["spec"]["containers"]
    with pytest.raises(ValueError, match="containers"):
        build(empty, "V1alpha1ClusterServingRuntime", "servingruntime")
