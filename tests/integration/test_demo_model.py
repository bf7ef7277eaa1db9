"""The built-in demo model behaves as the README's "Try it" section says: its prediction cache is on, so
`rapidserve bench digits --duplicate-ratio 0.9` shows cache hits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rapidserve import Client
from rapidserve.server.demo import DEMO_MODEL, build_demo_repository, demo_repository


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("demo")
    build_demo_repository(repo)
    return repo


def test_a_repeated_request_to_the_demo_model_is_a_cache_hit(demo_repo: Path, serve) -> None:
    server = serve(demo_repo)
    pixels = np.random.default_rng(0).integers(0, 17, (1, 64)).astype(np.float32)
    with Client(server.url) as client:
        assert client.model_config(DEMO_MODEL).response_cache.enable
        first = client.infer(DEMO_MODEL, {"pixels": pixels})
        second = client.infer(DEMO_MODEL, {"pixels": pixels})
        stats = client.model_statistics(DEMO_MODEL).model_stats[0]
    assert (stats.inference_stats.cache_miss.count, stats.inference_stats.cache_hit.count) == (1, 1)
    assert stats.execution_count == 1  # the hit never reached the engine
    for name in ("label", "probabilities"):
        np.testing.assert_array_equal(first[name], second[name])
    assert first["label"].tolist() == first["probabilities"].argmax(axis=1).tolist()


def test_a_demo_repository_cached_by_an_older_release_gets_the_current_config(tmp_path: Path) -> None:
    build_demo_repository(tmp_path)
    config = tmp_path / DEMO_MODEL / "config.pbtxt"
    current = config.read_text()
    config.write_text("\n".join(line for line in current.splitlines() if "response_cache" not in line) + "\n")
    weights = (tmp_path / DEMO_MODEL / "1" / "model.onnx").read_bytes()

    assert demo_repository(tmp_path) == tmp_path
    assert config.read_text() == current and "response_cache { enable: true }" in current
    assert (tmp_path / DEMO_MODEL / "1" / "model.onnx").read_bytes() == weights  # refreshed, not retrained
