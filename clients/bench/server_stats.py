"""The server's side of a load point, from the statistics RPC read before and after it (on every server,
added up, when the load was spread over several)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rapidserve.clients.client import Client

__all__ = ["ServerStats"]

_DURATIONS = ("queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class ServerStats:
    """The statistics RPC before and after a load point: the server's side of it. ``url`` is one server,
    or several separated by commas, whose counters are added up."""

    def __init__(self, url: str, model: str, version: str, options: dict[str, Any] | None = None) -> None:
        self._urls, self._model, self._version = url.split(","), model, version
        self._options = options or {}  # Client's TLS and headers
        self._before: dict[str, int] | None = None

    def _read(self) -> dict[str, int] | None:
        """The counters the summary needs, summed over the servers; None if any server lacks them."""
        totals: Counter[str] = Counter()
        for url in self._urls:
            try:
                with Client(url, timeout_s=10, **self._options) as client:
                    stats = client.model_statistics(self._model, self._version).model_stats[0]
            except Exception:
                return None  # a server without the statistics extension
            totals["executions"] += stats.execution_count
            totals["inferences"] += stats.inference_count
            for name in _DURATIONS:
                totals[f"{name}.count"] += getattr(stats.inference_stats, name).count
                totals[f"{name}.ns"] += getattr(stats.inference_stats, name).ns
        return dict(totals)

    def start(self) -> None:
        self._before = self._read()

    def delta(self) -> dict[str, Any]:
        after = self._read()
        if after is None or self._before is None:
            return {}
        before = self._before

        def change(name: str) -> int:
            return after.get(name, 0) - before.get(name, 0)

        def per_request_us(name: str) -> float | None:
            count = change(f"{name}.count")
            return change(f"{name}.ns") / count / 1000 if count else None

        executions = change("executions")
        hits = change("cache_hit.count")
        lookups = hits + change("cache_miss.count")
        return {
            "server_queue_us": per_request_us("queue"),
            "server_compute_input_us": per_request_us("compute_input"),
            "server_compute_infer_us": per_request_us("compute_infer"),
            "server_compute_output_us": per_request_us("compute_output"),
            "server_avg_batch": change("inferences") / executions if executions else None,
            "server_cache_hit_ratio": hits / lookups if lookups else None,
        }
