"""The shared (Redis) cache level: its value encoding read back as untrusted bytes, its URLs, and,
against a real redis-server, generations shared by replicas and a Redis that is down or slow."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redisserver import RedisServer, needs_redis

from rapidserve import cli
from rapidserve.server.cache_l2 import BACKOFF_S, SharedCache, check_url, decode_answer, encode_answer, redis_client

ARRAYS = {
    "probs": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "label": np.array([[5], [-2], [9]], dtype=np.int64),
    "text": np.array([[b"a"], [b""], ["\u00e9t\u00e9".encode()]], dtype=object),
}
EXPECTED = {"probs": ("FP32", (-1, 4)), "label": ("INT64", (3, 1)), "text": ("BYTES", (-1, 1))}
KEY = bytes(range(16))


def test_an_answer_reads_back_exactly() -> None:
    decoded = decode_answer(encode_answer(ARRAYS), EXPECTED)
    assert decoded.keys() == ARRAYS.keys()
    for name, array in ARRAYS.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)
    unknown = {name: (None, None) for name in ARRAYS}  # a model whose file does not say (TorchScript)
    np.testing.assert_array_equal(decode_answer(encode_answer(ARRAYS), unknown)["probs"], ARRAYS["probs"])


@pytest.mark.parametrize(
    ("expected", "says"),
    [
        ({**EXPECTED, "probs": ("FP64", (-1, 4))}, "FP32, the model's is FP64"),
        ({**EXPECTED, "label": ("INT64", (2, 1))}, "shape [3, 1], the model's is [2, 1]"),
        ({k: v for k, v in EXPECTED.items() if k != "text"}, "not an answer of 2 outputs"),
        ({"probs": EXPECTED["probs"], "label": EXPECTED["label"], "other": ("BYTES", None)}, "unexpected output"),
    ],
)
def test_an_answer_that_is_not_the_models_is_refused(expected: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        decode_answer(encode_answer(ARRAYS), expected)


def test_damaged_values_raise_value_error_and_nothing_else() -> None:
    """Every truncation, and seeded random byte changes, of a good value: a ValueError or arrays that
    still match the expected outputs (a changed data byte is a different, well-formed answer)."""
    good = encode_answer(ARRAYS)
    damaged = [good[:cut] for cut in range(len(good))] + [good + b"x", b"", b"RSC1", b"\x80" * 40]
    rng = np.random.default_rng(16)
    for _ in range(2000):
        data = bytearray(good)
        for at in rng.integers(0, len(good), size=int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        damaged.append(bytes(data))
    refused = 0
    for data in damaged:
        try:
            arrays = decode_answer(data, EXPECTED)
        except ValueError:
            refused += 1
            continue
        assert arrays["probs"].dtype == np.float32 and arrays["probs"].shape[1] == 4
        assert arrays["label"].shape == (3, 1) and arrays["text"].shape[1] == 1
    assert refused >= len(good)  # every truncation at least


def test_a_value_claiming_a_huge_shape_is_refused_before_allocating() -> None:
    data = bytearray(encode_answer({"label": ARRAYS["label"]}))
    at = data.index(b"INT64") + len(b"INT64")
    data[at : at + 8] = (2**40).to_bytes(8, "little")  # the first dimension
    with pytest.raises(ValueError, match="bytes, its shape needs"):
        decode_answer(bytes(data), {"label": ("INT64", None)})


def test_urls_carry_tls_password_and_database() -> None:
    client = redis_client("rediss://:s3cret@cache.example:6380/2", 0.005, 8)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("cache.example", 6380, 2, "s3cret")
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert client.connection_pool.max_connections == 8
    plain = redis_client("redis://user:pw@10.0.0.1/0", 0.005, 8).connection_pool
    assert plain.connection_class.__name__ == "Connection"
    assert (plain.connection_kwargs["username"], plain.connection_kwargs["password"]) == ("user", "pw")
    for bad in ("http://cache:6379", "cache:6379", "redis://cache:port/0"):
        with pytest.raises(ValueError):
            check_url(bad)


def test_serve_refuses_a_url_that_is_not_redis_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--model-repository", str(tmp_path), "--cache-redis", "http://cache:6379"]) == 2
    assert capsys.readouterr().err == (
        "rapidserve serve: error: --cache-redis must be a redis://, rediss:// or unix:// URL, not 'http'\n"
    )


def test_without_redis_py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ValueError, match=r'pip install "rapidserve\[redis\]"'):
        check_url("redis://cache:6379/0")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[SharedCache]]:
    """Three replicas' shared levels on one Redis (a generous timeout: the machine may be busy)."""
    caches = [SharedCache(redis_server.url, ttl_s=60, timeout_s=2.0) for _ in range(3)]
    for cache in caches:
        assert await cache.ready()
    yield caches
    for cache in caches:
        await cache.close()


@needs_redis
async def test_an_answer_stored_by_one_replica_is_found_by_the_others(replicas: list[SharedCache]) -> None:
    a, b, c = replicas
    value, generation = await a.get("m", 1, KEY)
    assert value is None and generation == 0
    a.put("m", 1, KEY, generation, ARRAYS)
    await a.drain()
    for other in (b, c):
        value, _ = await other.get("m", 1, KEY)
        assert value is not None
        np.testing.assert_array_equal(decode_answer(value, EXPECTED)["text"], ARRAYS["text"])
    assert (await b.get("m", 2, KEY))[0] is None  # another version
    assert (await b.get("n", 1, KEY))[0] is None  # another model
    assert (b.stats.hits, b.stats.misses, b.stats.errors) == (1, 2, 0)


@needs_redis
async def test_a_reload_on_one_replica_hides_earlier_answers_from_every_replica(replicas: list[SharedCache]) -> None:
    a, b, c = replicas
    _, generation = await b.get("m", 1, KEY)
    assert generation is not None
    b.put("m", 1, KEY, generation, ARRAYS)
    await b.drain()
    assert (await c.get("m", 1, KEY))[0] is not None
    await a.bump("m")  # replica A reloads the model
    for replica in (a, b, c):
        assert (await replica.get("m", 1, KEY))[0] is None
    # an answer computed before the reload but stored after it is stored where nobody looks
    c.put("m", 1, KEY, generation, ARRAYS)
    await c.drain()
    assert (await b.get("m", 1, KEY))[0] is None
    _, new = await b.get("m", 1, KEY)
    assert new is not None and new > generation
    b.put("m", 1, KEY, new, ARRAYS)
    await b.drain()
    assert (await a.get("m", 1, KEY))[0] is not None and (await c.get("m", 1, KEY))[0] is not None
    assert sum(r.stats.errors for r in replicas) == 0


@needs_redis
async def test_a_redis_that_goes_away_is_counted_and_skipped_for_a_while(redis_server: RedisServer) -> None:
    cache = SharedCache(redis_server.url, timeout_s=2.0)
    again = RedisServer(redis_server.directory, redis_server.port)
    try:
        assert await cache.get("m", 1, KEY) == (None, None)  # not connected yet: not asked (it connects)
        assert await cache.ready()
        _, generation = await cache.get("m", 1, KEY)
        assert generation is not None
        redis_server.stop()
        assert await cache.get("m", 1, KEY) == (None, None)
        assert cache.stats.errors == 1
        for _ in range(5):  # backing off: Redis is not asked, so nothing more fails or waits
            assert await cache.get("m", 1, KEY) == (None, None)
            cache.put("m", 1, KEY, 0, ARRAYS)
        await cache.drain()
        assert cache.stats.errors == 1
        await cache.bump("m")  # a reload meanwhile: the model skips Redis until it can be told
        assert cache.stats.errors == 2
        again.start()
        cache._skip_until = 0.0  # the backoff has passed (not waited for: it can be seconds)
        assert await cache.get("m", 1, KEY) == (None, None)  # not asked: it connects in the background
        assert await cache.ready()
        value, generation = await cache.get("m", 1, KEY)
        assert value is None and generation == 1  # told first (INCR on the new, empty Redis), then asked
        assert cache.stats.errors == 2
    finally:
        await cache.close()
        again.stop()


@needs_redis
async def test_requests_that_ask_together_share_one_round_trip(redis_server: RedisServer) -> None:
    """Sixteen lookups and stores at once through a pool of one connection: all are answered, since
    what one turn of the event loop asks goes out as one pipeline (one at a time would refuse the rest)."""
    cache = SharedCache(redis_server.url, timeout_s=2.0, max_connections=1)
    try:
        assert await cache.ready()
        keys = [bytes([i]) * 16 for i in range(16)]
        for key in keys[::2]:
            cache.put("m", 1, key, 0, ARRAYS)
        await cache.drain()
        answers = await asyncio.gather(*(cache.get("m", 1, key) for key in keys))
        assert [value is not None for value, _ in answers] == [i % 2 == 0 for i in range(16)]
        for value, generation in answers[::2]:
            assert generation == 0 and value is not None
            assert decode_answer(value, EXPECTED).keys() == ARRAYS.keys()
        assert (cache.stats.hits, cache.stats.misses, cache.stats.errors) == (8, 8, 0)
    finally:
        await cache.close()


def _connections_received(admin: Any) -> int:
    return int(admin.info("stats")["total_connections_received"])


@needs_redis
async def test_a_late_reply_costs_its_request_the_timeout_but_neither_the_connection_nor_redis(
    redis_server: RedisServer,
) -> None:
    """A reply later than the timeout (Redis paused here; a busy event loop does the same to a prompt
    reply) is counted and its request computes, but the command runs to its end: its connection is
    kept, and the next requests still use Redis."""
    import redis

    cache = SharedCache(redis_server.url, timeout_s=0.05)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        assert await cache.ready()
        cache.put("m", 1, KEY, 0, ARRAYS)
        await cache.drain()
        connections = _connections_received(admin)
        admin.execute_command("CLIENT", "PAUSE", "400", "ALL")  # shorter than the pool's 1 s socket timeout
        assert await cache.get("m", 1, KEY) == (None, None)  # late: computed instead
        assert cache.stats.errors == 1
        await cache.drain()  # the command itself ends once the pause does
        assert cache.stats.errors == 1
        cache.timeout_s = 2.0  # (the next reply is not to be late on a busy machine)
        value, generation = await cache.get("m", 1, KEY)
        assert value is not None and generation == 0
        assert cache.stats.hits == 1 and cache.stats.errors == 1
        assert _connections_received(admin) == connections  # no connection was dropped and made again
    finally:
        admin.close()
        await cache.close()


@needs_redis
async def test_a_redis_that_stops_answering_bounds_every_request_and_then_is_skipped(
    redis_server: RedisServer,
) -> None:
    import redis

    cache = SharedCache(redis_server.url, timeout_s=0.05, max_connections=2)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        assert await cache.ready()
        admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")  # longer than the pool's 1 s socket timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(2):
            assert await cache.get("m", 1, KEY) == (None, None)
        assert loop.time() - started < 1  # each waited the timeout, not for Redis
        assert cache.stats.errors == 2 and len(cache._pipelines) == 2
        cache.put("m", 1, KEY, 0, ARRAYS)  # as many commands under way as connections: not asked
        assert await cache.get("m", 1, KEY) == (None, None)
        assert cache.stats.errors == 4 and len(cache._pipelines) == 2
        await cache.drain()  # the two commands fail at the socket timeout: Redis itself is failing
        assert cache.stats.errors == 4  # one per request, the late ones not counted again
        assert await cache.get("m", 1, KEY) == (None, None)
        assert cache.stats.errors == 4  # skipped: not asked within the backoff
        assert 0 < cache._skip_until - loop.time() <= BACKOFF_S
    finally:
        admin.close()  # (the pause ends with the server, killed after the test)
        await cache.close()


@needs_redis
async def test_tls_and_a_password_come_from_the_url(tmp_path: Path) -> None:
    """A Redis that speaks only TLS and wants a password: the URL carries both (rediss://, the CA as
    ssl_ca_certs, :password@). A wrong password, plaintext, or an untrusted certificate is refused:
    counted, never raised."""
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    server = RedisServer(tmp_path, tls=pki, password="s3cret-word").start()
    caches = {
        "right": SharedCache(server.url, timeout_s=2.0),
        "wrong password": SharedCache(server.url.replace("s3cret-word", "guess"), timeout_s=2.0),
        "plaintext": SharedCache(f"redis://:s3cret-word@127.0.0.1:{server.port}/0", timeout_s=2.0),
        "untrusted": SharedCache(server.url.split("?")[0], timeout_s=2.0),
    }
    try:
        right = caches["right"]
        assert await right.ready()
        _, generation = await right.get("m", 1, KEY)
        assert generation == 0
        right.put("m", 1, KEY, generation, ARRAYS)
        await right.drain()
        value, _ = await right.get("m", 1, KEY)
        assert value is not None
        for name, array in decode_answer(value, EXPECTED).items():
            np.testing.assert_array_equal(array, ARRAYS[name])
        assert right.stats.errors == 0
        for name in ("wrong password", "plaintext", "untrusted"):
            cache = caches[name]
            assert not await cache.ready(), name
            assert cache.stats.errors == 1, name
            assert await cache.get("m", 1, KEY) == (None, None)
    finally:
        for cache in caches.values():
            await cache.close()
        server.stop()


@needs_redis
async def test_a_reload_told_late_raises_the_generation_once(redis_server: RedisServer) -> None:
    """A model whose reload Redis has not been told yet: its lookups share one increment, whose reply,
    however late, is taken up (a late increment still happens in Redis: sending one per lookup would
    move the generation on every request, and every replica's answers of the model with it)."""
    import redis

    cache = SharedCache(redis_server.url, timeout_s=0.05)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        assert await cache.ready()
        cache._unbumped.add("m")  # as after a reload that Redis did not hear of
        admin.execute_command("CLIENT", "PAUSE", "400", "ALL")
        assert await cache.get("m", 1, KEY) == (None, None)
        assert await asyncio.gather(*(cache.get("m", 1, KEY) for _ in range(5))) == [(None, None)] * 5
        assert await cache.get("m", 1, KEY) == (None, None)
        assert cache.stats.errors == 7  # each request that gave up
        await cache.drain()
        assert int(admin.get("rapidserve:{m}:gen")) == 1
        cache.timeout_s = 2.0  # (the next reply is not to be late on a busy machine)
        value, generation = await cache.get("m", 1, KEY)  # told: Redis is used for the model again
        assert value is None and generation == 1
        assert cache.stats.errors == 7 and cache.stats.misses == 1
    finally:
        admin.close()
        await cache.close()


@needs_redis
async def test_a_value_larger_than_any_answer_is_not_read_whole(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is a network peer: a value under an answer's key larger than an answer may be is read only
    to that size (and then refused as a bad value), never whole into memory."""
    import redis

    from rapidserve.server import cache_l2

    monkeypatch.setattr(cache_l2, "MAX_VALUE_BYTES", 4096)
    cache = SharedCache(redis_server.url, timeout_s=2.0)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        assert await cache.ready()
        admin.set(cache._entry_key("m", 1, 0, KEY), b"x" * 1_000_000)
        sent = int(admin.info("stats")["total_net_output_bytes"])
        value, generation = await cache.get("m", 1, KEY)
        assert generation == 0 and value is not None and len(value) == 4097
        assert int(admin.info("stats")["total_net_output_bytes"]) - sent < 100_000
        with pytest.raises(ValueError, match="more than 4096"):
            decode_answer(value, EXPECTED)
    finally:
        admin.close()
        await cache.close()


@needs_redis
@pytest.mark.parametrize("wrong", ["generation", "entry", "both"])
async def test_every_read_of_a_key_of_another_type_is_an_error(redis_server: RedisServer, wrong: str) -> None:
    """Redis answers a read of a key that holds a list with an error reply: the lookup is a miss that
    cannot be stored, and each of its two reads that Redis refused is counted as an error."""
    import redis

    cache = SharedCache(redis_server.url, timeout_s=2.0)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        assert await cache.ready()
        if wrong in ("generation", "both"):
            admin.rpush(cache._generation_key("m"), b"x")
        if wrong in ("entry", "both"):
            admin.rpush(cache._entry_key("m", 1, 0, KEY), b"x")
        refused = 2 if wrong == "both" else 1
        for lookups in (1, 2, 3):
            assert await cache.get("m", 1, KEY) == (None, None)
            assert (cache.stats.hits, cache.stats.misses, cache.stats.errors) == (0, 0, refused * lookups)
        assert await cache.ready()  # an error reply is the key's, not Redis failing: Redis stays in use
    finally:
        admin.close()
        await cache.close()


@needs_redis
async def test_a_closed_cache_neither_asks_nor_connects_again(redis_server: RedisServer) -> None:
    cache = SharedCache(redis_server.url, timeout_s=2.0)
    assert await cache.ready()
    cache.put("m", 1, KEY, 0, ARRAYS)  # queued, not sent yet: it fails with the close, counted
    await cache.close()
    assert cache.stats.errors == 1
    cache._skip_until = 0.0  # (as if a backoff had passed)
    for _ in range(3):
        assert await cache.get("m", 1, KEY) == (None, None)
        cache.put("m", 1, KEY, 0, ARRAYS)
    assert not await cache.ready()
    await cache.drain()
    assert cache._client is None and (cache._probe is None or cache._probe.done())
    assert cache.stats.errors == 1


async def test_a_peer_that_never_answers_is_never_used() -> None:
    """Connecting happens in the background: no request waits for it, and requests skip Redis until then."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    cache = SharedCache(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=0.05)
    try:
        for _ in range(3):
            assert await cache.get("m", 1, KEY) == (None, None)
        assert cache.stats.errors == 0
        assert not await cache.ready()  # the attempt times out
        assert cache.stats.errors == 1
    finally:
        await cache.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
