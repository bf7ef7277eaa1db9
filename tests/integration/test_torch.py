"""The PyTorch backend: torch.export programs (.pt2) and TorchScript (.pt), served and compared with eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testmodels import seeded

from rapidserve import Client, InferenceServerError

torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'rapidserve[torch]'")

pytestmark = pytest.mark.timeout(180)


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = seeded(lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))

    def forward(self, features: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(features) + offset
        return logits, logits.argmax(dim=1)


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("torch-repo")
    model = TwoHeads().eval()
    example = (torch.randn(2, 8), torch.randn(2, 4))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, example, dynamic_shapes={"features": {0: batch}, "offset": {0: batch}})
    (repo / "exported" / "1").mkdir(parents=True)
    torch.export.save(program, str(repo / "exported" / "1" / "model.pt2"))

    (repo / "scripted" / "1").mkdir(parents=True)
    torch.jit.trace(model, example).save(str(repo / "scripted" / "1" / "model.pt"))
    (repo / "scripted" / "config.pbtxt").write_text("""
backend: "pytorch"
max_batch_size: 16
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 8 ] }, { name: "INPUT__1", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "label", data_type: TYPE_INT64, dims: [ ] } ]
""")
    return repo


def eager(features: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits, label = TwoHeads().eval()(torch.from_numpy(features), torch.from_numpy(offset))
    return logits.numpy(), label.numpy()


def test_exported_program_describes_its_own_io_and_matches_eager(torch_repo: Path, serve) -> None:
    server = serve(torch_repo)
    features = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    offset = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    logits, label = eager(features, offset)
    with Client(server.url) as client:
        meta = client.model_metadata("exported")
        assert meta.platform == "pytorch_libtorch"
        assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [
            ("features", "FP32", (-1, 8)),
            ("offset", "FP32", (-1, 4)),
        ]
        assert [(s.name, s.datatype) for s in meta.outputs] == [("OUTPUT__0", "FP32"), ("OUTPUT__1", "INT64")]
        out = client.infer("exported", {"features": features, "offset": offset})
        np.testing.assert_allclose(out["OUTPUT__0"], logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["OUTPUT__1"], label)
        only = client.infer("exported", {"features": features, "offset": offset}, ["OUTPUT__1"])
        assert list(only) == ["OUTPUT__1"]


def test_torchscript_takes_its_io_from_the_config(torch_repo: Path, serve) -> None:
    server = serve(torch_repo)
    features = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    offset = np.zeros((3, 4), np.float32)
    logits, label = eager(features, offset)
    with Client(server.url) as client:
        out = client.infer("scripted", {"INPUT__0": features, "INPUT__1": offset})
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["label"], label)
        with pytest.raises(InferenceServerError, match="max_batch_size 16"):
            client.infer(
                "scripted", {"INPUT__0": np.zeros((17, 8), np.float32), "INPUT__1": np.zeros((17, 4), np.float32)}
            )


def test_torchscript_without_config_fails_to_load_with_a_clear_reason(tmp_path: Path, serve) -> None:
    (tmp_path / "bare" / "1").mkdir(parents=True)
    torch.jit.trace(TwoHeads().eval(), (torch.randn(1, 8), torch.randn(1, 4))).save(
        str(tmp_path / "bare" / "1" / "model.pt")
    )
    server = serve(tmp_path)
    with Client(server.url) as client:
        (entry,) = client.repository_index()
    assert entry.state == "UNAVAILABLE"
    assert "give its data_type and dims in config.pbtxt" in entry.reason


def test_loading_torchscript_shows_no_deprecation_notice(tmp_path: Path) -> None:
    """torch.jit.load warns that TorchScript is deprecated; serving TorchScript is a supported format."""
    import warnings

    from rapidserve.engines.base import EngineOptions
    from rapidserve.engines.pytorch import TorchEngine

    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's own notices are not what this test is about
        torch.jit.trace(TwoHeads().eval(), (torch.randn(1, 8), torch.randn(1, 4))).save(str(path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine = TorchEngine(path, EngineOptions(input_names=("a", "b"), output_names=("logits", "label")))
        engine.close()
    assert [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)] == []
