"""The prediction cache's two levels through real servers: three replicas (each with its in-process
LRU) behind one real redis-server, with and without front-end processes."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redisserver import RedisServer, needs_redis
from testmodels import scale_graph, write_model

from rapidserve import Client

pytestmark = [pytest.mark.timeout(180), pytest.mark.frontends(1, 2), needs_redis]
INT64 = 7
CONFIG = "max_batch_size: 8\nresponse_cache { enable: true }\n"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def _executions(url: str) -> int:
    with Client(url) as client:
        return int(client.model_statistics("scale").model_stats[0].execution_count)


def _l2(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        family.name.removeprefix("rapidserve_cache_l2_"): family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("rapidserve_cache_l2_")
    }


def _entries(redis: Any) -> list[bytes]:
    return [key for key in redis.scan_iter(match="rapidserve:*") if not key.endswith(b":gen")]


def _wait_for_entries(redis: Any, count: int, timeout_s: float = 30) -> list[bytes]:
    """The answers in Redis once there are ``count`` (stores run in the background of requests)."""
    deadline = time.monotonic() + timeout_s
    while len(entries := _entries(redis)) < count:
        assert time.monotonic() < deadline, f"{len(entries)} answers stored in Redis, expected {count}"
        time.sleep(0.01)
    return entries


def test_replicas_share_answers_a_reload_hides_them_everywhere_and_redis_may_fail(
    tmp_path: Path, serve: Any, redis_server: RedisServer
) -> None:
    import redis

    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), CONFIG)
    a, b, c = (
        serve(tmp_path, model_control_mode="explicit", load_models=("*",), cache_redis_url=redis_server.url,
              cache_redis_timeout_ms=2000)
        for _ in range(3)
    )  # fmt: skip
    store = redis.Redis.from_url(redis_server.url)
    try:

        def infer(replica: Any, x: np.ndarray) -> None:
            with Client(replica.url) as client:
                np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)

        first = np.arange(8, dtype=np.int64).reshape(2, 4)
        infer(a, first)
        _wait_for_entries(store, 1)
        infer(b, first)
        infer(c, first)
        assert [_executions(r.url) for r in (a, b, c)] == [1, 0, 0]  # computed on A, a hit on B and C
        assert _l2(b.metrics_url) == {"hits": 1, "misses": 0, "errors": 0}
        with Client(b.url) as client:
            stats = client.model_statistics("scale").model_stats[0].inference_stats
            assert (stats.cache_hit.count, stats.success.count) == (1, 1)  # a Redis hit is a cache hit

        # an answer stored by C, then a reload on A: no replica reads it from Redis any more
        second = first + 100
        infer(c, second)
        _wait_for_entries(store, 2)
        with Client(a.url) as client:
            client.load_model("scale")
        infer(b, second)
        assert [_executions(r.url) for r in (a, b, c)] == [0, 1, 1]  # (A's statistics are its new version's)
        _wait_for_entries(store, 3)  # B's answer, stored under the new generation, is A's to find
        infer(a, second)
        assert _executions(a.url) == 0 and _l2(a.metrics_url)["hits"] == 1

        # a stored value that is not an answer: a miss and an error, never a failed request
        third = first + 200
        infer(a, third)
        for key in _wait_for_entries(store, 4):
            store.set(key, b"RSC1 not an answer")
        infer(b, third)
        assert _executions(b.url) == 2 and _l2(b.metrics_url)["errors"] == 1

        # Redis goes away: every request is still answered, computed, and the failure counted
        redis_server.stop()
        for step in range(5):
            for replica in (a, b, c):
                infer(replica, first + 1000 + step)
        assert all(_l2(r.metrics_url)["errors"] >= 1 for r in (a, b, c))
    finally:
        store.close()


def test_with_no_in_process_cache_redis_alone_answers_repeats(
    tmp_path: Path, serve: Any, redis_server: RedisServer
) -> None:
    """``--cache-size 0`` with ``--cache-redis``: every repeat, on either replica, is a Redis hit."""
    import redis

    write_model(tmp_path, "scale", scale_graph("scale", INT64, 3), CONFIG)
    a, b = (serve(tmp_path, cache_size_bytes=0, cache_redis_url=redis_server.url, cache_redis_timeout_ms=2000)
            for _ in range(2))  # fmt: skip
    x = np.arange(4, dtype=np.int64).reshape(1, 4)
    store = redis.Redis.from_url(redis_server.url)
    try:
        with Client(a.url) as client:
            np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)
        _wait_for_entries(store, 1)
        for replica in (a, b, a, b):
            with Client(replica.url) as client:
                np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)
        assert [_executions(r.url) for r in (a, b)] == [1, 0]
        assert (_l2(a.metrics_url)["hits"], _l2(b.metrics_url)["hits"]) == (2, 2)
    finally:
        store.close()


@pytest.mark.slow
def test_three_cli_replicas_share_one_redis_and_lose_no_request_when_it_dies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``rapidserve serve`` three times behind one redis-server: an answer computed by one is a hit
    on the others; a reload on one hides what was stored before it from all; Redis killed under a
    round-robin load loses no request."""
    from remote import RemoteServer

    repo = tmp_path / "repo"
    write_model(repo, "scale", scale_graph("scale", INT64, 3), CONFIG)
    flags = ("--model-repository", str(repo), "--model-control-mode", "explicit", "--load-model", "*",
             "--cache-redis", redis_server.url, "--cache-redis-timeout-ms", "2000")  # fmt: skip
    replicas = [RemoteServer(*flags) for _ in range(3)]
    try:
        metrics_urls = [replica.metrics_url() for replica in replicas]  # (logged before "server ready")
        for replica in replicas:
            replica.wait_for_line("server ready")
        urls = [replica.url for replica in replicas]
        x = np.arange(4, dtype=np.int64).reshape(1, 4)
        with Client(urls[0]) as client:
            np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)
        _wait_for_stored(redis_server, 1)
        for url in urls[1:]:
            with Client(url) as client:
                np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 3)
        assert [_executions(url) for url in urls] == [1, 0, 0]

        z = x + 7  # computed by A and stored; then a reload on B: C does not find it in Redis
        with Client(urls[0]) as client:
            client.infer("scale", {"x": z})
        _wait_for_stored(redis_server, 2)
        with Client(urls[1]) as client:
            client.load_model("scale")
        with Client(urls[2]) as client:
            np.testing.assert_array_equal(client.infer("scale", {"x": z})["y"], z * 3)
        _wait_for_stored(redis_server, 3)  # C's answer, under the new generation: B (reloaded) finds it
        with Client(urls[1]) as client:
            np.testing.assert_array_equal(client.infer("scale", {"x": z})["y"], z * 3)
        assert [_executions(url) for url in urls] == [2, 0, 1]  # (B's statistics are its new version's)
        _round_robin_while_redis_dies(urls, metrics_urls, redis_server)
    finally:
        for replica in replicas:
            replica.stop()


def _wait_for_stored(redis_server: RedisServer, count: int) -> None:
    import redis

    store = redis.Redis.from_url(redis_server.url)
    try:
        _wait_for_entries(store, count)
    finally:
        store.close()


def _round_robin_while_redis_dies(urls: list[str], metrics_urls: list[str], redis_server: RedisServer) -> None:
    """Four clients send 400 requests (a quarter of them repeats) across the replicas in turn; Redis is
    killed after the first 100 answers. Every request must be answered correctly, and every replica
    must have met the dead Redis (counted) while answering them."""
    errors_before = [_l2(url)["errors"] for url in metrics_urls]
    answered = threading.Condition()
    done: list[int] = []
    errors: list[BaseException] = []

    def client(worker: int) -> None:
        clients = [Client(url) for url in urls]
        try:
            for i in range(100):
                value = (worker * 1000 + i) if i % 4 else 5  # every fourth request repeats one input
                x = np.full((1, 4), value, np.int64)
                np.testing.assert_array_equal(clients[i % 3].infer("scale", {"x": x})["y"], x * 3)
                with answered:
                    done.append(value)
                    answered.notify_all()
        except BaseException as exc:
            errors.append(exc)
            with answered:
                answered.notify_all()
        finally:
            for c in clients:
                c.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    with answered:
        assert answered.wait_for(lambda: len(done) >= 100 or errors, timeout=120)
        redis_server.stop()
        answered_when_killed = len(done)
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert len(done) == 400
    assert answered_when_killed < 400, "every request was answered before Redis died: nothing was tested"
    errors_after = [_l2(url)["errors"] for url in metrics_urls]
    assert all(after > before for before, after in zip(errors_before, errors_after, strict=True)), errors_after
