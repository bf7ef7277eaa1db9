"""rapidserve: a low-latency, Triton wire-compatible inference server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AsyncClient", "Client", "InferenceServerError", "__version__"]

if TYPE_CHECKING:
    from rapidserve.clients.client import AsyncClient, Client, InferenceServerError

    __version__: str


def __getattr__(name: str) -> Any:
    # The clients load lazily so that `import rapidserve` stays cheap for the server and tools, and the
    # version is the installed distribution's (one number, in pyproject.toml).
    if name in ("Client", "AsyncClient", "InferenceServerError"):
        from rapidserve.clients import client

        return getattr(client, name)
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("rapidserve")
        except metadata.PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'rapidserve' has no attribute {name!r}")
