"""The one table from rapidserve's transport-neutral errors to gRPC status codes, and the one-line
messages callers see (bounded in length; tracebacks stay in the log)."""

from __future__ import annotations

import itertools
import logging

import grpc

from rapidserve.server.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NotAllowed,
    Overloaded,
    RapidServeError,
    TooLarge,
    Unavailable,
)

__all__ = ["MAX_MESSAGE_CHARS", "STATUS_OF", "message_of", "status_of", "unexpected"]

log = logging.getLogger("rapidserve.server")

STATUS_OF: dict[type[RapidServeError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EngineError: grpc.StatusCode.INTERNAL,
    NotAllowed: grpc.StatusCode.FAILED_PRECONDITION,
}

# a message quoting what a caller sent (names, values) must not grow with the request
MAX_MESSAGE_CHARS = 1024

_error_ids = itertools.count(1)


def status_of(exc: RapidServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def message_of(exc: object) -> str:
    """What a caller is told about ``exc``: its message, on one line, at most ``MAX_MESSAGE_CHARS``."""
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def unexpected(where: str, exc: BaseException) -> str:
    """Log an unexpected exception with its traceback; the caller gets only a reference to it."""
    error_id = f"E{next(_error_ids)}"
    log.error("unexpected error %s in %s", error_id, where, exc_info=exc)
    return f"internal error in {where} (reference {error_id} in the server log)"
