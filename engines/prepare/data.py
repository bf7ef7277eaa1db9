"""Datasets as ``.npz`` files: one array per model input, keyed by the input's name, plus ``labels``."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Dataset", "load_npz"]

Array = np.ndarray[Any, Any]


@dataclass
class Dataset:
    inputs: dict[str, Array]  # in the model's input order
    labels: Array | None = None

    def __post_init__(self) -> None:
        sizes = {len(a) for a in self.inputs.values()} | ({len(self.labels)} if self.labels is not None else set())
        if len(sizes) != 1:
            raise ValueError(f"every array of a dataset needs the same number of rows, got {sorted(sizes)}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def ordered(self, names: Sequence[str]) -> Dataset:
        """The same data with its inputs in ``names`` order (a model's positional order)."""
        missing = [n for n in names if n not in self.inputs]
        if missing:
            raise ValueError(
                f"the data has no array for input(s) {', '.join(missing)}; it has {', '.join(self.inputs)}"
            )
        return Dataset({n: self.inputs[n] for n in names}, self.labels)

    def sample(self, count: int, seed: int = 0) -> Dataset:
        """``count`` rows picked at random (all of them when there are fewer), in a seeded order."""
        if count >= len(self):
            return self
        index = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        labels = None if self.labels is None else self.labels[index]
        return Dataset({k: v[index] for k, v in self.inputs.items()}, labels)

    def take(self, count: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:count]
        return Dataset({k: v[:count] for k, v in self.inputs.items()}, labels)

    def rows(self, count: int) -> dict[str, Array]:
        """``count`` rows of every input, repeating the data when it has fewer."""
        index = np.arange(count) % len(self)
        return {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()}

    def batches(self, size: int = 64) -> Iterator[dict[str, Array]]:
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def save(self, path: Path) -> None:
        arrays = dict(self.inputs)
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(path, **arrays)


def load_npz(path: Path, input_names: Sequence[str] = ()) -> Dataset:
    """Inputs in ``input_names`` order when given, else in the file's order; ``labels`` when present."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError("not an .npz file (numpy.savez writes one: an array per model input, plus 'labels')")
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    labels = arrays.pop("labels", None)
    if input_names:
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise ValueError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays)}")
        arrays = {n: arrays[n] for n in input_names}
    if not arrays:
        raise ValueError(f"{path}: no input arrays (only labels?)")
    return Dataset(arrays, labels)
