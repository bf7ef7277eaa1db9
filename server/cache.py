"""The prediction cache: one server-wide LRU bounded in bytes, with single-flight misses.

Key: xxh3-128 over the model name, the resolved version, each input sorted by name (name, datatype,
shape, bytes) and the requested outputs: stricter than Triton's key, which leaves out datatype,
shape and outputs. Entries are private read-only copies, so no two entries and no response share a
buffer. A model's entries are dropped whenever it is loaded, reloaded or unloaded, and a computation
that started before the drop does not insert its (possibly stale) answer afterwards.

The byte bound counts what an entry really holds: its arrays (data and objects), the key, the
encodings kept in ``memo``, the entry itself and its share of the LRU's and the model's key tables.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from rapidserve.common.codec import serialize_bytes
from rapidserve.common.datatypes import datatype_of
from rapidserve.server.errors import DeadlineExceeded, Overloaded, Unavailable

if TYPE_CHECKING:
    from rapidserve.server.cache_l2 import SharedCache

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
    def __init__(self, capacity_bytes: int, shared: SharedCache | None = None) -> None:
        """``shared``: a second level (Redis) that the leader of a miss asks before computing."""
        self.capacity_bytes = capacity_bytes
        self.shared = shared
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
        if entry.nbytes + sys.getsizeof(data) > self.capacity_bytes:
            return
        before = sys.getsizeof(entry.memo)
        entry.memo[kind] = data
        added = sys.getsizeof(data) + _BLOCK_SLACK + sys.getsizeof(entry.memo) - before
        entry.nbytes += added
        self.used_bytes += added
        self._entries.move_to_end(entry.key)
        while self.used_bytes > self.capacity_bytes:
            self._evict()

    def put(self, key: bytes, model: str, arrays: Arrays, generation: int | None = None) -> bool:
        """Insert a copy of ``arrays``; False when it does not fit or the model was reloaded since."""
        return self._store(key, model, arrays, generation) is not None

    def _store(self, key: bytes, model: str, arrays: Arrays, generation: int | None) -> Arrays | None:
        """``put``, returning the stored copy (None where nothing was stored)."""
        if generation is not None and generation != self._generation.get(model, 0):
            return None
        if key in self._entries:
            return None
        frozen = {name: _frozen_copy(a) for name, a in arrays.items()}
        nbytes = _ENTRY_BYTES + sys.getsizeof(key) + sys.getsizeof(frozen) + sum(map(_held, frozen.values()))
        new_model = model not in self._by_model
        if nbytes + (_MODEL_BYTES if new_model else 0) > self.capacity_bytes:
            return None
        while self._entries and self.used_bytes + nbytes + (_MODEL_BYTES if new_model else 0) > self.capacity_bytes:
            self._evict()
            new_model = model not in self._by_model
        self._entries[key] = CacheEntry(model, frozen, nbytes, key=key)
        keys = self._by_model.get(model)
        if keys is None:
            keys = self._by_model[model] = set()
            self.used_bytes += _MODEL_BYTES
        keys.add(key)
        self.used_bytes += nbytes
        return frozen

    def generation(self, model: str) -> int:
        return self._generation.get(model, 0)

    def drop_model(self, model: str) -> None:
        """Forget every entry of a model (it was loaded, reloaded or unloaded). Computations of the
        old model still in flight are no longer joined by new requests, nor inserted."""
        self._generation[model] = self._generation.get(model, 0) + 1
        for key in [k for k, owner in self._inflight_model.items() if owner == model]:
            self._inflight.pop(key, None)
            self._inflight_model.pop(key, None)
        keys = self._by_model.pop(model, None)
        if keys is None:
            return
        for key in keys:
            self.used_bytes -= self._entries.pop(key).nbytes
        self.used_bytes -= _MODEL_BYTES

    async def get_or_compute(
        self,
        key: bytes,
        model: str,
        compute: Callable[[], Awaitable[Arrays]],
        deadline: float | None = None,
        generation: int | None = None,
    ) -> tuple[Arrays, str]:
        """(outputs, "hit" | "miss" | "join"). Identical misses in flight at once share one computation:
        the first runs it ("miss"), the others wait for its answer ("join").

        A caller that joins another's computation waits at most until its own ``deadline``
        (``time.monotonic()``), and if that computation fails for reasons of its own request
        (cancelled, timed out, queue full, model unloading) it tries again instead of failing.
        ``generation``: the model's generation when the caller's version was loaded; a request to a
        version that a reload has since replaced computes alone, neither cached nor shared, since a
        reload of the same version number has the same keys.
        """
        if generation is not None and generation != self.generation(model):
            self.stats.misses += 1
            return await compute(), "miss"
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
            done, _ = await asyncio.wait((pending,), timeout=timeout)  # (raises this caller's cancellation only)
            if not done:
                raise DeadlineExceeded(f"the deadline passed while waiting for an identical request to model '{model}'")
            if pending.cancelled():
                continue  # the leader's caller left: try again, possibly as the new leader
            error = pending.exception()
            if error is None:
                return pending.result(), "join"
            if not isinstance(error, (DeadlineExceeded, Overloaded, Unavailable)):
                raise error
            # the leader's own failure: try again, possibly as the new leader
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
        # Joiners get a copy of their own: the outputs may be views of the leader's inputs (a model that
        # returns an input), whose memory the leader's caller may reuse once it has its answer.
        stored = self._store(key, model, result, generation)
        future.set_result(stored if stored is not None else {n: _frozen_copy(a) for n, a in result.items()})
        return result, "miss"

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        keys = self._by_model[entry.model]
        keys.discard(key)
        if not keys:
            del self._by_model[entry.model]
            self.used_bytes -= _MODEL_BYTES
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1


def _field(digest: Any, data: Any) -> None:
    digest.update(_LENGTH.pack(len(data) if isinstance(data, bytes) else memoryview(data).nbytes))
    digest.update(data)


def _contiguous(array: np.ndarray[Any, Any]) -> Any:
    return np.ascontiguousarray(array).data


def _held(array: np.ndarray[Any, Any]) -> int:
    """An array's object, shape and data (``getsizeof`` counts the data of an array that owns it),
    plus the objects of an object array."""
    size = sys.getsizeof(array) + 3 * _BLOCK_SLACK
    if array.dtype.kind == "O":
        size += sum(map(sys.getsizeof, array.reshape(-1))) + array.size * _BLOCK_SLACK
    return size


def _table_bytes(most: int = 4096) -> tuple[int, int]:
    """(per entry, fixed): bounds on the bytes the LRU's OrderedDict and a model's key set hold,
    ``per_entry * count + fixed`` at every count up to ``most``. Their tables grow in steps, so a
    just-grown table holds the most per entry; the smallest ones (a few entries) hold more still,
    which ``fixed`` covers instead of charging it to every entry."""
    entries: OrderedDict[bytes, None] = OrderedDict()
    keys: set[bytes] = set()
    empty = sys.getsizeof(entries) + sys.getsizeof(keys)
    sizes = []
    for count in range(1, most + 1):
        key = count.to_bytes(16, "little")
        entries[key] = None
        keys.add(key)
        sizes.append(sys.getsizeof(entries) + sys.getsizeof(keys) - empty)
    per_entry = math.ceil(max(size / count for count, size in enumerate(sizes, 1) if count >= 8))
    return per_entry, max(0, *(size - per_entry * count for count, size in enumerate(sizes, 1)))


def _model_bytes(most: int = 64) -> int:
    """The most bytes a model's (empty) key set and its slot in the by-model table hold, per model."""
    by_model: dict[str, set[bytes]] = {}
    empty = sys.getsizeof(by_model)
    worst = 0.0
    for count in range(1, most + 1):
        by_model[f"model-{count}"] = set()
        worst = max(worst, (sys.getsizeof(by_model) - empty) / count + sys.getsizeof(set()))
    return math.ceil(worst)


# getsizeof (like tracemalloc) counts the bytes asked for; allocators hand out more: pymalloc rounds
# every block up to 16 bytes, malloc (numpy's buffers) adds an 8-byte header and rounds to 16.
_BLOCK_SLACK = 8
# Measured once: what every entry holds besides its key and arrays (the entry, its empty memo dict,
# the int object of its byte count, its share of the tables; six blocks with the key and the arrays'
# dict), and what a model with entries holds (its key set; the small tables' extra, see _table_bytes).
_TABLE_BYTES, _FIRST_TABLES_BYTES = _table_bytes()
_ENTRY_BYTES = (
    sys.getsizeof(CacheEntry("", {}, 0)) + sys.getsizeof({}) + sys.getsizeof(1 << 30) + _TABLE_BYTES + 6 * _BLOCK_SLACK
)
_MODEL_BYTES = _model_bytes() + _FIRST_TABLES_BYTES  # charged while a model has entries, so once at least


def _frozen_copy(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy
