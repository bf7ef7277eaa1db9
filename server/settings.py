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
