"""The GPU backends' CPU side: ONNX Runtime provider selection, and what a TensorRT plan says on a
machine without TensorRT. Their GPU runs are in tests marked ``gpu`` and ``benchmarks/gpu_check.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rapidserve.engines.base import EngineOptions
from rapidserve.engines.onnx_runtime import select_providers
from rapidserve.engines.registry import load_engine

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def test_providers_follow_the_instance_kind_and_the_accelerators() -> None:
    everything = {CUDA, TRT, CPU}
    assert select_providers(EngineOptions(device="cpu"), everything) == [CPU]
    assert select_providers(EngineOptions(device="cuda:1"), everything) == [(CUDA, {"device_id": 1}), CPU]
    tensorrt = EngineOptions(device="cuda:0", gpu_accelerators=("tensorrt",))
    assert select_providers(tensorrt, everything) == [(TRT, {"device_id": 0}), (CUDA, {"device_id": 0}), CPU]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        select_providers(EngineOptions(device="cuda:0"), {CPU})
    with pytest.raises(RuntimeError, match="no TensorRT provider"):
        select_providers(tensorrt, {CUDA, CPU})


def test_a_plan_without_tensorrt_says_how_to_get_it(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the TensorRT backend takes CUDA memory from torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the gpu tests cover it")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a plan")
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        load_engine("tensorrt", plan, EngineOptions(device="cuda:0"))


@pytest.mark.gpu
def test_onnx_runtime_on_cuda_binds_io_and_matches_the_cpu(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    from testmodels import add_sub_graph, write_model

    folder = write_model(tmp_path, "add_sub", add_sub_graph())
    path = folder / "1" / "model.onnx"
    a, b = (np.random.default_rng(i).standard_normal((3, 16)).astype(np.float32) for i in (0, 1))
    feed = {"INPUT0": a, "INPUT1": b}
    cpu = load_engine("onnxruntime", path, EngineOptions()).infer(feed, ["OUTPUT0", "OUTPUT1"])
    on_gpu = load_engine("onnxruntime", path, EngineOptions(device="cuda:0"))
    assert on_gpu.providers[0] == CUDA  # not a silent fallback to the CPU
    gpu = on_gpu.infer(feed, ["OUTPUT0", "OUTPUT1"])
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-5, atol=1e-5)


def test_instances_go_on_the_listed_gpus_and_cpus() -> None:
    from rapidserve import protos
    from rapidserve.server.loading import KIND_CPU, KIND_GPU, _instance_devices

    config = protos.ModelConfig(name="m")
    config.instance_group.add(kind=KIND_GPU, count=2, gpus=[0, 1])
    config.instance_group.add(kind=KIND_CPU, count=3)
    assert _instance_devices(config) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cpu", "cpu", "cpu"]
    default = protos.ModelConfig(name="m")
    assert _instance_devices(default) == ["cpu"]


def test_torch_compile_is_applied_when_the_config_asks(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="needs the torch extra")
    from testmodels import seeded

    from rapidserve.engines.pytorch import TorchEngine

    model = seeded(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3))).eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    compiled_graphs = []

    def recording_backend(graph, example_inputs):  # compiles nothing: runs the graph as it is
        compiled_graphs.append(graph)
        return graph.forward

    from torch._dynamo import register_backend

    register_backend(recording_backend, name="rapidserve_test_recording")
    compiled = TorchEngine(
        tmp_path / "model.pt2", EngineOptions(parameters={"torch_compile": "rapidserve_test_recording"})
    )
    plain = TorchEngine(tmp_path / "model.pt2", EngineOptions())
    x = {compiled.inputs[0].name: np.ones((3, 4), np.float32)}
    out = compiled.outputs[0].name
    np.testing.assert_allclose(compiled.infer(x, [out])[out], plain.infer(x, [out])[out])
    assert compiled_graphs  # the request went through torch.compile


@pytest.mark.gpu
def test_a_tensorrt_plan_matches_onnx_runtime_on_the_cpu(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (and a CUDA device)")
    torch = pytest.importorskip("torch", reason="the TensorRT backend takes CUDA memory from torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from testmodels import add_sub_graph, write_model

    from rapidserve.engines.prepare.tensorrt import build_plan

    folder = write_model(tmp_path, "add_sub", add_sub_graph())
    onnx_path = folder / "1" / "model.onnx"
    plan = build_plan(trt, onnx_path, tmp_path / "model.plan", fp16=False, int8=False, opt=4, max_batch=8)
    engine = load_engine("tensorrt", plan, EngineOptions(device="cuda:0"))
    assert [s.name for s in engine.inputs] == ["INPUT0", "INPUT1"] and engine.inputs[0].shape[0] == -1
    for rows in (1, 5, 8):
        a, b = (np.random.default_rng(rows + i).standard_normal((rows, 16)).astype(np.float32) for i in (0, 1))
        feed = {"INPUT0": a, "INPUT1": b}
        expected = load_engine("onnxruntime", onnx_path, EngineOptions()).infer(feed, ["OUTPUT0"])
        np.testing.assert_allclose(engine.infer(feed, ["OUTPUT0"])["OUTPUT0"], expected["OUTPUT0"], rtol=1e-5)
    with pytest.raises(ValueError, match="no optimization profile"):
        engine.infer({"INPUT0": np.zeros((9, 16), np.float32), "INPUT1": np.zeros((9, 16), np.float32)}, ["OUTPUT0"])
