"""The PyTorch engine on a CUDA device: FP32, FP16 and BF16, CUDA graphs with padded batches, each
against the same model on the CPU; and what a CPU instance refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testmodels import seeded

from rapidserve.engines.base import EngineOptions

torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'rapidserve[torch]'")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = seeded(lambda: torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (torch.zeros(4, 16),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("gpu") / "model.pt2"
    torch.export.save(exported, str(path))
    return path


def engine(path: Path, device: str, **options: object):
    from rapidserve.engines.pytorch import TorchEngine

    return TorchEngine(path, EngineOptions(device=device, max_batch_size=32, **options))  # type: ignore[arg-type]


def run(engine_, x: np.ndarray) -> np.ndarray:
    name = engine_.inputs[0].name
    out = engine_.outputs[0].name
    return engine_.infer({name: x}, [out])[out]


def test_a_cpu_instance_refuses_gpu_only_settings(program: Path) -> None:
    with pytest.raises(ValueError, match="need a GPU instance"):
        engine(program, "cpu", parameters={"precision": "fp16"})
    with pytest.raises(ValueError, match="need a GPU instance"):
        engine(program, "cpu", cuda_graphs=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_cuda_matches_the_cpu(program: Path, precision: str, tolerance: float) -> None:
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    reference = run(engine(program, "cpu"), x)
    got = run(engine(program, "cuda:0", parameters={"precision": precision}), x)
    assert got.dtype == np.float32  # FP16/BF16 outputs come back as the model declares them
    np.testing.assert_allclose(got, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("fp16", 1e-3)])
def test_cuda_graphs_pad_batches_and_return_only_their_rows(program: Path, precision: str, tolerance: float) -> None:
    settings = {"cuda_graph_batch_sizes": "1,4,16", "precision": precision}
    graphed = engine(program, "cuda:0", cuda_graphs=True, parameters=settings)
    eager = engine(program, "cuda:0", parameters={"precision": precision})
    rng = np.random.default_rng(1)
    for rows in (1, 3, 4, 5, 16, 3, 20):  # 3 and 5 are padded; 20 is past every bucket and runs eagerly
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        got = run(graphed, x)
        assert got.shape == (rows, 8)
        np.testing.assert_allclose(got, run(eager, x), rtol=tolerance, atol=tolerance)
    assert graphed._cuda.captured == [1, 4, 16]  # the batches above really replayed graphs
