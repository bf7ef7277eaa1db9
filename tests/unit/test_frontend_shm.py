"""The shared-memory arena between a front end and the engine: its allocator checked against an
independent map of used bytes, and tensors of every v2 datatype written on one side and read on the other."""

from __future__ import annotations

import gc
import os
import random
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from rapidserve.server.frontend.shm import ALIGN, Arena, views

# every v2 datatype but BYTES, with the numpy dtype the wire gives it (written down here, not imported)
FIXED = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": ml_dtypes.bfloat16,
}


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 100, size=shape)
    return (values % 2 == 1) if datatype == "BOOL" else values.astype(FIXED[datatype])


def strings(*items: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray[Any, Any]:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array.reshape(shape if shape is not None else (len(items),))


def assert_same(got: dict[str, np.ndarray[Any, Any]], sent: dict[str, np.ndarray[Any, Any]]) -> None:
    assert list(got) == list(sent)
    for name, array in sent.items():
        assert got[name].shape == array.shape, name
        assert got[name].dtype == array.dtype, name
        if array.dtype == object:
            assert got[name].tolist() == array.tolist(), name
        else:
            assert got[name].tobytes() == array.tobytes(), name


# ----------------------------------------------------------------------------------------------- allocator


class UsedMap:
    """What the allocator must agree with: one flag per byte of the arena, set while allocated."""

    def __init__(self, size: int) -> None:
        self.used = bytearray(size)
        self.blocks: dict[int, int] = {}

    def take(self, offset: int, nbytes: int) -> None:
        need = max(-(-max(nbytes, 1) // ALIGN) * ALIGN, ALIGN)
        assert offset % ALIGN == 0, offset
        assert offset + need <= len(self.used), (offset, need)
        assert not any(self.used[offset : offset + need]), f"block {offset}+{need} overlaps a used one"
        self.used[offset : offset + need] = b"\x01" * need
        self.blocks[offset] = need

    def give(self, offset: int) -> None:
        need = self.blocks.pop(offset)
        self.used[offset : offset + need] = bytes(need)

    def first_fit(self, nbytes: int) -> int | None:
        """The lowest start of a free run (on the alignment grid) that holds ``nbytes``."""
        need = max(-(-max(nbytes, 1) // ALIGN) * ALIGN, ALIGN)
        start = 0
        while start + need <= len(self.used):
            taken = self.used.find(1, start, start + need)
            if taken < 0:
                return start
            start = (taken // ALIGN + 1) * ALIGN
        return None


def test_blocks_are_aligned_and_taken_first_fit_until_the_arena_is_full() -> None:
    arena = Arena.create("test", 16 * ALIGN)
    assert arena.allocate(1) == 0
    assert arena.allocate(ALIGN) == ALIGN
    assert arena.allocate(ALIGN + 1) == 2 * ALIGN  # two lines
    assert arena.allocate(0) == 4 * ALIGN  # an empty block still takes a line of its own
    assert arena.allocate(12 * ALIGN) is None  # 11 lines are left
    assert arena.allocate(11 * ALIGN) == 5 * ALIGN
    assert arena.allocate(1) is None
    assert arena.used_bytes == 16 * ALIGN


def test_freed_neighbours_merge_into_one_block() -> None:
    arena = Arena.create("test", 8 * ALIGN)
    a, b, c, d = (arena.allocate(2 * ALIGN) for _ in range(4))
    assert (a, b, c, d) == (0, 2 * ALIGN, 4 * ALIGN, 6 * ALIGN)
    arena.free(b)
    arena.free(d)
    assert arena.allocate(3 * ALIGN) is None  # 4 lines free, but in two runs of 2
    arena.free(c)  # merges with the run before it and the one after it
    assert arena.allocate(6 * ALIGN) == 2 * ALIGN
    arena.free(2 * ALIGN)
    arena.free(a)
    assert arena.used_bytes == 0
    assert arena.allocate(8 * ALIGN) == 0  # the whole arena in one block again


@pytest.mark.parametrize("seed", range(8))
def test_random_allocations_and_frees_agree_with_a_map_of_used_bytes(seed: int) -> None:
    size = 64 * ALIGN + (seed % 3) * 17  # also sizes off the alignment grid: their tail is never handed out
    arena = Arena.create("test", size)
    model = UsedMap(size)
    rng = random.Random(seed)
    for _ in range(1500):
        if model.blocks and rng.random() < 0.45:
            offset = rng.choice(list(model.blocks))
            arena.free(offset)
            model.give(offset)
        else:
            nbytes = rng.choice((0, 1, ALIGN - 1, ALIGN, ALIGN + 1, rng.randrange(1, 12 * ALIGN)))
            expected = model.first_fit(nbytes)
            offset = arena.allocate(nbytes)
            assert offset == expected, (nbytes, offset, expected)
            if offset is not None:
                model.take(offset, nbytes)
        assert arena.used_bytes == sum(model.used)
    for offset in list(model.blocks):
        arena.free(offset)
    assert arena.allocate(size // ALIGN * ALIGN) == 0  # everything merged back into one run


# --------------------------------------------------------------------------------------- tensors both ways


def test_every_fixed_size_datatype_travels_bit_for_bit() -> None:
    writer = Arena.create("test", 1 << 16)
    sent = {name: sample(name, (3, 5), seed=i) for i, name in enumerate(FIXED)}
    sent["BF16"] = np.array([[1.5, -2.25, 3e38, np.inf, np.nan]], np.float32).astype(ml_dtypes.bfloat16)
    sent["FP16"] = np.array([[0.0, -0.0, 65504.0, 6e-8, np.nan]], np.float16)
    written = writer.write(sent)
    assert written is not None
    headers, block = written
    assert [h[1] for h in headers] == list(FIXED)
    assert all(offset % ALIGN == 0 for _, _, _, offset, _ in headers)
    assert_same(views(writer, headers), sent)
    assert_same(writer.lend(headers, block), sent)


@pytest.mark.parametrize(
    "array",
    [
        strings(),
        strings(b""),
        strings(b"", b"", b""),
        strings(b"a", b"", b"\x00\xff" * 40, b"\xe2\x82\xac", shape=(2, 2)),
        strings(*(b"%d" % i for i in range(300))),
    ],
    ids=["empty", "one empty", "three empty", "mixed 2x2", "300"],
)
def test_bytes_tensors_travel_as_object_arrays_of_bytes(array: np.ndarray[Any, Any]) -> None:
    writer = Arena.create("test", 1 << 16)
    sent = {"before": np.arange(3, dtype=np.int32), "text": array, "after": np.ones((2, 1), np.float64)}
    written = writer.write(sent)
    assert written is not None
    headers, block = written
    assert headers[1][1] == "BYTES"
    for got in (views(writer, headers), writer.lend(headers, block)):
        assert_same(got, sent)
        assert all(type(item) is bytes for item in got["text"].reshape(-1))


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 2), ()], ids=["0", "0x4", "3x0x2", "scalar"])
def test_zero_size_and_scalar_tensors_keep_their_shapes(shape: tuple[int, ...]) -> None:
    writer = Arena.create("test", 4 * ALIGN)
    sent = {"a": np.full(shape, 7, np.int64), "b": np.zeros(shape, np.float32), "s": np.full(shape, b"x", object)}
    written = writer.write(sent)
    assert written is not None
    headers, block = written
    for got in (views(writer, headers), writer.lend(headers, block)):
        assert_same(got, sent)


def test_arrays_that_are_not_contiguous_are_written_in_row_major_order() -> None:
    writer = Arena.create("test", 1 << 12)
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    sent = {"t": base.T, "strided": base[::2, ::3], "fortran": np.asfortranarray(base)}
    written = writer.write(sent)
    assert written is not None
    got = views(writer, written[0])
    for name, array in sent.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.c_contiguous


def test_a_write_that_does_not_fit_takes_nothing() -> None:
    writer = Arena.create("test", 4 * ALIGN)
    assert writer.write({"x": np.zeros(4 * ALIGN + 1, np.uint8)}) is None
    assert writer.write({"x": np.zeros(2 * ALIGN, np.uint8), "y": np.zeros(2 * ALIGN + 1, np.uint8)}) is None
    assert writer.used_bytes == 0
    assert writer.write({"x": np.zeros(4 * ALIGN, np.uint8)}) is not None


def test_the_reading_side_sees_the_writers_bytes_through_its_own_map_of_the_same_memory() -> None:
    writer = Arena.create("test", 1 << 14)
    reader = Arena(os.dup(writer.fd), writer.size)  # as the other process maps it
    sent = {"x": sample("FP32", (4, 8)), "s": strings(b"abc", b"")}
    written = writer.write(sent)
    assert written is not None
    headers, block = written
    got = views(reader, headers)
    assert_same(got, sent)
    assert not got["x"].flags.writeable  # a reader never writes into the other side's memory
    writer.buffer[headers[0][3]] += 1  # what the writer changes later, the reader's views show
    assert got["x"].reshape(-1).view(np.uint8)[0] == sent["x"].reshape(-1).view(np.uint8)[0] + 1
    lent = reader.lend(headers, block)
    assert_same(lent, {"x": got["x"], "s": sent["s"]})


# ------------------------------------------------------------------------------------------------- lending


def test_a_lent_block_is_given_back_once_when_its_last_view_is_gone() -> None:
    writer = Arena.create("test", 1 << 14)
    reader = Arena(os.dup(writer.fd), writer.size)
    given_back: list[int] = []
    reader.on_lent_free = given_back.append
    written = writer.write({"x": sample("INT32", (4, 6)), "y": sample("FP64", (2,)), "s": strings(b"q")})
    assert written is not None
    headers, block = written
    lent = reader.lend(headers, block)
    x, y = lent["x"], lent["y"]
    del lent
    gc.collect()
    assert given_back == []
    row = x[1:3]
    cells = row.reshape(-1).view(np.uint8)[4:]  # a view of a view of a view
    del x, row
    gc.collect()
    assert given_back == []
    del y
    gc.collect()
    assert given_back == []  # ``cells`` still reads the block
    assert cells.sum() >= 0
    del cells
    gc.collect()
    assert given_back == [block]
    gc.collect()
    assert given_back == [block]


def test_an_answer_of_bytes_only_is_given_back_at_once_as_its_arrays_are_copies() -> None:
    writer = Arena.create("test", 1 << 12)
    reader = Arena(os.dup(writer.fd), writer.size)
    given_back: list[int] = []
    reader.on_lent_free = given_back.append
    written = writer.write({"s": strings(b"abc", b"de")})
    assert written is not None
    lent = reader.lend(*written)
    gc.collect()
    assert given_back == [written[1]]
    writer.buffer[:] = 0  # the block may be reused: the strings stay
    assert lent["s"].tolist() == [b"abc", b"de"]
