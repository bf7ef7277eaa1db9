"""The server's side of a load point, from the statistics RPC read before and after it."""

from __future__ import annotations

from typing import Any

from rapidserve.clients.client import Client

__all__ = ["ServerStats"]


class ServerStats:
    """The statistics RPC before and after a load point: the server's side of it."""

    def __init__(self, url: str, model: str, version: str, options: dict[str, Any] | None = None) -> None:
        self._url, self._model, self._version = url, model, version
        self._options = options or {}  # Client's TLS and headers
        self._before: Any = None

    def _read(self) -> Any:
        try:
            with Client(self._url, timeout_s=10, **self._options) as client:
                return client.model_statistics(self._model, self._version).model_stats[0]
        except Exception:
            return None  # a server without the statistics extension

    def start(self) -> None:
        self._before = self._read()

    def delta(self) -> dict[str, Any]:
        after = self._read()
        if after is None or self._before is None:
            return {}
        a, b = after.inference_stats, self._before.inference_stats

        def per_request_us(name: str) -> float | None:
            count = getattr(a, name).count - getattr(b, name).count
            return (getattr(a, name).ns - getattr(b, name).ns) / count / 1000 if count else None

        executions = after.execution_count - self._before.execution_count
        hits = a.cache_hit.count - b.cache_hit.count
        lookups = hits + a.cache_miss.count - b.cache_miss.count
        return {
            "server_queue_us": per_request_us("queue"),
            "server_compute_input_us": per_request_us("compute_input"),
            "server_compute_infer_us": per_request_us("compute_infer"),
            "server_compute_output_us": per_request_us("compute_output"),
            "server_avg_batch": (after.inference_count - self._before.inference_count) / executions
            if executions
            else None,
            "server_cache_hit_ratio": hits / lookups if lookups else None,
        }
