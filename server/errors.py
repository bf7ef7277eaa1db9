"""Transport-neutral errors of the serving core. The gRPC edge maps them to status codes in one table
(``rapidserve.server.status.STATUS_OF``); nothing below the transport knows about gRPC."""

from __future__ import annotations

__all__ = [
    "DeadlineExceeded",
    "EngineError",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "NotAllowed",
    "Overloaded",
    "RapidServeError",
    "TooLarge",
    "Unavailable",
]


class RapidServeError(Exception):
    """Base class: the message is what the caller sees, so it says what was expected and what came.

    ``reason`` is the failure reason that metrics count it under (a small, fixed set of labels).
    """

    reason = "internal"


class InvalidRequest(RapidServeError):
    """The request is malformed or does not fit the model (INVALID_ARGUMENT)."""

    reason = "invalid"


class ModelNotFound(RapidServeError):
    """No such model, or no such version of it (NOT_FOUND)."""

    reason = "not_found"


class Overloaded(RapidServeError):
    """The model's queue is full (RESOURCE_EXHAUSTED)."""

    reason = "rejected"


class TooLarge(RapidServeError):
    """Something the caller sent is over a configured size limit (RESOURCE_EXHAUSTED): the message
    names the limit and the flag that raises it."""

    reason = "too_large"


class DeadlineExceeded(RapidServeError):
    """The request's timeout or the client's deadline passed before it ran (DEADLINE_EXCEEDED)."""

    reason = "timeout"


class Unavailable(RapidServeError):
    """The model exists but is not ready, or the server is shutting down (UNAVAILABLE)."""

    reason = "unavailable"


class EngineError(RapidServeError):
    """The backend failed while running a request (INTERNAL)."""

    reason = "engine_error"


class ModelLoadError(RapidServeError):
    """A model in the repository could not be loaded: bad config, missing file, engine failure."""

    reason = "load_error"


class NotAllowed(RapidServeError):
    """The operation is not allowed in the server's current mode (FAILED_PRECONDITION)."""

    reason = "not_allowed"
