"""Tensors between processes: one shared-memory arena per direction and front end.

The process that writes into an arena owns its allocator (``Arena``); the other side only reads, through
numpy views at the offsets a message names (``views``). A block is given back by its writer when the
reader says it is done: requests when their answer arrives, answers once the front end has encoded
them (``Arena.lend``). The memory is an anonymous ``memfd`` handed to the front end at its start, so
nothing is left in the file system when either process dies.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rapidserve.common.codec import deserialize_bytes, serialize_bytes
from rapidserve.common.datatypes import BYTES, datatype_of, numpy_dtype
from rapidserve.server.errors import Overloaded, RapidServeError, TooLarge

__all__ = ["ALIGN", "Arena", "TensorHeader", "no_room", "views"]

ALIGN = 64  # every tensor starts on a cache line (and suits any dtype's alignment)

# (name, v2 datatype, shape, offset in the arena, bytes): what a message says about one tensor
TensorHeader = tuple[str, str, tuple[int, ...], int, int]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """A shared-memory region and, on its writing side, a first-fit allocator with coalescing frees.

    The allocator runs on one event loop only (its writer's); ``lend``'s finalizers may run wherever the
    last view dies, so they hand the offset to ``on_lent_free`` rather than freeing here.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)
        self.buffer = np.frombuffer(self._map, np.uint8)
        self._free_offsets: list[int] = [0]  # sorted starts of free runs
        self._free_sizes: dict[int, int] = {0: size}
        self._used: dict[int, int] = {}  # offset -> size of every allocated block
        self.on_lent_free: Callable[[int], None] | None = None
        self.last_refused = 0  # the bytes of the last ``write`` that found no room

    @classmethod
    def create(cls, name: str, size: int) -> Arena:
        """A new anonymous region of ``size`` bytes (pages are taken only as they are written)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a free block of at least ``nbytes``, or None when none is large enough."""
        need = _aligned(max(nbytes, 1))
        for index, offset in enumerate(self._free_offsets):
            size = self._free_sizes[offset]
            if size < need:
                continue
            del self._free_sizes[offset]
            if size == need:
                del self._free_offsets[index]
            else:
                self._free_offsets[index] = offset + need
                self._free_sizes[offset + need] = size - need
            self._used[offset] = need
            return offset
        return None

    def free(self, offset: int) -> None:
        """Give a block back, merging it with free neighbours."""
        size = self._used.pop(offset)
        index = bisect.bisect_left(self._free_offsets, offset)
        if index < len(self._free_offsets) and offset + size == self._free_offsets[index]:
            following = self._free_offsets.pop(index)
            size += self._free_sizes.pop(following)
        if index and (before := self._free_offsets[index - 1]) + self._free_sizes[before] == offset:
            self._free_sizes[before] += size
            return
        self._free_offsets.insert(index, offset)
        self._free_sizes[offset] = size

    def write(self, arrays: Mapping[str, np.ndarray[Any, Any]]) -> tuple[list[TensorHeader], int] | None:
        """Copy ``arrays`` into one new block: their headers and the block's offset, or None when the
        arena has no room. BYTES tensors are written in the wire's length-prefixed form."""
        parts: list[tuple[str, str, tuple[int, ...], Any]] = []
        total = 0
        for name, array in arrays.items():
            datatype = datatype_of(array.dtype)
            data: Any = serialize_bytes(array) if datatype == BYTES else array
            parts.append((name, datatype, array.shape, data))
            total += _aligned(len(data) if datatype == BYTES else array.nbytes)
        block = self.allocate(total)
        if block is None:
            self.last_refused = total
            return None
        headers: list[TensorHeader] = []
        at = block
        buffer = self.buffer
        for name, datatype, shape, data in parts:
            if datatype == BYTES:
                nbytes = len(data)
                buffer[at : at + nbytes] = np.frombuffer(data, np.uint8)
            else:
                nbytes = data.nbytes
                target = buffer[at : at + nbytes].view(data.dtype).reshape(data.shape)
                np.copyto(target, data, casting="no")
            headers.append((name, datatype, tuple(shape), at, nbytes))
            at += _aligned(nbytes)
        return headers, block

    def lend(self, headers: list[TensorHeader], block: int) -> dict[str, np.ndarray[Any, Any]]:
        """Views of a block this side reads; once the last of them is gone, ``on_lent_free(block)`` is
        called (so the writer can be told). BYTES tensors are decoded into their own arrays."""
        end = max((offset + nbytes for _, _, _, offset, nbytes in headers), default=block + 1)
        holder = (ctypes.c_char * (end - block)).from_buffer(self._map, block)
        if self.on_lent_free is not None:
            weakref.finalize(holder, self.on_lent_free, block)
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        for name, datatype, shape, offset, nbytes in headers:
            count = int(np.prod(shape, dtype=np.int64))
            if datatype == BYTES:
                raw = bytes(memoryview(holder)[offset - block : offset - block + nbytes])
                arrays[name] = deserialize_bytes(name, raw, count, "output").reshape(shape)
            else:
                dtype = numpy_dtype(datatype)
                arrays[name] = np.frombuffer(holder, dtype, count, offset - block).reshape(shape)
        return arrays


def no_room(arena: Arena, what: str) -> RapidServeError:
    """The error for a ``write`` that found no room: over the whole region it never fits (TooLarge);
    otherwise the region is busy for now (Overloaded)."""
    if arena.last_refused > arena.size:
        return TooLarge(
            f"{what} needs {arena.last_refused} bytes of shared memory, more than a front end has "
            f"({arena.size} bytes, --frontend-shm-bytes); raise it"
        )
    return Overloaded(f"the shared memory for {what}s is full ({arena.size} bytes, --frontend-shm-bytes); retry later")


def views(arena: Arena, headers: list[TensorHeader]) -> dict[str, np.ndarray[Any, Any]]:
    """Read-only views of tensors another process wrote (BYTES tensors decoded into their own arrays).
    They stay valid until the writer is told the block is done."""
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    buffer = arena.buffer
    for name, datatype, shape, offset, nbytes in headers:
        if datatype == BYTES:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = deserialize_bytes(name, buffer[offset : offset + nbytes].tobytes(), count).reshape(shape)
        else:
            array = buffer[offset : offset + nbytes].view(numpy_dtype(datatype)).reshape(shape)
            array.flags.writeable = False
            arrays[name] = array
    return arrays
