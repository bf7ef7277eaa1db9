"""`rapidserve prepare` on ONNX files as model zoos ship them (a batch dimension fixed at 1, opset 9,
a `/` in the input name), served afterwards; and prepare's failures, which are one line each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rapidserve import Client
from rapidserve.cli import main

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("torch", reason="prepare needs the torch extra")
onnx = pytest.importorskip("onnx", reason="prepare needs the torch extra (onnx)")

INPUT, OUTPUT = "gpu_0/data_0", "gpu_0/softmax_1"
VARIANTS = "onnx-fp32,ort-int8,ort-int8-dynamic,onnx-fp16"


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_w": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
        "conv_b": (rng.standard_normal(4) * 0.1).astype(np.float32),
        "fc_w": (rng.standard_normal((4 * 8 * 8, 5)) * 0.1).astype(np.float32),
        "fc_b": (rng.standard_normal(5) * 0.1).astype(np.float32),
    }


def zoo_model(path: Path, *, reshape: str = "") -> Path:
    """Conv 3x3 (pad 1) -> Relu -> Flatten -> Gemm, input [1, 3, 8, 8], opset 9. ``reshape``: flatten with
    a Reshape to [1, -1] instead, its shape an initializer ("constant") or computed by a Concat ("computed")."""
    from onnx import TensorProto, helper, numpy_helper

    params = [numpy_helper.from_array(a, n) for n, a in weights().items()]
    flatten = [helper.make_node("Flatten", ["relu"], ["flat"], axis=1)]
    if reshape == "constant":
        params.append(numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
        flatten = [helper.make_node("Reshape", ["relu", "shape"], ["flat"], name="flatten")]
    elif reshape == "computed":
        params += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("one", 1), ("rest", -1))]
        flatten = [helper.make_node("Concat", ["one", "rest"], ["shape"], axis=0),
                   helper.make_node("Reshape", ["relu", "shape"], ["flat"], name="flatten")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", [INPUT, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        *flatten,
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "zoo",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, 5])],
        params,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected(x: np.ndarray) -> np.ndarray:
    """The zoo model in numpy: a convolution as a sum over the 3x3 window, then Relu and the dense layer."""
    w = weights()
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((len(x), 4, 8, 8))
    for dy in range(3):
        for dx in range(3):
            conv += np.einsum("nchw,oc->nohw", padded[:, :, dy : dy + 8, dx : dx + 8], w["conv_w"][:, :, dy, dx])
    relu = np.maximum(conv + w["conv_b"][None, :, None, None], 0)
    return relu.reshape(len(x), -1) @ w["fc_w"] + w["fc_b"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zoo")
    x = np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(folder / "val.npz", **{INPUT: x})
    return {
        "model": zoo_model(folder / "zoo.onnx"),
        "constant": zoo_model(folder / "constant.onnx", reshape="constant"),
        "computed": zoo_model(folder / "computed.onnx", reshape="computed"),
        "val": folder / "val.npz",
    }


def prepare(*args: str) -> int:
    return main(["prepare", "--bench-seconds", "0.02", *args])


def report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_fixed_batch_model_is_prepared_one_sample_at_a_time_and_served(files, tmp_path: Path, serve) -> None:
    out = tmp_path / "repo"
    code = prepare("--model-file", str(files["model"]), "--name", "zoo", "--val", str(files["val"]),
                   "--out", str(out), "--variants", VARIANTS, "--batch-sizes", "1,8")  # fmt: skip
    assert code == 0
    result = report(out)
    assert result["batch_sizes"] == [1] and result["max_batch_size"] == 0
    assert "fixes its batch dimension at 1" in result["batching"] and "--dynamic-batch" in result["batching"]
    assert "Batching: the model fixes its batch dimension at 1" in (out / "report.md").read_text()
    by_name = {v["name"]: v for v in result["variants"]}
    for name in VARIANTS.split(","):
        assert by_name[name]["status"] == "built", (name, by_name[name].get("reason"))
        assert set(by_name[name]["throughput_per_s"]) == {"1"}
    assert "opset 9 converted to 13" in "; ".join(by_name["ort-int8"]["notes"])
    served = [v for v in result["variants"] if v["model"]]
    assert served and all(v["accepted"] for v in served)
    config = (out / served[0]["model"] / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in config and "dynamic_batching" not in config
    assert f'name: "{INPUT}", data_type: TYPE_FP32, dims: [ 1, 3, 8, 8 ]' in config
    assert f'name: "{OUTPUT}", data_type: TYPE_FP32, dims: [ 1, 5 ]' in config

    x = np.load(files["val"])[INPUT]
    want = expected(x)
    server = serve(out)
    with Client(server.url) as client:
        for variant in served:
            got = np.concatenate([client.infer(variant["model"], {INPUT: x[i : i + 1]})[OUTPUT] for i in range(len(x))])
            # the server gives what prepare measured: the same mean cosine to the original
            assert cosines(want, got).mean() == pytest.approx(variant["cosine_mean"], abs=1e-4), variant["name"]
        fp32 = client.infer("zoo-onnx-fp32", {INPUT: x[:1]})[OUTPUT]
    np.testing.assert_allclose(fp32, want[:1], rtol=1e-4, atol=1e-5)


def test_dynamic_batch_rewrites_the_batch_dimension_and_serves_batches(files, tmp_path: Path, serve) -> None:
    out = tmp_path / "repo"
    code = prepare("--model-file", str(files["model"]), "--name", "zoo", "--val", str(files["val"]),
                   "--out", str(out), "--variants", VARIANTS, "--batch-sizes", "1,8", "--dynamic-batch")  # fmt: skip
    assert code == 0
    result = report(out)
    assert result["batch_sizes"] == [1, 8] and result["max_batch_size"] == 32
    assert "rewritten to a dynamic one" in result["batching"]
    by_name = {v["name"]: v for v in result["variants"]}
    assert all(by_name[n]["status"] == "built" for n in VARIANTS.split(","))
    config = (out / "zoo-onnx-fp32" / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in config and "dims: [ 3, 8, 8 ]" in config and "dims: [ 5 ]" in config
    written = onnx.load(str(out / "zoo-ort-int8" / "1" / "model.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic: the int8 model batches too

    x = np.load(files["val"])[INPUT][:5]
    server = serve(out)
    with Client(server.url) as client:
        got = client.infer("zoo-onnx-fp32", {INPUT: x})[OUTPUT]
        int8 = client.infer("zoo-ort-int8", {INPUT: x})[OUTPUT]
    np.testing.assert_allclose(got, expected(x), rtol=1e-4, atol=1e-5)
    assert int8.shape == (5, 5)


@pytest.mark.parametrize(
    ("reshape", "why"),
    [
        ("constant", "its Reshape node 'flatten' hard-codes the batch in its shape [1, -1]"),  # seen in the graph
        (
            "computed",
            "the rewritten model failed the check against the original: ",
        ),  # seen only when the rewritten model runs: a check, not a guess
    ],
)
def test_dynamic_batch_falls_back_on_a_reshape_that_hard_codes_the_batch(
    files, tmp_path: Path, capsys, reshape: str, why: str
) -> None:
    out = tmp_path / "repo"
    code = prepare("--model-file", str(files[reshape]), "--name", "zoo", "--val", str(files["val"]),
                   "--out", str(out), "--variants", "onnx-fp32", "--dynamic-batch")  # fmt: skip
    assert code == 0
    result = report(out)
    assert result["batching"].startswith(f"--dynamic-batch not applied: {why}"), result["batching"]
    assert "fixes its batch dimension at 1" in result["batching"]
    assert result["max_batch_size"] == 0 and result["batch_sizes"] == [1]
    assert "max_batch_size: 0" in (out / "zoo-onnx-fp32" / "config.pbtxt").read_text()
    assert "--dynamic-batch not applied" in capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if not line.startswith("prepare [")]


def test_a_corrupt_model_file_is_one_line_naming_file_and_step(files, tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(files["model"].read_bytes()[:100])
    assert prepare("--model-file", str(corrupt), "--name", "c", "--val", str(files["val"]), "--out",
                   str(tmp_path / "repo")) == 2  # fmt: skip
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"rapidserve prepare: error: {corrupt}: loading the model: ")


def test_validation_data_of_the_wrong_shape_is_one_line(files, tmp_path: Path, capsys) -> None:
    val = tmp_path / "val.npz"
    np.savez(val, **{INPUT: np.zeros((4, 3, 7, 7), np.float32)})
    assert prepare("--model-file", str(files["model"]), "--name", "z", "--val", str(val), "--out",
                   str(tmp_path / "repo")) == 2  # fmt: skip
    (line,) = error_lines(capsys.readouterr().err)
    step = f"checking {val} against the model's inputs"
    assert line.startswith(f"rapidserve prepare: error: {files['model']}: {step}: input '{INPUT}'")
    assert "[3, 7, 7]" in line and "[1, 3, 8, 8]" in line


def test_an_unexpected_failure_is_one_line_with_the_way_to_the_traceback(
    files, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rapidserve.engines.prepare import pipeline

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline, "write_report", broken)
    assert prepare("--model-file", str(files["model"]), "--name", "z", "--val", str(files["val"]), "--out",
                   str(tmp_path / "repo"), "--variants", "onnx-fp32") == 2  # fmt: skip
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(
        f"rapidserve prepare: error: {tmp_path / 'repo' / 'report.md'}: writing the report: KeyError"
    )
    assert line.endswith("(run with --log-level debug for the traceback)")

    monkeypatch.setattr(pipeline, "_prepare_out", broken)
    assert prepare("--model-file", str(files["model"]), "--name", "z", "--val", str(files["val"]), "--out",
                   str(tmp_path / "repo2"), "--variants", "onnx-fp32") == 2  # fmt: skip
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("rapidserve prepare: error: unexpected KeyError") and "--log-level debug" in line


def test_progress_lines_when_the_output_is_not_a_terminal(files, tmp_path: Path, capsys) -> None:
    assert prepare("--model-file", str(files["model"]), "--name", "z", "--val", str(files["val"]), "--out",
                   str(tmp_path / "repo"), "--variants", "onnx-fp32,tensorrt-fp16") == 0  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    steps = [line.split("] ", 1)[1] for line in lines if line.startswith("prepare [")]
    assert len(steps) == len(lines)
    for what in ("loading the model", "running the original on 40 validation samples", "writing the report"):
        assert any(s.startswith(f"{what}: started") for s in steps), what
        assert any(s.startswith(f"{what}: done in ") for s in steps), what
    assert "variant 1/2 onnx-fp32: building, validating, benchmarking" in steps
    assert any(s.startswith("variant 1/2 onnx-fp32: accepted (") for s in steps)
    trt = next(s for s in steps if s.startswith("variant 2/2 tensorrt-fp16: skipped: "))
    assert "unreachable" not in trt and ("CUDA device" in trt or "not installed" in trt)
