"""Attacks on the repository API: uploads that would run code, config paths that reach outside the
model's folder, names and versions built to break the server, and loads that leave debris behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from testmodels import ONNX_TYPES, scale_graph, write_model

from rapidserve import Client, InferenceServerError
from rapidserve.server.settings import UploadPolicy

pytestmark = pytest.mark.timeout(60)

INT64 = ONNX_TYPES["INT64"]
ALLOW_FILES = UploadPolicy(allow_files=True)


def onnx_bytes(factor: int, name: str = "s") -> bytes:
    from onnx import helper

    model = helper.make_model(scale_graph(name, INT64, factor), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def ones() -> dict[str, np.ndarray]:
    return {"x": np.ones((1, 4), np.int64)}


def refused(call: Callable[[], object]) -> InferenceServerError:
    with pytest.raises(InferenceServerError) as info:
        call()
    return info.value


def index(client: Client) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.repository_index()}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "repo").mkdir()
    return tmp_path / "repo"


@pytest.fixture
def uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[Path]]:
    """Servers started in this test keep their upload folders under a fresh temp dir; the returned
    function lists what is left in them."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return lambda: sorted(p for folder in root.glob("rapidserve-uploads-*") for p in folder.iterdir())


def no_trace(client: Client, name: str, left: Callable[[], list[Path]]) -> None:
    """A refused or failed load leaves no entry (LOADING or otherwise) and no upload folder."""
    assert name not in index(client)
    assert not client.is_model_ready(name)
    assert left() == []


# -- uploads ---------------------------------------------------------------------------------------


def test_uploads_are_refused_unless_the_server_allows_them(repo: Path, serve, uploads) -> None:
    server = serve(repo, model_control_mode="explicit")
    with Client(server.url) as client:
        error = refused(lambda: client.load_model("up", "{}", files={"1/model.onnx": onnx_bytes(2)}))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--allow-model-upload" in error.message
        no_trace(client, "up", uploads)


def torchscript(module: object) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


CODE_UPLOADS = {
    "torchscript by name": ({}, {"1/model.pt": b"PK-not-really"}),
    "torch.export by name": ({}, {"1/model.pt2": b"PK-not-really"}),
    "TensorRT plan by name": ({}, {"1/model.plan": b"ftrt-not-really"}),
    "pt renamed onnx, platform": (
        {"platform": "pytorch_libtorch", "default_model_filename": "model.onnx"},
        {"1/model.onnx": b"PK-not-really"},
    ),
    "pt renamed onnx, backend": (
        {"backend": "pytorch", "default_model_filename": "model.onnx"},
        {"1/model.onnx": b"PK-not-really"},
    ),
    "plan named by backend": ({"backend": "tensorrt"}, {"1/model.plan": b"x"}),
    # the version policy serves version 2, a TorchScript file, though version 1 looks harmless
    "latest version is code": ({}, {"1/model.onnx": onnx_bytes(2), "2/model.pt": b"PK-not-really"}),
    "python model.py by name": ({}, {"1/model.py": b"import os\n"}),
    "python model.py, backend": ({"backend": "python"}, {"1/model.py": b"import os\n"}),
    "python code renamed onnx": (
        {"backend": "python", "default_model_filename": "model.onnx"},
        {"1/model.onnx": b"import os\n"},
    ),
}


@pytest.mark.parametrize("case", list(CODE_UPLOADS))
def test_formats_that_run_code_are_refused_even_when_uploads_are_allowed(case: str, repo: Path, serve, uploads) -> None:
    config, files = CODE_UPLOADS[case]
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        error = refused(lambda: client.load_model("code", json.dumps(config), files=files))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error.message
        assert "--allow-code-models-upload" in error.message
        no_trace(client, "code", uploads)


PYTHON_PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("the uploaded code ran")


class TritonPythonModel:
    def execute(self, requests):
        return []
"""


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_python_model_upload_is_refused_and_its_code_never_runs(
    protocol: str, repo: Path, tmp_path: Path, serve, uploads
) -> None:
    """model.py is code: through either protocol, with uploads allowed, it is refused before it is
    written, let alone imported, unless the server allows code models."""
    marker = tmp_path / "ran"
    config = {
        "backend": "python",
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
    }
    files = {"1/model.py": PYTHON_PAYLOAD.format(marker=str(marker)).encode()}
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    url = server.url if protocol == "grpc" else f"http://{server.http_url}"
    with Client(url) as client:
        error = refused(lambda: client.load_model("py", json.dumps(config), files=files))
        assert "--allow-code-models-upload" in error.message, error.message
        assert "'python' backend" in error.message
        assert protocol == "http" or error.code == grpc.StatusCode.FAILED_PRECONDITION
        no_trace(client, "py", uploads)
    assert not marker.exists()


def test_code_formats_load_once_the_server_allows_them(repo: Path, serve, uploads) -> None:
    policy = UploadPolicy(allow_files=True, allow_code_models=True)
    server = serve(repo, model_control_mode="explicit", uploads=policy)
    config = {
        "backend": "pytorch",
        "input": [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [2, 4]}],
        "output": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": [2, 4]}],
    }
    import torch
    from testmodels import seeded

    linear = seeded(lambda: torch.nn.Linear(4, 4)).eval()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with torch.no_grad():
        expected = linear(torch.from_numpy(x)).numpy()
    with Client(server.url) as client:
        client.load_model("scripted", json.dumps(config), files={"1/model.pt": torchscript(linear)})
        np.testing.assert_allclose(client.infer("scripted", {"INPUT__0": x})["OUTPUT__0"], expected, rtol=1e-6)


def test_upload_size_is_capped_per_load(repo: Path, serve, uploads) -> None:
    model = onnx_bytes(4)
    config = json.dumps({"backend": "onnxruntime"})
    half = len(model) // 2
    files = {"1/model.onnx": model, "warmup/a.bin": b"\0" * half, "warmup/b.bin": b"\0" * (len(model) - half)}
    total = 2 * len(model)
    server = serve(repo, model_control_mode="explicit", uploads=UploadPolicy(allow_files=True, max_bytes=total))
    with Client(server.url) as client:
        over = dict(files, **{"warmup/c.bin": b"\0"})
        error = refused(lambda: client.load_model("big", config, files=over))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-upload-bytes" in error.message and str(total) in error.message
        no_trace(client, "big", uploads)
        many = {f"warmup/{i}.bin": b"" for i in range(10_001)}
        error = refused(lambda: client.load_model("big", config, files=many))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 10000 files" in error.message
        no_trace(client, "big", uploads)
        client.load_model("big", config, files=files)  # exactly at the limit
        assert client.infer("big", ones())["y"][0, 0] == 4


def test_a_failed_upload_leaves_no_entry_no_folder_and_no_temp_path(repo: Path, tmp_path: Path, serve, uploads) -> None:
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    config = json.dumps({"backend": "onnxruntime"})
    with Client(server.url) as client:
        for files in ({"1/model.onnx": b"not a model"}, {"../escape.onnx": b"x"}, {"1/model.pt": b"x"}):
            error = refused(lambda files=files: client.load_model("broken", config, files=files))
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
            assert str(tmp_path) not in error.message and "rapidserve-uploads" not in error.message
            no_trace(client, "broken", uploads)
        client.load_model("broken", config, files={"1/model.onnx": onnx_bytes(3)})  # the name is still usable
        assert client.infer("broken", ones())["y"][0, 0] == 3
        assert index(client)["broken"][0] == "READY"


def test_a_refused_upload_of_a_loaded_model_keeps_it_serving(repo: Path, serve, uploads) -> None:
    write_model(repo, "scale", scale_graph("scale", INT64, 3))
    server = serve(repo, model_control_mode="explicit", load_models=("*",), uploads=ALLOW_FILES)
    with Client(server.url) as client:
        error = refused(lambda: client.load_model("scale", "{}", files={"1/model.pt": b"x"}))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert index(client)["scale"][0] == "READY"
        assert client.infer("scale", ones())["y"][0, 0] == 3
        assert uploads() == []


# -- model names and phantom entries ----------------------------------------------------------------


def test_unknown_names_leave_no_entry_and_real_failures_keep_their_reason(tmp_path: Path, serve) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3))
    server = serve(tmp_path, model_control_mode="explicit")
    with Client(server.url) as client:
        for name in ("ghost", "ghost2", "ghost"):
            error = refused(lambda name=name: client.load_model(name))
            assert error.code == grpc.StatusCode.NOT_FOUND
        assert set(index(client)) == {"scale"}
        error = refused(lambda: client.load_model("scale", '{"default_model_filename": "none.onnx"}'))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        state, reason = index(client)["scale"]
        assert state == "UNAVAILABLE" and "none.onnx" in reason


@pytest.mark.parametrize(
    "name",
    ["m" * 256, "é" * 128, "m" * 300, "a\0b", "a/b", "..", ".", ".hidden", "", "a\nb"],
    ids=[
        "256 bytes",
        "256 bytes of UTF-8",
        "300 chars",
        "NUL",
        "slash",
        "dotdot",
        "dot",
        "leading dot",
        "empty",
        "newline",
    ],
)
def test_invalid_model_names_are_invalid_argument_without_temp_paths(
    name: str, repo: Path, tmp_path: Path, serve, uploads
) -> None:
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        for files in (None, {"1/model.onnx": onnx_bytes(2)}):
            error = refused(lambda files=files: client.load_model(name, '{"backend": "onnxruntime"}', files=files))
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
            assert "invalid model name" in error.message
            assert "rapidserve-uploads" not in error.message and str(tmp_path) not in error.message
            assert len(error.message) < 500
        assert index(client) == {} and uploads() == []


@pytest.mark.parametrize("name", ["m" * 255, "é" * 127 + "m"], ids=["255 ASCII", "255 bytes of UTF-8"])
def test_a_name_at_the_length_limit_loads(name: str, repo: Path, serve, uploads) -> None:
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        error = refused(lambda: client.load_model(name))
        assert error.code == grpc.StatusCode.NOT_FOUND  # valid, merely not in the repository
        client.load_model(name, '{"backend": "onnxruntime"}', files={"1/model.onnx": onnx_bytes(6)})
        assert client.infer(name, ones())["y"][0, 0] == 6


# -- versions --------------------------------------------------------------------------------------

# "²" and "\u0661" (ARABIC-INDIC DIGIT ONE) pass str.isdigit(); int() refuses the first and reads the second as 1
ODD_VERSIONS = ["9" * 5000, "²", "\u0661", "-1", " 1", "1 ", "1.0", "+1", "0x1"]


def test_odd_version_strings_are_not_found(tmp_path: Path, serve) -> None:
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3))
    server = serve(tmp_path)
    with Client(server.url) as client:
        for version in ODD_VERSIONS:
            assert not client.is_model_ready("scale", version)
            for call in (
                lambda v=version: client.infer("scale", ones(), version=v),
                lambda v=version: client.model_metadata("scale", v),
                lambda v=version: client.model_config("scale", v),
            ):
                error = refused(call)
                assert error.code == grpc.StatusCode.NOT_FOUND, (version[:10], error.message[:200])
                assert "no version" in error.message and "loaded: 1" in error.message
                assert len(error.message) < 300
        assert client.infer("scale", ones(), version="1")["y"][0, 0] == 3


# -- paths a config names --------------------------------------------------------------------------


def outside_model(tmp_path: Path) -> Path:
    """A working ONNX model outside the repository: the thing an attacker wants served or probed."""
    write_model(tmp_path / "outside", "secret", scale_graph("secret", INT64, 42))
    return tmp_path / "outside" / "secret" / "1" / "model.onnx"


def template(message: str) -> str:
    """A message with every quoted value (model names, the paths a caller gave) blanked out; what is
    left must not show a host path."""
    text = re.sub(r"'[^']*'", "'<v>'", message)
    assert "/tmp" not in text and "/outside" not in text and "/repo" not in text, message
    return text


def same_answer(errors: list[InferenceServerError]) -> None:
    """Every error is INVALID_ARGUMENT and reads the same once the values are blanked out: nothing
    tells whether a target exists."""
    for error in errors:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    texts = {template(error.message) for error in errors}
    assert len(texts) == 1, texts


def test_default_model_filename_outside_the_version_folder_is_refused(tmp_path: Path, serve) -> None:
    secret = outside_model(tmp_path)
    missing = str(secret).replace("secret", "absent")
    repo = tmp_path / "repo"
    write_model(repo, "scale", scale_graph("scale", INT64, 3))
    write_model(repo, "other", scale_graph("other", INT64, 5))
    server = serve(repo, model_control_mode="explicit", load_models=("*",))
    with Client(server.url) as client:
        errors = []
        for given in (str(secret), missing, "../../other/1/model.onnx", "../1/model.onnx", "1/model.onnx"):
            override = json.dumps({"default_model_filename": given})
            errors.append(refused(lambda o=override: client.load_model("scale", o)))
            assert client.infer("scale", ones())["y"][0, 0] == 3  # the old version still serves
        same_answer(errors)
        assert "default_model_filename" in errors[0].message


def test_default_model_filename_in_config_pbtxt_cannot_reach_outside(tmp_path: Path, serve) -> None:
    secret = outside_model(tmp_path)
    repo = tmp_path / "repo"
    givens = {"abs": str(secret), "absent": str(secret).replace("secret", "absent"), "up": "../../../outside"}
    for name, given in givens.items():
        write_model(repo, name, scale_graph(name, INT64, 3), f'default_model_filename: "{given}"')
    server = serve(repo)
    with Client(server.url) as client:
        reasons = index(client)
        for name in givens:
            assert reasons[name][0] == "UNAVAILABLE" and not client.is_model_ready(name)
        texts = {template(reasons[name][1]) for name in givens}
        assert len(texts) == 1, texts
        assert "default_model_filename" in texts.pop()


@pytest.mark.parametrize("via", ["config.pbtxt", "override"])
def test_a_named_model_file_linked_out_of_the_model_folder_is_refused(via: str, tmp_path: Path, serve) -> None:
    secret = outside_model(tmp_path)
    repo = tmp_path / "repo"
    named = 'default_model_filename: "model.onnx"'
    for name, target in (("linked", secret), ("dangling", secret.with_name("absent.onnx"))):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").symlink_to(target)
        (repo / name / "config.pbtxt").write_text(named)
    # a version folder that is a link out of the model folder is no better
    (repo / "linkdir").mkdir()
    (repo / "linkdir" / "1").symlink_to(secret.parent, target_is_directory=True)
    (repo / "linkdir" / "config.pbtxt").write_text(named)
    # a link that stays inside the model folder is fine
    write_model(repo, "inside", scale_graph("inside", INT64, 7), named)
    os.rename(repo / "inside" / "1" / "model.onnx", repo / "inside" / "real.onnx")
    (repo / "inside" / "1" / "model.onnx").symlink_to(Path("..") / "real.onnx")
    explicit = via == "override"
    server = serve(repo, model_control_mode="explicit" if explicit else "none")
    with Client(server.url) as client:
        if explicit:
            override = json.dumps({"backend": "onnxruntime", "default_model_filename": "model.onnx"})
            for name in ("linked", "dangling", "linkdir", "inside"):
                with pytest.raises(InferenceServerError) if name != "inside" else contextlib.nullcontext():
                    client.load_model(name, override)
        reasons = index(client)
        texts = {template(reasons[name][1]) for name in ("linked", "dangling", "linkdir")}
        assert len(texts) == 1, texts
        assert not any(client.is_model_ready(name) for name in ("linked", "dangling", "linkdir"))
        assert client.infer("inside", ones())["y"][0, 0] == 7


def test_the_operators_own_links_to_a_model_store_are_followed(tmp_path: Path, serve) -> None:
    """Files found by their default names were put there by the operator, who may link them to a shared
    store; only a caller could not create such a link."""
    secret = outside_model(tmp_path)
    repo = tmp_path / "repo"
    (repo / "linked" / "1").mkdir(parents=True)
    (repo / "linked" / "1" / "model.onnx").symlink_to(secret)
    (repo / "linkdir").mkdir()
    (repo / "linkdir" / "1").symlink_to(secret.parent, target_is_directory=True)
    (repo / "dangling" / "1").mkdir(parents=True)
    (repo / "dangling" / "1" / "model.onnx").symlink_to(secret.with_name("absent.onnx"))
    server = serve(repo)
    with Client(server.url) as client:
        assert client.infer("linked", ones())["y"][0, 0] == 42
        assert client.infer("linkdir", ones())["y"][0, 0] == 42
        assert not client.is_model_ready("dangling")
        assert "is not a regular file" in template(index(client)["dangling"][1])


WARMUP = (
    'max_batch_size: 4\nmodel_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: '
    '{ data_type: TYPE_INT64 dims: [4] input_data_file: "%s" } } } ]'
)


def warmup_override(file: str) -> str:
    entry = {
        "name": "w",
        "batch_size": 1,
        "inputs": {"x": {"data_type": "TYPE_INT64", "dims": [4], "input_data_file": file}},
    }
    return json.dumps({"max_batch_size": 4, "model_warmup": [entry]})


def test_warmup_files_outside_the_warmup_folder_are_refused(tmp_path: Path, serve) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "scale", scale_graph("scale", INT64, 3))
    (repo / "scale" / "warmup").mkdir()
    (repo / "scale" / "warmup" / "zero").symlink_to("/dev/zero")
    (repo / "scale" / "warmup" / "host").symlink_to(tmp_path / "hostname")
    (tmp_path / "hostname").write_bytes(np.arange(4, dtype=np.int64).tobytes())  # the right size, even
    (repo / "scale" / "1" / "x.bin").write_bytes(np.arange(4, dtype=np.int64).tobytes())  # in the model, not warmup/
    server = serve(repo, model_control_mode="explicit", load_models=("*",))
    givens = ["/dev/zero", "../../etc/hostname", "../../../hostname", "zero", "host", "../1/x.bin", "/etc/hostname"]
    with Client(server.url) as client:
        errors = [refused(lambda g=given: client.load_model("scale", warmup_override(g))) for given in givens]
        same_answer(errors)
        assert "input_data_file" in errors[0].message
        assert client.infer("scale", ones())["y"][0, 0] == 3


def test_warmup_files_in_config_pbtxt_are_confined_and_read_with_a_bound(tmp_path: Path, serve) -> None:
    repo = tmp_path / "repo"
    right = np.arange(4, dtype=np.int64).tobytes()
    cases = {"devzero": "/dev/zero", "etc": "../../etc/hostname", "link": "zero", "short": "short.bin",
             "long": "long.bin", "huge": "huge.bin", "fifo": "fifo", "folder": "folder", "good": "good.bin"}  # fmt: skip
    for name, given in cases.items():
        write_model(repo, name, scale_graph(name, INT64, 3), WARMUP % given)
        warmup = repo / name / "warmup"
        warmup.mkdir()
        (warmup / "zero").symlink_to("/dev/zero")
        (warmup / "short.bin").write_bytes(right[:-1])
        (warmup / "long.bin").write_bytes(right + b"\0")
        with open(warmup / "huge.bin", "wb") as f:
            f.truncate(2**34)  # sparse: 16 GiB that must never be read
        os.mkfifo(warmup / "fifo")
        (warmup / "folder").mkdir()
        (warmup / "good.bin").write_bytes(right)
    server = serve(repo)
    with Client(server.url) as client:
        reasons = index(client)
        assert client.is_model_ready("good")
        for name in ("devzero", "etc", "link"):
            assert reasons[name][0] == "UNAVAILABLE"
        texts = {template(reasons[n][1]) for n in ("devzero", "etc", "link")}
        assert len(texts) == 1, texts
        for name in ("short", "long", "huge"):
            assert reasons[name][0] == "UNAVAILABLE"
            assert f"holds {(warmup / cases[name]).stat().st_size} bytes" in reasons[name][1], reasons[name][1]
            assert "32" in reasons[name][1]
        for name in ("fifo", "folder"):
            assert reasons[name][0] == "UNAVAILABLE" and "not a regular file" in reasons[name][1], reasons[name][1]
        assert all(str(tmp_path) not in reason for _, reason in reasons.values())


# -- ONNX external data ----------------------------------------------------------------------------


def external_model(location: str) -> bytes:
    """y = x + w, with the INT64 initializer w stored in another file at ``location``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros(4, np.int64), "w")
    w.ClearField("raw_data")
    w.ClearField("int64_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", INT64, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


WEIGHTS = np.array([10, 20, 30, 40], np.int64).tobytes()


def test_onnx_external_data_must_stay_in_the_version_folder(repo: Path, tmp_path: Path, serve, uploads) -> None:
    (tmp_path / "weights.bin").write_bytes(WEIGHTS)
    repo = tmp_path / "repo"
    givens = {
        "abs": str(tmp_path / "weights.bin"),
        "absent": str(tmp_path / "absent.bin"),
        "up": "../../../weights.bin",
        "upabsent": "../../../absent.bin",
        "link": "link.bin",
    }
    for name, location in givens.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(external_model(location))
        (repo / name / "1" / "link.bin").symlink_to(tmp_path / "weights.bin")
    (repo / "good" / "1").mkdir(parents=True)
    (repo / "good" / "1" / "model.onnx").write_bytes(external_model("weights.bin"))
    (repo / "good" / "1" / "weights.bin").write_bytes(WEIGHTS)
    server = serve(repo, model_control_mode="explicit", load_models=("*",), uploads=ALLOW_FILES)
    with Client(server.url) as client:
        reasons = index(client)
        texts = {template(reasons[n][1]) for n in givens}
        assert len(texts) == 1, texts
        assert "external data" in texts.pop()
        np.testing.assert_array_equal(client.infer("good", ones())["y"][0], [11, 21, 31, 41])
        # the same through an upload (the files land in a folder of the server's choosing)
        config = json.dumps({"backend": "onnxruntime"})
        for location in (str(tmp_path / "weights.bin"), "../../weights.bin", "../../../../../../../../etc/hostname"):
            error = refused(
                lambda loc=location: client.load_model("uploaded", config, files={"1/model.onnx": external_model(loc)})
            )
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "external data" in error.message
            assert "rapidserve-uploads" not in template(error.message)
            no_trace(client, "uploaded", uploads)
        client.load_model("uploaded", config, files={"1/model.onnx": external_model("w.bin"), "1/w.bin": WEIGHTS})
        np.testing.assert_array_equal(client.infer("uploaded", ones())["y"][0], [11, 21, 31, 41])


# -- what a caller's config may cost ----------------------------------------------------------------

CPUS = os.cpu_count() or 1
MESSAGE_LIMIT = 64 * 2**20  # the server's default --grpc-max-message-bytes


def warmup_entry(
    name: str = "w", batch_size: int = 1, dims: tuple[int, ...] = (4,), count: int = 1, kind: str = "zero_data"
) -> dict:
    value = {"data_type": "TYPE_INT64", "dims": list(dims), kind: True}
    return {"name": name, "batch_size": batch_size, "count": count, "inputs": {"x": value}}


def with_warmup(*entries: dict) -> str:
    return json.dumps({"max_batch_size": 4, "model_warmup": list(entries)})


@pytest.fixture
def scale_server(tmp_path: Path, serve):
    """An explicit-mode server with 'scale' (y = 3 x, INT64 [batch, 4]) loaded from its repository."""
    write_model(tmp_path / "repo", "scale", scale_graph("scale", INT64, 3))
    return serve(tmp_path / "repo", model_control_mode="explicit", load_models=("*",))


def refused_override(client: Client, override: str, *words: str) -> InferenceServerError:
    """A reload of 'scale' with ``override`` is INVALID_ARGUMENT naming ``words``; 'scale' keeps serving."""
    error = refused(lambda: client.load_model("scale", override))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    for word in words:
        assert word in error.message, (word, error.message)
    assert client.infer("scale", ones())["y"][0, 0] == 3
    return error


def test_a_callers_warmup_request_is_at_most_the_message_limit(scale_server) -> None:
    rows = MESSAGE_LIMIT // (4 * 8)  # INT64 [rows, 4]: exactly the limit
    with Client(scale_server.url) as client:
        refused_override(client, with_warmup(warmup_entry(batch_size=rows + 1)), "model_warmup", str(MESSAGE_LIMIT))
        huge = warmup_entry(dims=(500_000_000,), kind="random_data")
        refused_override(client, with_warmup(huge), "model_warmup", "--grpc-max-message-bytes")
        client.load_model("scale", with_warmup(warmup_entry(batch_size=rows)))
        assert client.infer("scale", ones())["y"][0, 0] == 3


async def test_the_warmup_limit_is_the_message_limit_the_manager_is_given(tmp_path: Path) -> None:
    from rapidserve.server.errors import ModelLoadError
    from rapidserve.server.manager import ModelManager

    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3))
    manager = ModelManager([tmp_path], control_mode="explicit", max_message_bytes=4096)
    await manager.start()
    try:
        with pytest.raises(ModelLoadError, match="at most 4096 bytes"):
            await manager.load("scale", config_json=with_warmup(warmup_entry(batch_size=129)))  # 129 x 4 x 8 bytes
        assert not manager.is_ready("scale")
        await manager.load("scale", config_json=with_warmup(warmup_entry(batch_size=128)))  # exactly 4096
        assert manager.is_ready("scale")
    finally:
        assert await manager.stop(5) == []


def test_the_server_holds_a_callers_warmup_to_its_own_message_limit(tmp_path: Path, serve) -> None:
    write_model(tmp_path / "repo", "scale", scale_graph("scale", INT64, 3))
    server = serve(tmp_path / "repo", model_control_mode="explicit", load_models=("*",), grpc_max_message_bytes=4096)
    with Client(server.url) as client:
        refused_override(client, with_warmup(warmup_entry(batch_size=129)), "4096")  # 129 x 4 x 8 bytes
        client.load_model("scale", with_warmup(warmup_entry(batch_size=128)))


def test_a_callers_input_dims_bound_the_default_warmup(tmp_path: Path, serve) -> None:
    """Without warm-up entries the server warms up with zeros of the inputs' dims: a caller's dims
    are held to the same limit."""
    from testmodels import sum_graph

    write_model(tmp_path / "repo", "sum", sum_graph())
    server = serve(tmp_path / "repo", model_control_mode="explicit", load_models=("*",))
    with Client(server.url) as client:
        over = MESSAGE_LIMIT // 4 + 1  # FP32
        override = json.dumps({"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [over]}]})
        error = refused(lambda: client.load_model("sum", override))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
        assert "warm-up" in error.message and str(MESSAGE_LIMIT) in error.message, error.message
        x = np.arange(5, dtype=np.float32)
        assert client.infer("sum", {"x": x})["total"][0] == 10


def test_a_callers_warmup_count_is_bounded(scale_server) -> None:
    with Client(scale_server.url) as client:
        for entries in (
            [warmup_entry(f"e{i}") for i in range(101)],
            [warmup_entry("a", count=60), warmup_entry("b", count=41)],
            [warmup_entry(count=100_000_000)],
        ):
            refused_override(client, with_warmup(*entries), "model_warmup", "100")
        client.load_model("scale", with_warmup(warmup_entry("a", count=60), warmup_entry("b", count=40)))
        assert client.infer("scale", ones())["y"][0, 0] == 3


def test_a_callers_instance_count_is_bounded(scale_server) -> None:
    bound = str(4 * CPUS)
    with Client(scale_server.url) as client:
        for groups in (
            [{"kind": "KIND_CPU", "count": 4 * CPUS + 1}],
            [{"kind": "KIND_CPU", "count": 4 * CPUS}, {"kind": "KIND_CPU", "count": 1}],
            [{"kind": "KIND_CPU", "count": 2**31 - 1}],
            [{"kind": "KIND_GPU", "count": 2 * CPUS + 1, "gpus": [0, 1]}],  # refused before any GPU is asked for
        ):
            refused_override(client, json.dumps({"instance_group": groups}), "instance_group", bound)
        refused_override(client, json.dumps({"instance_group": [{"count": -1}]}), "instance_group", "count")
        client.load_model("scale", json.dumps({"instance_group": [{"kind": "KIND_CPU", "count": 2}]}))
        assert client.model_config("scale").instance_group[0].count == 2
        assert client.infer("scale", ones())["y"][0, 0] == 3


@pytest.mark.parametrize("parameter", ["intra_op_thread_count", "inter_op_thread_count"])
def test_a_callers_thread_counts_are_at_most_the_cpus(parameter: str, scale_server) -> None:
    def threads(value: str) -> str:
        return json.dumps({"parameters": {parameter: {"string_value": value}}})

    with Client(scale_server.url) as client:
        refused_override(client, threads(str(CPUS + 1)), parameter, str(CPUS))
        refused_override(client, threads("100000"), parameter, str(CPUS))
        refused_override(client, threads("lots"), parameter)
        refused_override(client, threads("-1"), parameter)
        client.load_model("scale", threads(str(CPUS)))
        assert client.infer("scale", ones())["y"][0, 0] == 3


def test_the_operators_config_pbtxt_is_not_bounded(tmp_path: Path, serve) -> None:
    config = (
        f'max_batch_size: 4\nparameters {{ key: "intra_op_thread_count" value: {{ string_value: "{CPUS + 1}" }} }}\n'
        'model_warmup [ { name: "w" batch_size: 1 count: 101 inputs { key: "x" value: '
        "{ data_type: TYPE_INT64 dims: [4] zero_data: true } } } ]"
    )
    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), config)
    server = serve(tmp_path, model_control_mode="explicit", load_models=("*",))
    with Client(server.url) as client:
        assert client.infer("scale", ones())["y"][0, 0] == 3
        client.load_model("scale")  # a reload of the repository's config: still the operator's
        assert client.infer("scale", ones())["y"][0, 0] == 3


def padded(size: int) -> str:
    """A valid config override of exactly ``size`` bytes (an unused parameter pads it)."""
    empty = json.dumps({"parameters": {"pad": {"string_value": ""}}})
    return json.dumps({"parameters": {"pad": {"string_value": "x" * (size - len(empty))}}})


def test_a_callers_config_is_at_most_1_mib(scale_server) -> None:
    with Client(scale_server.url) as client:
        refused_override(client, padded(2**20 + 1), "config", str(2**20))
        client.load_model("scale", padded(2**20))
        assert client.infer("scale", ones())["y"][0, 0] == 3


def test_the_name_is_checked_before_the_config(scale_server) -> None:
    with Client(scale_server.url) as client:
        for config in ("{", padded(2**20 + 1), '{"max_batch_size": "lots"}'):
            error = refused(lambda c=config: client.load_model("ghost", c))
            assert error.code == grpc.StatusCode.NOT_FOUND, error.message
        assert set(index(client)) == {"scale"}


def test_a_callers_config_is_parsed_off_the_event_loop(scale_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.protobuf import json_format

    parse, threads = json_format.Parse, []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return parse(*args, **kwargs)

    async def current() -> threading.Thread:
        return threading.current_thread()

    monkeypatch.setattr(json_format, "Parse", recording)
    loop_thread = scale_server.run(current())
    with Client(scale_server.url) as client:
        client.load_model("scale", json.dumps({"max_batch_size": 2}))
        assert client.model_config("scale").max_batch_size == 2
    assert threads and loop_thread not in threads


# -- uploads that would carry a TensorRT engine -----------------------------------------------------


def ep_context_model(where: str) -> bytes:
    """x INT64 [batch, 4] -> y through an EPContext node (ONNX Runtime's wrapper for a compiled engine,
    here a few bytes standing for a serialized TensorRT engine): in the graph, in an If branch, or in a
    model-local function. It need not run."""
    from onnx import helper

    def ep_node(output: str = "y") -> object:
        return helper.make_node(
            "EPContext", ["x"], [output], domain="com.microsoft", embed_mode=1,
            ep_cache_context=b"serialized engine", source="TensorrtExecutionProvider",
        )  # fmt: skip

    x = helper.make_tensor_value_info("x", INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", INT64, ["batch", 4])
    functions = []
    if where == "graph":
        nodes = [ep_node()]
    elif where == "subgraph":
        branch = helper.make_graph([ep_node("b")], "branch", [], [helper.make_tensor_value_info("b", INT64, None)])
        nodes = [
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", 9, [], [True])),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ]
    else:
        functions = [helper.make_function("local", "Wrap", ["x"], ["y"], [ep_node()], [helper.make_opsetid("", 17)])]
        nodes = [helper.make_node("Wrap", ["x"], ["y"], domain="local")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("local", 1)]
    model = helper.make_model(helper.make_graph(nodes, "ep", [x], [y]), opset_imports=opsets, functions=functions)
    model.ir_version = 8
    return model.SerializeToString()


ONNX_CONFIG = json.dumps({"backend": "onnxruntime"})


@pytest.mark.parametrize("where", ["graph", "subgraph", "function"])
def test_an_uploaded_onnx_model_with_epcontext_nodes_is_refused(where: str, repo: Path, serve, uploads) -> None:
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        error = refused(lambda: client.load_model("ep", ONNX_CONFIG, files={"1/model.onnx": ep_context_model(where)}))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error.message
        assert "EPContext" in error.message and "--allow-code-models-upload" in error.message
        no_trace(client, "ep", uploads)
        # only the file the load would open counts: the same bytes elsewhere in the upload are data
        files = {"1/model.onnx": onnx_bytes(2), "1/weights.bin": ep_context_model(where)}
        client.load_model("ep", ONNX_CONFIG, files=files)
        assert client.infer("ep", ones())["y"][0, 0] == 2


def test_a_model_that_only_mentions_epcontext_loads(repo: Path, serve, uploads) -> None:
    from onnx import helper

    model = helper.make_model(scale_graph("EPContext", INT64, 5), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version, model.doc_string = 8, "not an EPContext model"
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        client.load_model("plain", ONNX_CONFIG, files={"1/model.onnx": model.SerializeToString()})
        assert client.infer("plain", ones())["y"][0, 0] == 5


ACCELERATED = json.dumps(
    {
        "backend": "onnxruntime",
        "optimization": {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "tensorrt"}]}},
    }
)


def test_an_upload_asking_for_execution_accelerators_is_refused(repo: Path, serve, uploads) -> None:
    server = serve(repo, model_control_mode="explicit", uploads=ALLOW_FILES)
    with Client(server.url) as client:
        error = refused(lambda: client.load_model("trt", ACCELERATED, files={"1/model.onnx": onnx_bytes(2)}))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error.message
        assert "execution_accelerators" in error.message and "--allow-code-models-upload" in error.message
        no_trace(client, "trt", uploads)


def test_accelerators_and_epcontext_pass_the_upload_check_once_code_models_are_allowed(
    repo: Path, serve, uploads
) -> None:
    policy = UploadPolicy(allow_files=True, allow_code_models=True)
    server = serve(repo, model_control_mode="explicit", uploads=policy)
    with Client(server.url) as client:
        client.load_model("trt", ACCELERATED, files={"1/model.onnx": onnx_bytes(2)})  # a CPU instance: no TensorRT
        assert client.infer("trt", ones())["y"][0, 0] == 2
        # past the check, ONNX Runtime's CPU provider refuses to run the engine
        error = refused(lambda: client.load_model("ep", ONNX_CONFIG, files={"1/model.onnx": ep_context_model("graph")}))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "EPContext" in error.message, error.message
        assert "ep" not in index(client) and len(uploads()) == 1  # the folder of 'trt' only


# -- the checked file is the file loaded ------------------------------------------------------------


def test_a_named_model_file_is_loaded_from_the_real_path_that_was_checked(tmp_path: Path) -> None:
    """A link swapped after the check cannot redirect the load: the source holds the checked target."""
    from rapidserve.server.config import parse_config_json
    from rapidserve.server.loading import build_version
    from rapidserve.server.repository import read_source

    secret = outside_model(tmp_path)
    write_model(tmp_path / "repo", "scale", scale_graph("scale", INT64, 7))
    folder = tmp_path / "repo" / "scale"
    os.rename(folder / "1" / "model.onnx", folder / "real.onnx")
    (folder / "1" / "model.onnx").symlink_to(Path("..") / "real.onnx")
    source = read_source(folder, parse_config_json('{"default_model_filename": "model.onnx"}', "override"))
    (folder / "1" / "model.onnx").unlink()
    (folder / "1" / "model.onnx").symlink_to(secret)
    loaded = build_version(source, 1)
    try:
        assert loaded.engines[0].infer(ones(), ["y"])["y"][0, 0] == 7
    finally:
        for engine in loaded.engines:
            engine.close()
