"""rapidserve: a low-latency, Triton wire-compatible inference server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "InferenceServerError", "__version__"]

if TYPE_CHECKING:
    from rapidserve.clients.client import AsyncClient, Client, InferenceServerError


def __getattr__(name: str) -> Any:
    # The clients load lazily so that `import rapidserve` stays cheap for the server and tools.
    if name in ("Client", "AsyncClient", "InferenceServerError"):
        from rapidserve.clients import client

        return getattr(client, name)
    raise AttributeError(f"module 'rapidserve' has no attribute {name!r}")
