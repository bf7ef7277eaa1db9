"""The prediction cache: one server-wide LRU bounded in bytes, with single-flight misses.

Key: xxh3-128 over the model name, the resolved version, each input sorted by name (name, datatype,
shape, bytes) and the requested outputs: stricter than Triton's key, which leaves out datatype,
shape and outputs. Entries are private read-only copies, so no two entries and no response share a
buffer. A model's entries are dropped whenever it is loaded, reloaded or unloaded, and a computation
that started before the drop does not insert its (possibly stale) answer afterwards.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from rapidserve.server.codec import serialize_bytes

__all__ = ["CacheStats", "PredictionCache"]

Arrays = dict[str, np.ndarray[Any, Any]]
_LENGTH = struct.Struct("<Q")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    joins: int = 0  # misses that waited for an identical computation already in flight


@dataclass(slots=True)
class _Entry:
    model: str
    arrays: Arrays
    nbytes: int


class PredictionCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_model: dict[str, set[bytes]] = {}
        self._generation: dict[str, int] = {}
        self._inflight: dict[bytes, asyncio.Future[Arrays]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model: str, version: int, inputs: Arrays, outputs: Sequence[str]) -> bytes:
        digest = xxhash.xxh3_128()
        _field(digest, model.encode())
        _field(digest, str(version).encode())
        for name in sorted(inputs):
            array = inputs[name]
            _field(digest, name.encode())
            _field(digest, array.dtype.str.encode() if array.dtype.kind != "O" else b"BYTES")
            _field(digest, struct.pack(f"<{array.ndim}q", *array.shape))
            data = serialize_bytes(array) if array.dtype.kind == "O" else np.ascontiguousarray(array).data
            _field(digest, data)
        for name in outputs:
            _field(digest, b"out:" + name.encode())
        return digest.digest()

    def get(self, key: bytes) -> Arrays | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.arrays

    def put(self, key: bytes, model: str, arrays: Arrays, generation: int | None = None) -> bool:
        """Insert a copy of ``arrays``; False when it does not fit or the model was reloaded since."""
        if generation is not None and generation != self._generation.get(model, 0):
            return False
        nbytes = sum(_nbytes(a) for a in arrays.values()) + len(key)
        if nbytes > self.capacity_bytes or key in self._entries:
            return False
        while self.used_bytes + nbytes > self.capacity_bytes:
            self._evict()
        self._entries[key] = _Entry(model, {name: _frozen_copy(a) for name, a in arrays.items()}, nbytes)
        self._by_model.setdefault(model, set()).add(key)
        self.used_bytes += nbytes
        return True

    def generation(self, model: str) -> int:
        return self._generation.get(model, 0)

    def drop_model(self, model: str) -> None:
        """Forget every entry of a model (it was loaded, reloaded or unloaded)."""
        self._generation[model] = self._generation.get(model, 0) + 1
        for key in self._by_model.pop(model, ()):
            entry = self._entries.pop(key)
            self.used_bytes -= entry.nbytes

    async def get_or_compute(
        self, key: bytes, model: str, compute: Callable[[], Awaitable[Arrays]]
    ) -> tuple[Arrays, bool]:
        """(outputs, hit). Identical misses in flight at once share one computation."""
        while True:
            cached = self.get(key)
            if cached is not None:
                self.stats.hits += 1
                return cached, True
            pending = self._inflight.get(key)
            if pending is None:
                break
            self.stats.joins += 1
            try:
                return await asyncio.shield(pending), False
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
                # the leader was cancelled: try again, possibly as the new leader
        self.stats.misses += 1
        generation = self.generation(model)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # joiners re-raise it; don't warn when there are none
            raise
        finally:
            self._inflight.pop(key, None)
        self.put(key, model, result, generation)
        future.set_result(result)
        return result, False

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self._by_model[entry.model].discard(key)
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1


def _field(digest: Any, data: Any) -> None:
    digest.update(_LENGTH.pack(len(data) if isinstance(data, bytes) else data.nbytes))
    digest.update(data)


def _nbytes(array: np.ndarray[Any, Any]) -> int:
    if array.dtype.kind == "O":
        return int(array.size * 8 + sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in array.reshape(-1)))
    return int(array.nbytes)


def _frozen_copy(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
