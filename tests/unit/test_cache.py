from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable

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


def _costs(make: Callable[[int], dict[str, np.ndarray]]) -> tuple[int, int]:
    """(bytes of one more entry, bytes of a model's first entry beyond that), as the cache reports them."""
    probe = PredictionCache(1 << 30)
    probe.put(bytes(16), "m", make(0))
    first = probe.used_bytes
    probe.put(bytes([1]) * 16, "m", make(1))
    return probe.used_bytes - first, 2 * first - probe.used_bytes


def test_lru_bounded_in_bytes_evicts_least_recently_used() -> None:
    entry, model = _costs(lambda i: arrays(i, 16))
    cache = PredictionCache(model + 3 * entry)
    keys = [bytes([i]) * 16 for i in range(4)]
    for i in range(3):
        assert cache.put(keys[i], "m", arrays(i, 16))
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    assert cache.put(keys[3], "m", arrays(3, 16))
    assert cache.get(keys[1]) is None and cache.stats.evictions == 1
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.used_bytes == model + 3 * entry == cache.capacity_bytes
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


@pytest.mark.parametrize("capacity", [1 << 20, 64], ids=["stored", "too-large-to-store"])
async def test_joiners_get_answers_of_their_own_not_views_of_the_leaders_inputs(capacity: int) -> None:
    """A model may return its input (a view): once the leader's caller has its answer it may reuse that
    memory (a front end's shared-memory block), which must not change what the joiners were given."""
    cache = PredictionCache(capacity)
    leader_input = np.arange(32, dtype=np.float32)
    gate = asyncio.Event()

    async def identity() -> dict[str, np.ndarray]:
        await gate.wait()
        return {"y": leader_input[:]}  # a view, as a pass-through model answers

    leader = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", identity))
    await asyncio.sleep(0)
    joiners = [asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", identity)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    (_, first), *joined = await asyncio.gather(leader, *joiners)
    leader_input[:] = -1  # the leader's memory reused for another request
    assert first == "miss" and [outcome for _, outcome in joined] == ["join"] * 3
    for answer, _ in joined:
        np.testing.assert_array_equal(answer["y"], np.arange(32, dtype=np.float32))


async def test_a_joiner_cancelled_together_with_its_leader_is_cancelled_too() -> None:
    """Two callers of one computation whose clients left at once: the joiner's own cancellation must
    not be taken for its leader's (which would make it lead a new computation, and count as served)."""
    cache = PredictionCache(1 << 20)
    runs: list[int] = []

    async def compute() -> dict[str, np.ndarray]:
        runs.append(1)
        await asyncio.sleep(3600)
        return arrays(1)

    leader = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", compute))
    await asyncio.sleep(0)
    joiner = asyncio.ensure_future(cache.get_or_compute(b"k" * 16, "m", compute))
    await asyncio.sleep(0)
    leader.cancel()  # (in the same turn: the leader's step runs first and cancels the shared future)
    joiner.cancel()
    results = await asyncio.wait_for(asyncio.gather(leader, joiner, return_exceptions=True), 5)
    assert [type(result) for result in results] == [asyncio.CancelledError, asyncio.CancelledError]
    assert runs == [1] and cache.stats.joins == 1


def test_the_key_from_wire_bytes_equals_the_key_from_decoded_arrays() -> None:
    from rapidserve.common.codec import encode_request
    from rapidserve.server import codec
    from rapidserve.server.cache import cache_key

    inputs = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([[b"x", b"yz"]], dtype=object)}
    msg = encode_request("m", inputs, ["out"])
    parts = [(t.name, t.datatype, tuple(t.shape), msg.raw_input_contents[i]) for i, t in enumerate(msg.inputs)]
    decoded = codec.decode_request(msg).inputs
    assert cache_key("m", 3, parts, ["out"]) == PredictionCache.key("m", 3, decoded, ["out"])


def test_remembered_encodings_count_toward_the_size_limit() -> None:
    size, model = _costs(lambda i: {"y": np.zeros(16, np.float32)})
    cache = PredictionCache(model + 3 * size)
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


def _demo_answer(i: int) -> dict[str, np.ndarray]:
    """An answer shaped like the demo model's: probabilities FP32 [1, 10] and label INT64 [1]."""
    return {"probabilities": np.full((1, 10), i / 7, np.float32), "label": np.array([i % 10], np.int64)}


def _string_answer(i: int) -> dict[str, np.ndarray]:
    """BYTES elements made afresh, as an engine's are (short literals would be shared constants)."""
    return {"echo": np.array([b"w" * (i % 50 + 2), b"o" * 3], dtype=object)}


@pytest.mark.parametrize("answer", [_demo_answer, _string_answer])
def test_used_bytes_is_what_the_entries_really_hold(answer: Callable[[int], dict[str, np.ndarray]]) -> None:
    """Insert answers (with the encoded response a gRPC hit keeps), each made and then let go of as
    a computation's would be, and compare the memory the process gained, traced by tracemalloc,
    with what the cache says it holds."""
    from rapidserve.server import codec
    from rapidserve.server.types import InferResponse

    count = 1500
    encoded = [codec.encode_response(InferResponse("m", "1", answer(i))).SerializeToString() for i in range(count)]
    held = np.zeros(count, np.int64)  # numbers go in arrays: int objects would be traced too
    counted = np.zeros(count, np.int64)
    start = np.zeros(1, np.int64)

    def fill(cache: PredictionCache, n: int) -> None:
        indices = iter(range(n))
        start[0] = tracemalloc.get_traced_memory()[0]
        for i in indices:
            key = (i + 1000).to_bytes(16, "little")
            cache.put(key, "m", answer(i))  # the cache keeps a copy of the arrays
            entry = cache.entry(key)
            assert entry is not None
            cache.remember(entry, "grpc", bytes(memoryview(encoded[i])))  # a fresh copy, kept by the cache
            held[i] = tracemalloc.get_traced_memory()[0] - start[0]
            counted[i] = cache.used_bytes

    gc.collect()
    gc.disable()  # a collection in the middle would free garbage made before, hiding growth
    tracemalloc.start()
    try:
        warm = PredictionCache(1 << 30)
        fill(warm, 50)  # first-use allocations of these code paths happen here, not below
        fill(PredictionCache(1 << 30), count)
    finally:
        tracemalloc.stop()
        gc.enable()
    ratio = counted / held
    worst = ratio.argmin()
    assert ratio[worst] >= 1.0, f"{worst + 1} entries hold {held[worst]} bytes, counted {counted[worst]}"
    worst = ratio.argmax()
    assert ratio[worst] <= 1.3, f"{worst + 1} entries hold {held[worst]} bytes, counted {counted[worst]}"


def test_accounting_returns_to_zero_when_entries_leave() -> None:
    cache = PredictionCache(1 << 20)
    for i in range(20):
        cache.put(bytes([i]) * 16, "a" if i % 2 else "b", arrays(i, 8))
    entry = cache.entry(bytes([3]) * 16)
    assert entry is not None
    cache.remember(entry, "grpc", b"r" * 100)
    cache.drop_model("a")
    assert cache.used_bytes > 0
    small = PredictionCache(cache.used_bytes)
    for i in range(40):  # each insert evicts older entries of either model
        small.put(bytes([i]) * 16, "a" if i % 3 else "b", arrays(i, 8))
    assert 0 < small.used_bytes <= small.capacity_bytes
    cache.drop_model("b")
    small.drop_model("a")
    small.drop_model("b")
    assert cache.used_bytes == small.used_bytes == 0 and len(cache) == len(small) == 0


class _Adds:
    """An engine that adds a constant: two of them stand for two loads of one model version."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.calls = 0

    def infer(self, inputs, outputs):
        self.calls += 1
        return {"y": inputs["x"] + np.float32(self.offset)}

    def close(self) -> None:
        pass


def _version(cache: PredictionCache, offset: float):
    from rapidserve.engines.base import TensorSpec
    from rapidserve.server.config import complete_config, parse_config
    from rapidserve.server.loading import LoadedVersion
    from rapidserve.server.model import ModelVersion

    config = parse_config('name: "m"\nmax_batch_size: 8\nresponse_cache { enable: true }')
    spec = complete_config(config, (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 3)),))
    engine = _Adds(offset)
    return ModelVersion("m", LoadedVersion(1, config, spec, [engine], 0.0), cache=cache), engine


async def test_a_request_to_the_version_a_reload_replaced_never_fills_or_leads_for_the_new_one() -> None:
    """A request picks its model version, the model is reloaded (same version number, new weights: the
    manager drops the model's entries and swaps the version in), then the request reaches the cache.
    Its answer must not be inserted for the new version, nor shared with the new version's requests."""
    from rapidserve.server.types import InferRequest

    cache = PredictionCache(1 << 20)
    old, _ = _version(cache, 1.0)
    cache.drop_model("m")  # what a reload does before it swaps in the new version
    new, new_engine = _version(cache, 2.0)
    x = np.full((1, 3), 5.0, np.float32)
    late = await old.infer(InferRequest("m", "", {"x": x}))
    np.testing.assert_array_equal(late.outputs["y"], x + 1)  # it was addressed to the old weights
    np.testing.assert_array_equal((await new.infer(InferRequest("m", "", {"x": x}))).outputs["y"], x + 2)
    assert new_engine.calls == 1

    # in flight together: the old version's computation is not joined by the new version's request
    first = asyncio.ensure_future(old.infer(InferRequest("m", "", {"x": x + 1})))
    second = asyncio.ensure_future(new.infer(InferRequest("m", "", {"x": x + 1})))
    answers = await asyncio.gather(first, second)
    np.testing.assert_array_equal(answers[1].outputs["y"], x + 3)
    await old.close()
    await new.close()
