"""What the gRPC and HTTP clients return and raise, shared so that a caller's code is the same whichever
protocol a URL picks: ``InferenceServerError`` always carries a gRPC status code (an HTTP status is
translated, and kept in ``http_status``), ``ModelMetadata`` is one value type for both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from rapidserve.common.types import TensorSpec

__all__ = ["Arrays", "InferenceServerError", "ModelMetadata", "code_of_http_status"]

Arrays = dict[str, np.ndarray[Any, Any]]

# An HTTP status as the gRPC code a KServe v2 / Triton server means by it (Triton answers 400 for an
# invalid argument and for what has no closer status, 404 for an unknown model, 503 when unavailable).
_CODE_OF_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    412: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of_http_status(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP error status; UNKNOWN for one no table names."""
    if status in _CODE_OF_STATUS:
        return _CODE_OF_STATUS[status]
    return grpc.StatusCode.INTERNAL if 500 <= status < 600 else grpc.StatusCode.UNKNOWN


class InferenceServerError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's explanation, and
    ``http_status`` the HTTP status when the call went over HTTP (None over gRPC)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]  # full shapes, -1 for a variable dimension (the batch one included)
    outputs: tuple[TensorSpec, ...]
