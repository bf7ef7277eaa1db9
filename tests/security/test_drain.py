"""Drain on shutdown: readiness goes first, new requests (unary, or on open streams) get UNAVAILABLE,
every request already accepted completes, and the process exits as soon as they have."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from remote import RemoteServer
from standard_services import health_watch
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model

from rapidserve import AsyncClient, InferenceServerError, protos

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]

# requests wait in the queue until 8 have come or 1.5 s have passed: they are accepted, not yet run
HELD_CONFIG = (
    ADD_SUB_CONFIG
    + """
dynamic_batching { max_queue_delay_microseconds: 1500000 preferred_batch_size: [ 8 ] }
parameters { key: "batching_mode" value: { string_value: "fixed" } }
"""
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("drain")
    write_model(repo, "add_sub", add_sub_graph(), HELD_CONFIG)
    return repo


def _inputs(value: float) -> dict[str, np.ndarray]:
    a = np.full((1, 16), value, np.float32)
    return {"INPUT0": a, "INPUT1": np.ones((1, 16), np.float32)}


# one process only: watches the one process's servicer; test_frontends.py drains the front ends
@pytest.mark.frontends(1)
def test_drain_answers_accepted_stream_requests_refuses_new_ones_and_ends_early(repo: Path, serve) -> None:
    server = serve(repo, grace_period_s=30)
    model = server.server.manager.get("add_sub")

    async def scenario() -> tuple[list, BaseException, float, bool]:
        async with AsyncClient(server.url) as client:  # one stream carries every call
            accepted = [asyncio.create_task(client.infer("add_sub", _inputs(v))) for v in (1.0, 2.0, 3.0)]
            while model.pending_requests < 3:  # all three are queued on the server
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop))
            while not server.server._servicer.draining:
                await asyncio.sleep(0.01)
            ready = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_ready(server), server.loop))
            try:
                await client.infer("add_sub", _inputs(4.0))
                late: BaseException = AssertionError("a request sent after the drain began was run")
            except InferenceServerError as exc:
                late = exc
            results = await asyncio.gather(*accepted)
            await stopping
            return results, late, time.monotonic() - started, ready

    results, late, took_s, ready = asyncio.run(scenario())
    for value, outputs in zip((1.0, 2.0, 3.0), results, strict=True):
        np.testing.assert_array_equal(outputs["OUTPUT0"], np.full((1, 16), value + 1, np.float32))
    assert isinstance(late, InferenceServerError) and late.code == grpc.StatusCode.UNAVAILABLE, late
    assert not ready
    assert took_s < 10, f"stopping took {took_s:.1f} s with a 30 s grace period"


async def _ready(server) -> bool:
    """What the ServerReady RPC answers (called in process: new calls are refused once the drain began)."""
    servicer = server.server._servicer
    return bool((await type(servicer).ServerReady.__wrapped__(servicer, None, None)).ready)


def _queued(metrics_url: str, model: str) -> float:
    """The requests waiting in a model's queue, as the server's /metrics reports them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rapidserve_queue_pending_requests" and sample.labels.get("model") == model
    )


def test_sigterm_with_an_idle_open_stream_exits_well_before_the_exit_timeout(repo: Path) -> None:
    remote = RemoteServer("--model-repository", str(repo), "--exit-timeout-secs", "30")
    metrics_url = remote.metrics_url()
    try:

        async def open_stream_then_term() -> tuple[float, BaseException | None]:
            async with AsyncClient(remote.url, timeout_s=30) as client:
                while True:
                    try:
                        if await client.is_server_ready():
                            break
                    except InferenceServerError:
                        pass
                    await asyncio.sleep(0.1)
                held = asyncio.create_task(client.infer("add_sub", _inputs(1.0)))  # queued for up to 1.5 s
                deadline = time.monotonic() + 60
                while not await asyncio.to_thread(_queued, metrics_url, "add_sub"):  # accepted: it is in the queue
                    assert not held.done() and time.monotonic() < deadline, (
                        "/metrics never showed the request queued before it "
                        + ("was answered" if held.done() else "60 s passed")
                        + f"\n{remote.log}"
                    )
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                remote.proc.send_signal(signal.SIGTERM)
                outputs = await held
                np.testing.assert_array_equal(outputs["OUTPUT0"], np.full((1, 16), 2.0, np.float32))
                await asyncio.to_thread(remote.proc.wait, 30)
                took = time.monotonic() - started
                try:  # the stream is still open on the client's side: its next request is refused
                    await client.infer("add_sub", _inputs(2.0), timeout_s=5)
                    error = None
                except InferenceServerError as exc:
                    error = exc
                return took, error

        took_s, error = asyncio.run(open_stream_then_term())
        assert took_s < 8, f"the server took {took_s:.1f} s to exit (exit timeout 30 s)\n{remote.log}"
        assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE
    finally:
        assert remote.stop() == 0, remote.log


def test_drain_finishes_accepted_unary_requests_and_does_not_wait_for_health_watchers(repo: Path, serve) -> None:
    server = serve(repo, grace_period_s=30)
    model = server.server.manager.get("add_sub")
    from rapidserve import Client

    results: dict[float, object] = {}

    def call(value: float) -> None:
        with Client(server.url, timeout_s=30) as client:
            try:
                results[value] = client.infer("add_sub", _inputs(value))["OUTPUT0"]
            except InferenceServerError as exc:
                results[value] = exc

    threads = [threading.Thread(target=call, args=(v,)) for v in (1.0, 2.0)]
    for thread in threads:
        thread.start()
    channel = grpc.insecure_channel(server.url)
    watch = health_watch(channel)(protos.HealthCheckRequest(), timeout=60)
    assert next(watch).status == protos.HealthCheckResponse.SERVING  # a watcher is connected
    while model.pending_requests < 2:  # both unary requests are queued on the server
        time.sleep(0.01)
    started = time.monotonic()
    server.run(server.server.stop(), timeout=60)
    took_s = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    for value in (1.0, 2.0):
        np.testing.assert_array_equal(results[value], np.full((1, 16), value + 1, np.float32))
    assert next(watch).status == protos.HealthCheckResponse.NOT_SERVING  # told before it was cut off
    with pytest.raises(grpc.RpcError):
        next(watch)
    channel.close()
    assert took_s < 10, f"stopping took {took_s:.1f} s with a health watcher open and a 30 s grace period"
