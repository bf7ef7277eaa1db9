"""One inference request below the gRPC edge, from its parsed message to its answer.

The model it names; for a model with the response cache, a lookup keyed on the request's wire bytes,
whose hit is answered with ready-made response bytes (no decoding, no queue, no encoding); decoding,
in a worker thread when the request is heavy; the model; encoding; and the bound on the answer's size.
Both the unary RPC and the stream use it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rapidserve.server import codec
from rapidserve.server.cache import CacheEntry
from rapidserve.server.errors import EngineError, RapidServeError
from rapidserve.server.manager import ModelManager
from rapidserve.server.model import ModelVersion
from rapidserve.server.stats import ServerStats
from rapidserve.server.types import InferRequest, InferResponse
from rapidserve.server.wire import wire_cache_key, with_id

__all__ = ["ENCODE_ON_LOOP_ELEMENTS", "InferencePath"]

# BYTES outputs are encoded element by element: more than this many, and it happens in a worker thread
ENCODE_ON_LOOP_ELEMENTS = 10_000


class InferencePath:
    """Answers parsed ``ModelInferRequest`` messages. ``stats`` counts failures that name no loaded model."""

    def __init__(self, manager: ModelManager, stats: ServerStats, max_response_bytes: int) -> None:
        self._manager = manager
        self.stats = stats
        self.max_response_bytes = max_response_bytes

    async def infer(self, request: Any, deadline: float | None, size: int) -> Any:
        """A ``ModelInferResponse``, or for a cache hit its serialized bytes, ready-made. The request is
        let go once decoded: the caller must not keep a reference (its bytes would be held twice)."""
        model = self.model_for(request)
        spec = model.spec
        if model.caches and len(request.inputs) <= len(spec.inputs) and len(request.outputs) <= len(spec.outputs):
            key = wire_cache_key(request, model.name, model.version, model.output_names)
        else:
            key = None
        if key is not None:
            entry = model.cache_lookup(key)
            if entry is not None:  # a hit skips decoding, validation, the queue and encoding
                return self._checked(model, with_id(_encoded(model, entry), request.id))
        if codec.heavy(request, size):  # many elements to convert: keep the event loop free meanwhile
            decoded = await self._decode_in_thread(model, request, deadline)
        else:
            decoded = self.decode(model, request, deadline)
        del request
        response = await model.infer(decoded, key)
        if any(a.dtype.kind == "O" and a.size > ENCODE_ON_LOOP_ELEMENTS for a in response.outputs.values()):
            return self._checked(model, await asyncio.to_thread(codec.encode_response, response))
        return self._checked(model, codec.encode_response(response))

    @staticmethod
    def decode(model: ModelVersion, request: Any, deadline: float | None) -> InferRequest:
        """The request decoded against the model's spec; a refusal counts against the model."""
        try:
            return codec.decode_request(request, deadline, model.spec)
        except RapidServeError as exc:
            model.rejected(exc)
            raise

    @staticmethod
    async def _decode_in_thread(model: ModelVersion, request: Any, deadline: float | None) -> InferRequest:
        """Decoded in a worker thread, with the version held open: a reload meanwhile must not close it."""
        try:
            with model.held():
                return await asyncio.to_thread(codec.decode_request, request, deadline, model.spec)
        except RapidServeError as exc:
            model.rejected(exc)  # (statistics change on the event loop only)
            raise

    def model_for(self, request: Any) -> ModelVersion:
        """The version an inference request names; failures count without a model label."""
        try:
            return self._manager.get(request.model_name, request.model_version)
        except RapidServeError as exc:
            self.stats.failed(exc.reason)
            raise

    def too_large(self, model: ModelVersion | None, size: int) -> EngineError:
        """The error for an answer larger than the server sends (counted against the model)."""
        name = f"model '{model.name}'" if model is not None else "the model"
        error = EngineError(
            f"{name} produced a response of {size} bytes, more than the server sends "
            f"({self.max_response_bytes}, --grpc-max-message-bytes); ask for fewer outputs or a smaller batch"
        )
        if model is not None:
            model.rejected(error)
        return error

    def _checked(self, model: ModelVersion, response: Any) -> Any:
        """Refuse an answer larger than the client is allowed to receive, saying so (gRPC itself would
        fail it with a bare RESOURCE_EXHAUSTED on the client's side)."""
        size = len(response) if isinstance(response, bytes) else response.ByteSize()
        if size > self.max_response_bytes:
            raise self.too_large(model, size)
        return response


def _encoded(model: ModelVersion, entry: CacheEntry) -> bytes:
    """A cached answer's serialized response, encoded once and remembered with the entry."""
    data = entry.memo.get("grpc")
    if data is None:
        response = InferResponse(model.name, str(model.version), entry.arrays)
        data = codec.encode_response(response).SerializeToString()
        model.remember(entry, "grpc", data)
    return data
