"""Batch-size buckets for engines that run prepared shapes (CUDA graphs, TensorRT profiles): which
bucket a batch goes to, padding a batch up to it, and taking the padding rows off again.

Pure functions on anything with a ``shape`` and numpy-style slicing (numpy arrays, torch tensors), so
the logic is tested on a CPU; the engines that use it run on a GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from rapidserve.engines.base import EngineInputError

__all__ = ["bucket_for", "default_buckets", "parse_buckets", "select_profile", "unpad"]


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: 1, 2, 4, ..., max."""
    if max_batch < 1:
        return (1,)
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


def parse_buckets(text: str, max_batch: int) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32), checked against the model's max batch size; "" -> the defaults."""
    if not text.strip():
        return default_buckets(max_batch)
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"batch buckets must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or (max_batch > 0 and sizes[-1] > max_batch):
        raise ValueError(f"batch buckets {sizes} must lie between 1 and max_batch_size {max_batch}")
    return tuple(sizes)


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``batch`` rows, or None when the batch is larger than every one."""
    index = bisect.bisect_left(buckets, batch)
    return buckets[index] if index < len(buckets) else None


def unpad(outputs: dict[str, Any], rows: int, bucket: int) -> dict[str, Any]:
    """The first ``rows`` rows of each output computed for a padded batch of ``bucket`` rows.

    An output whose first dimension is not the bucket (a per-batch value) cannot be split and fails
    loudly rather than handing padding results to a client."""
    if rows == bucket:
        return outputs
    trimmed = {}
    for name, value in outputs.items():
        shape = tuple(value.shape)
        if not shape or shape[0] != bucket:
            raise ValueError(f"output '{name}' has shape {list(shape)}: no batch dimension of {bucket} to unpad")
        trimmed[name] = value[:rows]
    return trimmed


def select_profile(
    ranges: Sequence[Sequence[tuple[tuple[int, ...], tuple[int, ...]]]], shapes: Sequence[tuple[int, ...]]
) -> int:
    """The first optimization profile whose (min, max) range admits every input shape.

    ``ranges[p][i]`` is profile p's (min shape, max shape) for input i. Raises ``EngineInputError``
    (a ValueError) naming the shapes and the ranges when no profile fits: the request asks for more
    than the engine was built for, which is the caller's to fix (INVALID_ARGUMENT)."""
    for index, profile in enumerate(ranges):
        if len(profile) != len(shapes):
            continue
        fits = all(
            len(shape) == len(low) == len(high)
            and all(lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True))
            for shape, (low, high) in zip(shapes, profile, strict=True)
        )
        if fits:
            return index
    admitted = "; ".join(", ".join(f"{list(low)}..{list(high)}" for low, high in profile) for profile in ranges)
    raise EngineInputError(
        f"no optimization profile of the engine admits input shapes {[list(s) for s in shapes]}; "
        f"the profiles admit (min..max per input): {admitted or 'none'}"
    )
