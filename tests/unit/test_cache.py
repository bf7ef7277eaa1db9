from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rapidserve.server.cache import PredictionCache


def arrays(value: float, n: int = 4) -> dict[str, np.ndarray]:
    return {"y": np.full(n, value, np.float32)}


def key(cache: PredictionCache, x: np.ndarray, outputs=("y",), version: int = 1, model: str = "m") -> bytes:
    return cache.key(model, version, {"x": x}, outputs)


def test_key_covers_dtype_shape_outputs_version_model_and_bytes() -> None:
    cache = PredictionCache(1 << 20)
    x = np.arange(6, dtype=np.float32)
    base = key(cache, x)
    assert base == key(cache, x.copy()) and len(base) == 16  # xxh3-128, content-addressed
    variants = [
        key(cache, x.view(np.int32)),  # same bytes, other datatype
        key(cache, x.reshape(2, 3)),  # same bytes, other shape
        key(cache, x, outputs=("y", "z")),
        key(cache, x, version=2),
        key(cache, x, model="n"),
        key(cache, x + 1),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert cache.key("m", 1, {"a": x, "b": x}, ()) == cache.key("m", 1, {"b": x, "a": x}, ())  # sorted by name
    words = np.array([b"ab", b"c"], dtype=object)
    assert cache.key("m", 1, {"s": words}, ()) != cache.key("m", 1, {"s": np.array([b"a", b"bc"], dtype=object)}, ())


def test_lru_bounded_in_bytes_evicts_least_recently_used() -> None:
    entry = 16 * 4 + 16  # 16 float32 + the key
    cache = PredictionCache(3 * entry)
    keys = [bytes([i]) * 16 for i in range(4)]
    for i in range(3):
        assert cache.put(keys[i], "m", arrays(i, 16))
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    assert cache.put(keys[3], "m", arrays(3, 16))
    assert cache.get(keys[1]) is None and cache.stats.evictions == 1
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.used_bytes == 3 * entry
    assert not cache.put(b"k" * 16, "m", arrays(0, 1000))  # bigger than the whole cache: refused


def test_entries_are_private_read_only_copies() -> None:
    cache = PredictionCache(1 << 20)
    source = arrays(1.0)
    cache.put(b"k" * 16, "m", source)
    source["y"][:] = 99  # the producer reuses its buffer
    stored = cache.get(b"k" * 16)
    assert stored is not None and stored["y"][0] == 1.0
    with pytest.raises(ValueError):
        stored["y"][0] = 5


def test_drop_model_forgets_its_entries_and_blocks_stale_inserts() -> None:
    cache = PredictionCache(1 << 20)
    cache.put(b"a" * 16, "m", arrays(1))
    cache.put(b"b" * 16, "other", arrays(2))
    generation = cache.generation("m")
    cache.drop_model("m")
    assert cache.get(b"a" * 16) is None and cache.get(b"b" * 16) is not None
    assert not cache.put(b"c" * 16, "m", arrays(3), generation)  # computed before the reload
    assert cache.put(b"c" * 16, "m", arrays(3), cache.generation("m"))


async def test_identical_concurrent_misses_share_one_computation() -> None:
    cache = PredictionCache(1 << 20)
    calls = 0
    gate = asyncio.Event()

    async def compute() -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return arrays(7)

    tasks = [asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", compute)) for _ in range(10)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1 and cache.stats.joins == 9 and cache.stats.misses == 1
    assert all(r[0]["y"][0] == 7 for r in results)
    assert sorted(r[1] for r in results) == ["join"] * 9 + ["miss"]
    _, outcome = await cache.get_or_compute(b"k" * 16, "m", compute)
    assert outcome == "hit" and calls == 1


async def test_a_cancelled_leader_hands_over_and_failures_reach_joiners() -> None:
    cache = PredictionCache(1 << 20)
    gate = asyncio.Event()

    async def slow() -> dict[str, np.ndarray]:
        await gate.wait()
        return arrays(1)

    leader = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", slow))
    await asyncio.sleep(0)
    joiner = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", slow))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    gate.set()
    result, outcome = await joiner  # it became the new leader instead of failing
    assert result["y"][0] == 1 and outcome == "miss"

    async def broken() -> dict[str, np.ndarray]:
        await asyncio.sleep(0.01)
        raise RuntimeError("engine down")

    tasks = [asyncio.ensure_future(cache.get_or_compute(b"z" * 16, "m", broken)) for _ in range(3)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert cache.get(b"z" * 16) is None


def test_the_key_from_wire_bytes_equals_the_key_from_decoded_arrays() -> None:
    from rapidserve.server import codec
    from rapidserve.server.cache import cache_key

    inputs = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([[b"x", b"yz"]], dtype=object)}
    msg = codec.encode_request("m", inputs, ["out"])
    parts = [(t.name, t.datatype, tuple(t.shape), msg.raw_input_contents[i]) for i, t in enumerate(msg.inputs)]
    decoded = codec.decode_request(msg).inputs
    assert cache_key("m", 3, parts, ["out"]) == PredictionCache.key("m", 3, decoded, ["out"])


def test_remembered_encodings_count_toward_the_size_limit() -> None:
    cache = PredictionCache(3 * (64 + 16))
    for i in range(3):
        cache.put(bytes([i]) * 16, "m", {"y": np.zeros(16, np.float32)})
    entry = cache.entry(b"\x02" * 16)
    assert entry is not None
    cache.remember(entry, "grpc", b"x" * 70)
    assert cache.used_bytes <= cache.capacity_bytes
    assert cache.get(b"\x00" * 16) is None and cache.get(b"\x02" * 16) is not None  # the oldest made room
    assert cache.entry(b"\x02" * 16).memo["grpc"] == b"x" * 70
    cache.remember(cache.entry(b"\x01" * 16), "grpc", b"x" * 10_000)  # cannot fit at all: not kept
    assert "grpc" not in cache.entry(b"\x01" * 16).memo


async def test_a_joiner_retries_when_the_leader_fails_for_its_own_reasons() -> None:
    from rapidserve.server.errors import DeadlineExceeded

    cache = PredictionCache(1 << 20)
    calls = 0

    async def compute() -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise DeadlineExceeded("the leader's queue timeout")
        return arrays(5)

    leader = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", compute))
    await asyncio.sleep(0)
    joiner = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", compute))
    with pytest.raises(DeadlineExceeded):
        await leader
    result, _ = await joiner
    assert result["y"][0] == 5 and calls == 2


async def test_a_joiner_waits_no_longer_than_its_own_deadline() -> None:
    import time

    from rapidserve.server.errors import DeadlineExceeded

    cache = PredictionCache(1 << 20)
    gate = asyncio.Event()

    async def slow() -> dict[str, np.ndarray]:
        await gate.wait()
        return arrays(1)

    leader = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", slow))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded):
        await cache.get_or_compute(b"k" * 16, "m", slow, deadline=time.monotonic() + 0.02)
    gate.set()
    await leader


async def test_after_a_reload_requests_do_not_join_the_old_models_computation() -> None:
    cache = PredictionCache(1 << 20)
    gate = asyncio.Event()

    async def old_model() -> dict[str, np.ndarray]:
        await gate.wait()
        return arrays(1)

    async def new_model() -> dict[str, np.ndarray]:
        return arrays(2)

    old = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", old_model))
    await asyncio.sleep(0)
    cache.drop_model("m")
    result, _ = await cache.get_or_compute(b"k" * 16, "m", new_model)
    assert result["y"][0] == 2
    gate.set()
    assert (await old)[0]["y"][0] == 1
    assert cache.get(b"k" * 16)["y"][0] == 2  # the old answer was not inserted over the new one
