"""prepare's runners take batches of any size, also for a model that admits exactly one size."""

from __future__ import annotations

import numpy as np
import pytest

from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.runners import chunked, predict


@pytest.mark.parametrize(("size", "rows"), [(1, 5), (3, 7), (3, 6), (4, 2)])
def test_a_fixed_batch_model_sees_only_batches_of_its_size(size: int, rows: int) -> None:
    seen: list[int] = []

    def model(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = batch["x"]
        seen.append(len(x))
        return [x * 2, x.sum(axis=1)]

    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    doubled, sums = chunked(model, size)({"x": x})
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(sums, x.sum(axis=1))
    assert set(seen) == {size} and len(seen) == -(-rows // size)


def test_predict_over_a_dataset_in_chunks() -> None:
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    (out,) = predict(chunked(lambda b: [b["x"] + 1], 3), Dataset({"x": x}), batch_size=4)
    np.testing.assert_allclose(out, x + 1)
