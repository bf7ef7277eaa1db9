"""Server settings: one typed object, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerSettings"]

INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model_repositories: tuple[Path, ...]
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # 0 picks a free port (tests)
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
    model_load_threads: int = 4
    # tritonclient opens channels allowing INT32_MAX-byte messages; gRPC's own default is 4 MiB
    grpc_max_message_bytes: int = INT32_MAX
    grace_period_s: float = 30.0
    batching_mode: str = "adaptive"  # adaptive | fixed (Triton's exact behaviour); a model may override
    cache_size_bytes: int = 256 * 2**20  # server-wide prediction cache; 0 disables it
    metrics_port: int = 8002  # Prometheus /metrics; 0 picks a free port (tests)
    metrics_enabled: bool = True


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes. Raises ValueError naming the units."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number) :].lower()
    if unit not in _UNITS or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"not a size: {text!r}; use bytes or a suffix like 512KiB, 256MiB, 1GB")
    return int(float(number) * _UNITS[unit])
