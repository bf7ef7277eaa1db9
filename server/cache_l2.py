"""The prediction cache's second level: answers kept in Redis, shared by every replica that names it.

The in-process LRU (``cache.PredictionCache``) stays the first level; this one is asked only by the
leader of a miss (so single-flight still holds within a replica), and never fails a request:

- A request waits for Redis at most ``timeout_s``, then computes; the late reply is counted as an error,
  but its command is not cancelled (that would drop a connection that is fine: on a busy event loop a
  prompt reply can wait behind other work for longer than the timeout).
- The commands of one turn of the event loop (lookups, stores) go out as one pipeline: one round trip.
  Round trips under way are bounded by the pool's size; past it the commands are not sent (counted).
- An error of Redis itself (refused, reset, the pool's 1 s socket timeout) is counted and makes every
  request skip Redis for a while (``BACKOFF_S``, doubling up to ``BACKOFF_MAX_S`` while errors go on);
  then a connection attempt in the background (never in a request's way: a TLS handshake may take
  longer than a request may wait) lets requests use it again.

Keys: ``rapidserve:{model}:gen`` holds the model's generation, a counter a replica INCRs when it
loads the model once started (a reload; a replica's start shares what the others stored). An answer
lives at ``rapidserve:{model}:<version>:<generation>:<xxh3-128 key>`` with a TTL. A lookup reads
the generation and the entry under the generation it last saw, in one round trip: when the
generation moved (a reload on any replica), the entry is not used and the new generation is used
from then on, so no replica reads answers from before a reload out of Redis. (Each replica's own
LRU keeps what it computed itself. Replicas sharing a Redis must serve the same files for a model's
name and version: a model with new files needs a new version number, or a Redis of its own.)

Values are a small header and the outputs' raw bytes (never pickle: Redis is a network peer), read
back as untrusted bytes: checked against the model's outputs, and a bad value is a miss and an error.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve.common.codec import deserialize_bytes, serialize_bytes
from rapidserve.common.datatypes import DATATYPES, datatype_of
from rapidserve.server.errors import RapidServeError

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_S",
    "SharedCache",
    "SharedStats",
    "check_url",
    "decode_answer",
    "encode_answer",
    "redis_client",
]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
Expected = Mapping[str, tuple[str | None, tuple[int, ...] | None]]  # output -> (datatype, full shape; -1: any)

MAGIC = b"RSC1"
_HEAD = struct.Struct("<4sH")  # magic, output count
_TENSOR = struct.Struct("<HBBQ")  # name length, datatype length, rank, data length
_DIM = struct.Struct("<q")
BACKOFF_S = 0.5  # after an error, Redis is skipped this long; doubling while errors continue
BACKOFF_MAX_S = 8.0
GENERATION_TIMEOUT_S = 1.0  # a load's generation bump, and connecting, may take longer than a lookup
WARM_CONNECTIONS = 4  # connections opened in the background before requests use Redis
MAX_VALUE_BYTES = 16 * 2**20  # larger answers are not shared (nor read back)
GENERATION_DIGITS = 20  # a generation is read back to this length at most (an int64 has 19 digits)


_FAILED = object()  # the reply of a command that failed or was not sent (counted where that happened)


@dataclass(slots=True)
class _Command:
    what: str  # for the log: "a lookup", "a store", ...
    args: tuple[Any, ...]
    reply: asyncio.Future[Any]  # the reply, or _FAILED; never an exception (a store's is never read)
    late: bool = False  # its caller stopped waiting and counted it
    counts: bool = True  # a failed round trip counts it (False: a part of a lookup that another part counts for)


@dataclass(slots=True)
class SharedStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # errors and timeouts talking to Redis, and values that did not decode


def encode_answer(arrays: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    """``arrays`` as a header per output (name, v2 datatype, shape) and its bytes."""
    parts = [_HEAD.pack(MAGIC, len(arrays))]
    for name, array in arrays.items():
        datatype = datatype_of(array.dtype).encode()
        data = serialize_bytes(array) if array.dtype.kind == "O" else np.ascontiguousarray(array).tobytes()
        encoded = name.encode()
        parts.append(_TENSOR.pack(len(encoded), len(datatype), array.ndim, len(data)))
        parts.extend((encoded, datatype, b"".join(_DIM.pack(d) for d in array.shape), data))
    return b"".join(parts)


def decode_answer(data: bytes, expected: Expected) -> Arrays:
    """The arrays of an encoded answer, which must hold exactly the ``expected`` outputs, each of its
    datatype and shape (where known); raises ValueError saying what is wrong otherwise."""
    try:
        return _decode(data, expected)
    except (struct.error, RapidServeError) as exc:
        raise ValueError(str(exc) or "a truncated value") from exc


def _decode(data: bytes, expected: Expected) -> Arrays:
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(f"a value of {len(data)} bytes, more than {MAX_VALUE_BYTES}")
    view = memoryview(data)
    magic, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC or count != len(expected):
        raise ValueError(f"not an answer of {len(expected)} outputs")
    at = _HEAD.size
    arrays: Arrays = {}
    for _ in range(count):
        name_len, type_len, rank, size = _TENSOR.unpack_from(view, at)
        at += _TENSOR.size
        name = bytes(view[at : at + name_len]).decode()
        datatype = bytes(view[at + name_len : at + name_len + type_len]).decode()
        at += name_len + type_len
        shape = tuple(_DIM.unpack_from(view, at + i * _DIM.size)[0] for i in range(rank))
        at += rank * _DIM.size
        if at + size > len(data):
            raise ValueError(f"output '{name}' runs past the value's end")
        arrays[name] = _tensor(name, datatype, shape, view[at : at + size], expected)
        at += size
    if at != len(data) or arrays.keys() != expected.keys():
        raise ValueError("the value's outputs or length are not the expected ones")
    return arrays


def _tensor(name: str, datatype: str, shape: tuple[int, ...], data: memoryview, expected: Expected) -> Any:
    if name not in expected or datatype not in DATATYPES or any(d < 0 for d in shape):
        raise ValueError(f"unexpected output '{name}' of {datatype} {list(shape)}")
    want_type, want_shape = expected[name]
    if want_type is not None and datatype != want_type:
        raise ValueError(f"output '{name}' is {datatype}, the model's is {want_type}")
    if want_shape is not None and (
        len(want_shape) != len(shape) or any(w not in (-1, d) for w, d in zip(want_shape, shape, strict=True))
    ):
        raise ValueError(f"output '{name}' has shape {list(shape)}, the model's is {list(want_shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        return deserialize_bytes(name, bytes(data), count, "output").reshape(shape)
    dtype = DATATYPES[datatype]
    if count * dtype.itemsize != len(data):
        raise ValueError(f"output '{name}' has {len(data)} bytes, its shape needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype).reshape(shape)


def redis_client(url: str, timeout_s: float, max_connections: int) -> Any:
    """A ``redis.asyncio`` client for ``url`` (``redis://``, ``rediss://`` for TLS, a password as
    ``redis://:password@host``), with a bounded pool. Connects on first use. A request's wait is bounded
    by ``SharedCache`` (which never cancels a command); the socket's timeouts say when Redis failed."""
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise RuntimeError('--cache-redis needs redis-py: pip install "rapidserve[redis]"') from exc
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--cache-redis must be a redis://, rediss:// or unix:// URL, not {url.split(':')[0]!r}")
    # (SharedCache keeps at most max_connections round trips under way: none waits for a connection.)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(timeout_s, GENERATION_TIMEOUT_S),
        socket_timeout=max(timeout_s, GENERATION_TIMEOUT_S),
        socket_connect_timeout=max(timeout_s, GENERATION_TIMEOUT_S),
    )
    return aioredis.Redis.from_pool(pool)


def check_url(url: str) -> None:
    """Raise ValueError for a URL redis-py cannot use, or without redis-py; connects to nothing."""
    try:
        redis_client(url, 1.0, 1)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


class SharedCache:
    """Redis as a second cache level. Methods never raise for Redis' sake; they count and back off."""

    def __init__(
        self,
        url: str,
        ttl_s: int = 300,
        timeout_s: float = 0.005,
        max_connections: int = 32,
        prefix: str = "rapidserve",
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_connections = max_connections  # also the most commands under way at once
        self.stats = SharedStats()
        self._prefix = prefix
        self._client: Any = None
        self._generations: dict[str, int] = {}  # per model, the generation last read from Redis
        self._unbumped: set[str] = set()  # models whose reload could not be told: skipped until it is
        self._skip_until = 0.0
        self._backoff_s = BACKOFF_S
        self._queued: list[_Command] = []  # commands of this turn of the event loop, sent at its end
        self._pipelines: set[asyncio.Task[None]] = set()  # round trips under way
        self._telling: dict[str, _Command] = {}  # per model, the generation increment under way
        self._closed = False
        self._ready = False  # connected: requests use Redis (until an error)
        self._probe: asyncio.Task[None] | None = None

    def _redis(self) -> Any:
        if self._client is None:
            self._client = redis_client(self.url, self.timeout_s, self.max_connections)
        return self._client

    def _generation_key(self, model: str) -> str:
        return f"{self._prefix}:{{{model}}}:gen"

    def _entry_key(self, model: str, version: int, generation: int, key: bytes) -> str:
        return f"{self._prefix}:{{{model}}}:{version}:{generation}:{key.hex()}"

    def start(self) -> None:
        """Connect in the background: a connection's set-up (TLS) may take longer than a request may wait."""
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._connect())

    async def ready(self) -> bool:
        """Whether requests use Redis, once a connection attempt under way (or started now) has ended."""
        if not self._ready and not self._closed:
            self.start()
            assert self._probe is not None
            await asyncio.shield(self._probe)
        return self._ready

    async def _connect(self) -> None:
        try:
            pings = [self._redis().ping() for _ in range(WARM_CONNECTIONS)]
            await asyncio.wait_for(asyncio.gather(*pings), GENERATION_TIMEOUT_S)
        except Exception as exc:
            self._failed("connecting", exc)
        else:
            self._ready = not self._closed
            self._backoff_s = BACKOFF_S

    def _available(self) -> bool:
        """Whether requests may use Redis now. After an error they do not, until a connection attempt
        (made in the background once the backoff has passed) succeeds."""
        if self._ready:
            return True
        if time.monotonic() >= self._skip_until:
            self.start()
        return False

    def _failed(self, what: str, error: BaseException | None, counted: bool = False) -> None:
        """Count an error (unless the caller has); one of Redis itself (``error``) also makes requests
        skip it for a while."""
        if not counted:
            self.stats.errors += 1
        now = time.monotonic()
        if error is None:
            log.warning("shared cache: %s", what)
            return
        self._ready = False
        if now >= self._skip_until:  # (requests that failed together back off once, and log once)
            log.warning("shared cache: %s failed (%s); Redis skipped for %.1f s", what, str(error) or
                        type(error).__name__, self._backoff_s)  # fmt: skip
            self._skip_until = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _command(self, what: str, *args: Any, counts: bool = True) -> _Command:
        """Queue one Redis command. Every command queued in one turn of the event loop goes out in one
        pipeline: one round trip on one connection, however many requests asked."""
        loop = asyncio.get_running_loop()
        command = _Command(what, args, loop.create_future(), counts=counts)
        self._queued.append(command)
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        return command

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        if self._closed or len(self._pipelines) >= self.max_connections:
            # as many round trips under way as the pool has connections: Redis is slow, more would queue
            self._give_up(batch)
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._pipelines.add(task)
        task.add_done_callback(self._pipelines.discard)

    def _give_up(self, batch: list[_Command]) -> None:
        """Count ``batch`` as failed (each command once) and answer its waiters."""
        self.stats.errors += sum(command.counts and not command.late for command in batch)
        for command in batch:
            if not command.reply.done():
                command.reply.set_result(_FAILED)

    async def _send(self, batch: list[_Command]) -> None:
        """One round trip for ``batch``. Never cancelled by a caller that stops waiting: cancelling a
        command in flight drops its connection, and a reply that was merely waiting behind a busy event
        loop would then cost a new connection too. Only Redis failing (an error, the pool's socket
        timeout) makes requests skip it; any round trip that succeeds resets the backoff."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            for command in batch:
                pipe.execute_command(*command.args)
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:  # (closing)
            self._give_up(batch)
            raise
        except Exception as exc:
            self._give_up(batch)
            self._failed(batch[0].what if len(batch) == 1 else f"{len(batch)} commands", exc, counted=True)
            return
        self._backoff_s = BACKOFF_S
        for command, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):  # this command's own error (a key of another type...): each counts
                self._failed(f"{command.what}: {reply}", None, counted=command.late)
                reply = _FAILED
            command.reply.set_result(reply)

    async def _wait(self, what: str, timeout_s: float, *commands: _Command) -> list[Any]:
        """The replies to ``commands`` within ``timeout_s``; raises LookupError (counted) otherwise."""
        replies = [command.reply for command in commands]
        _, pending = await asyncio.wait(replies, timeout=timeout_s)
        if pending:  # late: counted now; the commands themselves go on (see _send)
            for command in commands:
                command.late = True
            self.stats.errors += 1
            raise LookupError(what)
        if any(reply.result() is _FAILED for reply in replies):
            raise LookupError(what)  # (counted, and backed off, where it failed)
        return [reply.result() for reply in replies]

    async def bump(self, model: str) -> None:
        """A new generation of ``model`` (it was reloaded here): answers stored before are served by no
        replica. If Redis cannot be told, this replica skips Redis for the model until it can."""
        self._unbumped.add(model)
        await self._tell(model, GENERATION_TIMEOUT_S, again=True)

    async def _tell(self, model: str, timeout_s: float, again: bool = False) -> bool:
        """Increment the model's generation (``again``: whether or not an increment is under way, as a
        reload needs; else the lookups of a model whose reload was not told yet share one increment)."""
        command = self._telling.get(model)
        if command is None or again:
            command = self._command(f"the new generation of model '{model}'", "INCR", self._generation_key(model))
            self._telling[model] = command
            command.reply.add_done_callback(lambda reply: self._told(model, command, reply.result()))
        try:
            await self._wait(command.what, timeout_s, command)
        except LookupError:
            return False
        return True

    def _told(self, model: str, command: _Command, generation: Any) -> None:
        """An increment's reply, even one that came after its requests stopped waiting."""
        if self._telling.get(model) is command:
            del self._telling[model]
            if generation is not _FAILED:
                self._unbumped.discard(model)
        if generation is not _FAILED:
            self._seen(model, int(generation))

    def _seen(self, model: str, generation: int) -> None:
        # (replies may come back out of order from different connections: the generation never goes back)
        self._generations[model] = max(generation, self._generations.get(model, 0))

    async def get(self, model: str, version: int, key: bytes) -> tuple[bytes | None, int | None]:
        """(the stored answer or None, the generation to store a computed answer under, or None when
        Redis could not be asked)."""
        if not self._available():
            return None, None
        if model in self._unbumped and not await self._tell(model, self.timeout_s):
            return None, None
        expected = self._generations.get(model, 0)
        # One round trip (the two commands are sent in one pipeline): the generation, and the entry under
        # the generation this replica last saw, each read at most to the size an answer may have, so a
        # value that is not ours costs no more memory than one of ours.
        generation_key = self._generation_key(model)
        entry_key = self._entry_key(model, version, expected, key)
        commands = (
            self._command("a lookup", "GETRANGE", generation_key, 0, GENERATION_DIGITS - 1, counts=False),
            self._command("a lookup", "GETRANGE", entry_key, 0, MAX_VALUE_BYTES),
        )
        try:
            seen, value = await self._wait("a lookup", self.timeout_s, *commands)
            generation = int(seen or 0)
        except LookupError:
            return None, None
        except ValueError as exc:  # (a generation that is not a number: not ours)
            self._failed(f"the generation of model '{model}' is not a number: {exc}", None)
            return None, None
        if generation != expected:  # a reload somewhere: what was stored under the old one is not used
            self._seen(model, generation)
            value = None
        if not value:  # (GETRANGE reads a missing key as empty; an answer never is)
            self.stats.misses += 1
            return None, generation
        self.stats.hits += 1
        return value, generation

    def bad_value(self, model: str, error: Exception) -> None:
        """Count a stored value that did not decode (it is treated as a miss)."""
        self.stats.hits -= 1
        self.stats.misses += 1
        self._failed(f"a stored answer of model '{model}' did not decode: {error}", None)

    def put(self, model: str, version: int, key: bytes, generation: int, arrays: Mapping[str, Any]) -> None:
        """Store an answer in the background under ``generation`` (the one its lookup saw)."""
        if not self._available():
            return
        data = encode_answer(arrays)
        if len(data) <= MAX_VALUE_BYTES:
            name = self._entry_key(model, version, generation, key)
            self._command("a store", "SET", name, data, "EX", self.ttl_s)

    async def drain(self) -> None:
        """Wait for the commands under way (stores run in the background, late lookups finish there)."""
        while self._queued or self._pipelines:
            await asyncio.sleep(0)  # (the queued ones are sent at the end of this turn of the loop)
            await asyncio.gather(*list(self._pipelines), return_exceptions=True)

    async def close(self) -> None:
        """Stop using Redis: commands under way or queued fail (counted), and nothing connects again."""
        self._closed = True
        self._ready = False
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        for task in list(self._pipelines):
            task.cancel()
        await asyncio.gather(*self._pipelines, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
