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
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from rapidserve.server.codec import serialize_bytes
from rapidserve.server.datatypes import datatype_of
from rapidserve.server.errors import DeadlineExceeded, Overloaded, Unavailable

__all__ = ["CacheEntry", "CacheStats", "KeyPart", "PredictionCache", "cache_key"]

Arrays = dict[str, np.ndarray[Any, Any]]
_LENGTH = struct.Struct("<Q")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    joins: int = 0  # misses that waited for an identical computation already in flight


@dataclass(slots=True)
class CacheEntry:
    model: str
    arrays: Arrays
    nbytes: int
    # encodings of this answer made by a transport (e.g. the serialized gRPC response), kept so a
    # hit costs no encoding; their bytes count toward the cache's size
    memo: dict[str, bytes] = field(default_factory=dict)
    key: bytes = b""


KeyPart = tuple[str, str, tuple[int, ...], Any]  # input name, v2 datatype, shape, data buffer


def cache_key(model: str, version: int, inputs: Iterable[KeyPart], outputs: Sequence[str]) -> bytes:
    """xxh3-128 over the model, version, inputs sorted by name (name, datatype, shape, bytes) and
    the requested outputs. Callers may build the parts from arrays or straight from wire bytes."""
    digest = xxhash.xxh3_128()
    parts = sorted(inputs, key=lambda part: part[0])
    _field(digest, model.encode())
    _field(digest, str(version).encode())
    _field(digest, struct.pack("<II", len(parts), len(outputs)))
    for name, datatype, shape, data in parts:
        _field(digest, name.encode())
        _field(digest, datatype.encode())
        _field(digest, struct.pack(f"<{len(shape)}q", *shape))
        _field(digest, data)
    for name in outputs:
        _field(digest, b"out:" + name.encode())
    return digest.digest()


class PredictionCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._by_model: dict[str, set[bytes]] = {}
        self._generation: dict[str, int] = {}
        self._inflight: dict[bytes, asyncio.Future[Arrays]] = {}
        self._inflight_model: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model: str, version: int, inputs: Arrays, outputs: Sequence[str]) -> bytes:
        parts = [
            (name, datatype_of(a.dtype), a.shape, serialize_bytes(a) if a.dtype.kind == "O" else _contiguous(a))
            for name, a in inputs.items()
        ]
        return cache_key(model, version, parts, outputs)

    def entry(self, key: bytes) -> CacheEntry | None:
        """The entry for a key, marked most recently used (a hit), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get(self, key: bytes) -> Arrays | None:
        entry = self.entry(key)
        return None if entry is None else entry.arrays

    def remember(self, entry: CacheEntry, kind: str, data: bytes) -> None:
        """Keep a transport's encoding of an entry, if the entry is still cached and both fit;
        older entries are evicted to make room, as for an insert."""
        if kind in entry.memo or self._entries.get(entry.key) is not entry:
            return
        if entry.nbytes + len(data) > self.capacity_bytes:
            return
        entry.memo[kind] = data
        entry.nbytes += len(data)
        self.used_bytes += len(data)
        self._entries.move_to_end(entry.key)
        while self.used_bytes > self.capacity_bytes:
            self._evict()

    def put(self, key: bytes, model: str, arrays: Arrays, generation: int | None = None) -> bool:
        """Insert a copy of ``arrays``; False when it does not fit or the model was reloaded since."""
        if generation is not None and generation != self._generation.get(model, 0):
            return False
        nbytes = sum(_nbytes(a) for a in arrays.values()) + len(key)
        if nbytes > self.capacity_bytes or key in self._entries:
            return False
        while self.used_bytes + nbytes > self.capacity_bytes:
            self._evict()
        frozen = {name: _frozen_copy(a) for name, a in arrays.items()}
        self._entries[key] = CacheEntry(model, frozen, nbytes, key=key)
        self._by_model.setdefault(model, set()).add(key)
        self.used_bytes += nbytes
        return True

    def generation(self, model: str) -> int:
        return self._generation.get(model, 0)

    def drop_model(self, model: str) -> None:
        """Forget every entry of a model (it was loaded, reloaded or unloaded). Computations of the
        old model still in flight are no longer joined by new requests, nor inserted."""
        self._generation[model] = self._generation.get(model, 0) + 1
        for key in [k for k, owner in self._inflight_model.items() if owner == model]:
            self._inflight.pop(key, None)
            self._inflight_model.pop(key, None)
        for key in self._by_model.pop(model, ()):
            entry = self._entries.pop(key)
            self.used_bytes -= entry.nbytes

    async def get_or_compute(
        self, key: bytes, model: str, compute: Callable[[], Awaitable[Arrays]], deadline: float | None = None
    ) -> tuple[Arrays, str]:
        """(outputs, "hit" | "miss" | "join"). Identical misses in flight at once share one computation:
        the first runs it ("miss"), the others wait for its answer ("join").

        A caller that joins another's computation waits at most until its own ``deadline``
        (``time.monotonic()``), and if that computation fails for reasons of its own request
        (cancelled, timed out, queue full, model unloading) it tries again instead of failing.
        """
        while True:
            cached = self.get(key)
            if cached is not None:
                self.stats.hits += 1
                return cached, "hit"
            pending = self._inflight.get(key)
            if pending is None:
                break
            self.stats.joins += 1
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return await asyncio.wait_for(asyncio.shield(pending), timeout), "join"
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"the deadline passed while waiting for an identical request to model '{model}'"
                ) from None
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
            except (DeadlineExceeded, Overloaded, Unavailable):
                pass  # the leader's own failure: try again, possibly as the new leader
        self.stats.misses += 1
        generation = self.generation(model)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self._inflight_model[key] = model
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
            if self._inflight.get(key) is future:
                del self._inflight[key]
                del self._inflight_model[key]
        self.put(key, model, result, generation)
        future.set_result(result)
        return result, "miss"

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self._by_model[entry.model].discard(key)
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1


def _field(digest: Any, data: Any) -> None:
    digest.update(_LENGTH.pack(len(data) if isinstance(data, bytes) else memoryview(data).nbytes))
    digest.update(data)


def _contiguous(array: np.ndarray[Any, Any]) -> Any:
    return np.ascontiguousarray(array).data


def _nbytes(array: np.ndarray[Any, Any]) -> int:
    if array.dtype.kind == "O":
        return int(array.size * 8 + sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in array.reshape(-1)))
    return int(array.nbytes)


def _frozen_copy(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
