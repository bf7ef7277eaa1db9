"""The built-in demo model: a small MLP that reads 8x8 handwritten digits (scikit-learn's bundled
digits data), trained with numpy on first use and written as an ONNX model repository.

No network: the data ships inside scikit-learn. Training takes about a second; the repository is
cached under ``$XDG_CACHE_HOME/rapidserve`` (or ``~/.cache/rapidserve``) and rebuilt when missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEMO_MODEL", "build_demo_repository", "demo_repository", "train_digits_mlp"]

log = logging.getLogger(__name__)

DEMO_MODEL = "digits"
_HIDDEN = 64
_CONFIG = """\
name: "digits"
backend: "onnxruntime"
max_batch_size: 32
input [ { name: "pixels", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [
  { name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] },
  { name: "label", data_type: TYPE_INT64, dims: [ ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
response_cache { enable: true }
"""


def _cache_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "rapidserve" / "demo-repository"


def demo_repository(cache_dir: Path | None = None) -> Path:
    """The demo repository, built on first use. A cached copy whose config an older release wrote gets
    this release's config (the trained weights stay), so the demo always behaves as documented."""
    repo = cache_dir or _cache_dir()
    if not (repo / DEMO_MODEL / "1" / "model.onnx").is_file():
        build_demo_repository(repo)
    else:
        config = repo / DEMO_MODEL / "config.pbtxt"
        if not config.is_file() or config.read_text() != _CONFIG:
            _write_config(repo)
    return repo


def _write_config(repo: Path) -> None:
    tmp = repo / DEMO_MODEL / "config.pbtxt.tmp"
    tmp.write_text(_CONFIG)
    tmp.replace(repo / DEMO_MODEL / "config.pbtxt")


def train_digits_mlp(seed: int = 0, epochs: int = 300) -> tuple[dict[str, np.ndarray[Any, Any]], float]:
    """Train a 64-64-10 MLP on 80% of the digits (full-batch Adam); returns weights and held-out accuracy.

    Pixels are scaled from 0..16 to 0..1 inside the ONNX graph, so clients send the raw values.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the demo model needs scikit-learn: pip install 'rapidserve[cpu]'") from exc
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    params = {
        "w1": rng.normal(0, np.sqrt(2 / 64), (64, _HIDDEN)).astype(np.float32),
        "b1": np.zeros(_HIDDEN, np.float32),
        "w2": rng.normal(0, np.sqrt(2 / _HIDDEN), (_HIDDEN, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    onehot = np.eye(10, dtype=np.float32)[y[train]]
    for step in range(1, epochs + 1):
        h = np.maximum(x[train] @ params["w1"] + params["b1"], 0)
        logits = h @ params["w2"] + params["b2"]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d_logits = (p - onehot) / len(train)
        d_h = (d_logits @ params["w2"].T) * (h > 0)
        grads = {"w2": h.T @ d_logits, "b2": d_logits.sum(0), "w1": x[train].T @ d_h, "b1": d_h.sum(0)}
        for key, grad in grads.items():
            m, v = moments[key]
            m[:] = 0.9 * m + 0.1 * grad
            v[:] = 0.999 * v + 0.001 * grad**2
            params[key] -= 0.01 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    hidden = np.maximum(x[test] @ params["w1"] + params["b1"], 0)
    accuracy = float(((hidden @ params["w2"] + params["b2"]).argmax(1) == y[test]).mean())
    return params, accuracy


def build_demo_repository(repo: Path) -> float:
    """Train the digits MLP and write ``repo/digits/{config.pbtxt,1/model.onnx}``; returns accuracy."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ImportError("the demo model needs onnx: pip install 'rapidserve[cpu]'") from exc
    params, accuracy = train_digits_mlp()
    scale = np.array(1 / 16, np.float32)
    initializers = [numpy_helper.from_array(v, k) for k, v in {**params, "scale": scale}.items()]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "w1", "b1"], ["hidden_pre"]),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rapidserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    version_dir = repo / DEMO_MODEL / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    tmp = version_dir / "model.onnx.tmp"
    tmp.write_bytes(model.SerializeToString())
    _write_config(repo)
    tmp.replace(version_dir / "model.onnx")
    log.info("built the demo model '%s' in %s (held-out accuracy %.1f%%)", DEMO_MODEL, repo, accuracy * 100)
    return accuracy
