"""The tables from rapidserve's transport-neutral errors to gRPC status codes and to HTTP statuses, and
the one-line messages callers see (bounded in length; tracebacks stay in the log)."""

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

__all__ = [
    "HTTP_STATUS_OF",
    "MAX_MESSAGE_CHARS",
    "STATUS_OF",
    "http_status_of",
    "message_of",
    "status_of",
    "unexpected",
]

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

HTTP_STATUS_OF: dict[type[RapidServeError], int] = {
    InvalidRequest: 400,
    ModelLoadError: 400,
    ModelNotFound: 404,
    Overloaded: 503,
    TooLarge: 413,
    DeadlineExceeded: 503,
    Unavailable: 503,
    EngineError: 500,
    NotAllowed: 400,
}

# a message quoting what a caller sent (names, values) must not grow with the request
MAX_MESSAGE_CHARS = 1024

_error_ids = itertools.count(1)


def status_of(exc: RapidServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def http_status_of(exc: RapidServeError) -> int:
    """The HTTP status of an error (``HTTP_STATUS_OF``); anything not in it is 500.

    Triton's HTTP server (src/http_server.cc ``HttpCodeFromError``) answers INTERNAL 500, NOT_FOUND
    404, UNAVAILABLE 503, UNSUPPORTED 501 and everything else 400; ours follow it where Triton's core
    raises what we raise:

    ==============================  ======  ==================================================
    error                           status  Triton's core for the same case
    ==============================  ======  ==================================================
    InvalidRequest, ModelLoadError  400     INVALID_ARG
    ModelNotFound                   404     NOT_FOUND ("'m' is not found", "... version 3 ...")
    Overloaded                      503     UNAVAILABLE ("Exceeds maximum queue size")
    DeadlineExceeded                503     UNAVAILABLE ("Request timeout expired")
    Unavailable                     503     UNAVAILABLE (model not ready, server stopping)
    EngineError                     500     INTERNAL
    TooLarge                        413     none: HTTP's Content Too Large (Triton says 400)
    NotAllowed                      400     loads outside explicit mode: UNAVAILABLE, 503; ours
                                            is not transient, so not a status clients retry
    ==============================  ======  ==================================================
    """
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS_OF:
            return HTTP_STATUS_OF[cls]
    return 500


def message_of(exc: object) -> str:
    """What a caller is told about ``exc``: its message, on one line, at most ``MAX_MESSAGE_CHARS``."""
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def unexpected(where: str, exc: BaseException) -> str:
    """Log an unexpected exception with its traceback; the caller gets only a reference to it."""
    error_id = f"E{next(_error_ids)}"
    log.error("unexpected error %s in %s", error_id, where, exc_info=exc)
    return f"internal error in {where} (reference {error_id} in the server log)"
