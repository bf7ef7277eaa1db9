"""Batch buckets, padding removal and profile selection: the CPU side of the GPU engines."""

from __future__ import annotations

import numpy as np
import pytest

from rapidserve.engines.base import EngineInputError
from rapidserve.engines.buckets import bucket_for, default_buckets, parse_buckets, select_profile, unpad


def test_default_buckets_double_up_to_the_max_batch() -> None:
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_buckets(1) == (1,) and default_buckets(0) == (1,)


def test_parsed_buckets_are_sorted_unique_and_within_the_max_batch() -> None:
    assert parse_buckets("8, 1,8,32", 32) == (1, 8, 32)
    assert parse_buckets("", 16) == default_buckets(16)
    for bad in ("0,4", "4,64", "a,b"):
        with pytest.raises(ValueError):
            parse_buckets(bad, 32)


@pytest.mark.parametrize(("batch", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (17, 32), (32, 32), (33, None)])
def test_a_batch_goes_to_the_smallest_bucket_that_holds_it(batch: int, bucket: int | None) -> None:
    assert bucket_for(batch, (1, 2, 4, 8, 16, 32)) == bucket


def test_padding_rows_never_reach_the_outputs() -> None:
    rows, bucket = 3, 4
    outputs = {"y": np.arange(bucket * 2).reshape(bucket, 2), "label": np.array([7, 8, 9, -1])}
    trimmed = unpad(outputs, rows, bucket)
    assert trimmed["y"].shape == (3, 2) and trimmed["label"].tolist() == [7, 8, 9]
    assert unpad(outputs, bucket, bucket) is outputs
    with pytest.raises(ValueError, match="no batch dimension"):
        unpad({"total": np.array(5.0)}, rows, bucket)  # a per-batch scalar cannot be split per request
    torch = pytest.importorskip("torch", reason="the same on torch tensors needs the torch extra")
    assert unpad({"y": torch.ones(4, 3)}, 2, 4)["y"].shape == (2, 3)


def test_the_first_profile_that_admits_every_input_is_chosen() -> None:
    profiles = [
        [((1, 3, 224, 224), (8, 3, 224, 224))],
        [((9, 3, 224, 224), (64, 3, 224, 224))],
    ]
    assert select_profile(profiles, [(4, 3, 224, 224)]) == 0
    assert select_profile(profiles, [(32, 3, 224, 224)]) == 1
    with pytest.raises(ValueError, match="no optimization profile"):
        select_profile(profiles, [(128, 3, 224, 224)])
    with pytest.raises(ValueError):
        select_profile(profiles, [(4, 3, 112, 112)])


def test_a_shape_outside_every_profile_is_the_callers_error_and_says_what_fits() -> None:
    profiles = [[((1, 3), (8, 3)), ((1,), (8,))], [((9, 3), (64, 3)), ((9,), (64,))]]
    assert select_profile(profiles, [(9, 3), (9,)]) == 1
    with pytest.raises(EngineInputError) as info:  # INVALID_ARGUMENT at the edge, not INTERNAL
        select_profile(profiles, [(65, 3), (65,)])
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    message = str(info.value)
    assert "[[65, 3], [65]]" in message and "[1, 3]..[8, 3], [1]..[8]; [9, 3]..[64, 3], [9]..[64]" in message
    with pytest.raises(EngineInputError, match="admit"):
        select_profile(profiles, [(4, 3)])  # one input too few
