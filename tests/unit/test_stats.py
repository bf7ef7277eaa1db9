"""Histograms, the percentile window and the statistics' counting rules."""

from __future__ import annotations

import numpy as np
import pytest

from rapidserve.server.stats import LATENCY_BUCKETS_S, Histogram, LatencyWindow, ModelStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_histogram_buckets_hold_values_up_to_their_bound() -> None:
    histogram = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 5.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]  # le 1 ms, le 10 ms, +Inf
    assert histogram.count == 5 and histogram.sum == pytest.approx(5.0135)


@pytest.mark.parametrize("seed", [0, 1])
def test_window_percentiles_are_within_one_percent_of_the_exact_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = rng.lognormal(mean=np.log(0.002), sigma=1.0, size=20_000)  # seconds, a long right tail
    window = LatencyWindow(clock=Clock())
    for value in samples:
        window.add(float(value))
    quantiles = window.quantiles((0.5, 0.9, 0.95, 0.99, 0.999))
    for q, value in quantiles.items():
        exact = np.quantile(samples, q, method="lower")
        assert value == pytest.approx(exact, rel=0.0101), q
    assert set(quantiles) == {0.5, 0.9, 0.95, 0.99, 0.999}


def test_window_forgets_samples_older_than_the_window() -> None:
    clock = Clock()
    window = LatencyWindow(window_s=60, slots=6, clock=clock)
    for _ in range(100):
        window.add(0.5)  # slow requests a while ago
    clock.now += 30
    for _ in range(100):
        window.add(0.001)
    assert window.quantiles((0.99,))[0.99] == pytest.approx(0.5, rel=0.01)  # both still in the window
    clock.now += 40  # the slow ones are now 70 s old
    assert window.quantiles((0.99,))[0.99] == pytest.approx(0.001, rel=0.01)
    clock.now += 61
    assert window.quantiles() == {}  # nothing left
    window.add(0.02)
    assert window.quantiles((0.5,))[0.5] == pytest.approx(0.02, rel=0.01)


def test_window_handles_zero_and_tiny_durations() -> None:
    window = LatencyWindow(clock=Clock())
    window.add(0.0)
    window.add(1e-12)
    assert window.quantiles((0.5,))[0.5] < 2e-9


def test_statistics_follow_tritons_meanings() -> None:
    stats = ModelStats()
    stats.queued(1_000)
    stats.queued(3_000)
    stats.record_execution(requests=2, batch_size=5, input_ns=10, infer_ns=100, output_ns=20)
    stats.succeeded(50_000)
    stats.succeeded(70_000)
    stats.cache_hit_served(2_000, batch_size=3)
    stats.failed("invalid")
    stats.failed("timeout", 5_000)
    stats.failed("timeout", 5_000)

    assert stats.success.count == 3 and stats.fail.count == 3
    assert stats.failures == {"invalid": 1, "timeout": 2}
    # compute_* count once per request, each with its batch's time; batch stats once per execution
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 200)
    assert (stats.batches[5].compute_infer.count, stats.batches[5].compute_infer.ns) == (1, 100)
    # inference/execution counts leave cache hits out; queue and success include them
    assert (stats.inference_count, stats.execution_count, stats.shared_inferences) == (5, 1, 3)
    assert stats.queue.count == 3 and stats.queue.ns == 4_000
    # histograms: successes (hits too) and queued requests only
    assert stats.request_seconds.count == 3 and stats.queue_seconds.count == 2
    assert stats.batch_size.count == 1 and stats.batch_size.sum == 5
    assert stats.request_window.quantiles((0.5,))[0.5] == pytest.approx(50e-6, rel=0.01)


def test_latency_buckets_span_sub_millisecond_to_seconds() -> None:
    assert LATENCY_BUCKETS_S[0] <= 0.0001 and LATENCY_BUCKETS_S[-1] >= 10
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)


def _nvml_starts() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    return True


def test_gpu_metrics_without_a_gpu_report_nothing_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from rapidserve.server.gpu_metrics import GpuCollector

    if _nvml_starts():
        pytest.skip("this machine has a GPU: test_gpu_metrics_read_every_gpu covers it")
    collector = GpuCollector()
    with caplog.at_level(logging.DEBUG, logger="rapidserve.server.gpu_metrics"):
        assert list(collector.collect()) == []
        assert list(collector.collect()) == []  # said once, not on every scrape
    assert [r.message for r in caplog.records if "no GPU metrics" in r.message].__len__() == 1
    names = {family.name for family in collector.describe()}
    assert names == {"rapidserve_gpu_utilization_ratio", "rapidserve_gpu_memory_used_bytes",
                     "rapidserve_gpu_memory_total_bytes"}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_starts(), reason="needs an NVIDIA GPU and driver (NVML)")
def test_gpu_metrics_read_every_gpu() -> None:
    import pynvml

    from rapidserve.server.gpu_metrics import GpuCollector

    families = {family.name: family for family in GpuCollector().collect()}
    total = families["rapidserve_gpu_memory_total_bytes"].samples
    assert len(total) == pynvml.nvmlDeviceGetCount() and all(s.value > 0 for s in total)
    assert all(0 <= s.value <= 1 for s in families["rapidserve_gpu_utilization_ratio"].samples)
