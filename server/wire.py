"""Protobuf wire-format helpers for the inference messages, where the generated classes would copy.

A large ``ModelInferRequest`` is split as it is received: its ``raw_input_contents`` (field 7) become
views of the received bytes and only the rest is parsed, so tensor data exists once in memory instead
of three times (gRPC's bytes, the parsed message's copy, and the copy every field access makes). The
split walks the message's top-level fields in Python, so callers run it off the event loop, and a
message with more fields than any real request has is refused before the parser builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from rapidserve import protos
from rapidserve.server.cache import cache_key

__all__ = [
    "MAX_FIELDS",
    "SPLIT_FROM_BYTES",
    "SplitInferRequest",
    "Undecodable",
    "parse_infer_request",
    "parser",
    "stream_ok",
    "varint_at",
    "wire_cache_key",
    "with_id",
]

# Below this a request is parsed whole, in C: at most a few thousand fields, a few milliseconds.
SPLIT_FROM_BYTES = 64 * 1024
# Top-level fields one request may have (inputs, outputs, raw contents, parameters and the rest): far
# more than any model takes, far fewer than a hostile message could make the parser build.
MAX_FIELDS = 4096
_RAW_INPUT_CONTENTS = 7
_VARINT, _LENGTH_DELIMITED = 0, 2


class Undecodable:
    """What a parser gives for bytes that are not the RPC's message, so that the call ends
    INVALID_ARGUMENT with the parser's reason (grpcio would answer UNKNOWN)."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.reason = f"the request is not a valid {message_type}: {error}"


def parser(message_class: Any) -> Callable[[bytes], Any]:
    """A parser of one request message type that returns ``Undecodable`` instead of raising; inference
    requests keep large tensor data as views of the received bytes."""
    name = message_class.DESCRIPTOR.full_name
    parse = parse_infer_request if name == "inference.ModelInferRequest" else message_class.FromString

    def parse_or_explain(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(name, exc)

    return parse_or_explain


class SplitInferRequest:
    """A ``ModelInferRequest`` whose ``raw_input_contents`` are memoryviews of the received bytes;
    every other attribute is the parsed message's."""

    __slots__ = ("_message", "_size", "raw_input_contents")

    def __init__(self, message: Any, raw: list[memoryview], size: int) -> None:
        self._message = message
        self.raw_input_contents = raw
        self._size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)

    def ByteSize(self) -> int:  # protobuf's name
        return self._size


def varint_at(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint starting at ``pos`` and the position after it; ValueError if it runs off the end."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_infer_request(data: bytes) -> Any:
    """A ``ModelInferRequest`` from its serialized bytes: parsed whole when small, split when large.
    Raises protobuf's DecodeError like ``FromString``, with the parser's reason or the field limit."""
    if len(data) < SPLIT_FROM_BYTES:
        return protos.ModelInferRequest.FromString(data)
    view = memoryview(data)
    rest = bytearray()
    raw: list[memoryview] = []
    pos = fields = 0
    try:
        while pos < len(view):
            fields += 1
            if fields > MAX_FIELDS:
                raise DecodeError(f"the request has more than {MAX_FIELDS} top-level fields")
            start = pos
            tag, pos = varint_at(view, pos)
            wire_type = tag & 7
            if wire_type == _LENGTH_DELIMITED:
                length, pos = varint_at(view, pos)
                end = pos + length
                if end > len(view):
                    raise ValueError("a field runs past the end of the message")
                if tag >> 3 == _RAW_INPUT_CONTENTS:
                    raw.append(view[pos:end])
                else:
                    rest += view[start:end]
                pos = end
            elif wire_type == _VARINT:
                _, pos = varint_at(view, pos)
                rest += view[start:pos]
            else:  # fixed-width or group fields have no place in this message: let the parser say so
                return protos.ModelInferRequest.FromString(data)
    except ValueError:
        return protos.ModelInferRequest.FromString(data)  # raises DecodeError with the parser's reason
    return SplitInferRequest(protos.ModelInferRequest.FromString(rest), raw, len(data))


def wire_cache_key(request: Any, name: str, version: int, output_names: Sequence[str]) -> bytes | None:
    """The prediction-cache key straight from a raw request's bytes (what ``PredictionCache.key``
    computes from the decoded arrays); None where the request needs the full path."""
    raw = request.raw_input_contents
    tensors = request.inputs
    if not raw or len(raw) != len(tensors) or request.parameters or any(t.parameters for t in tensors):
        return None  # requests with parameters take the full path, which checks them
    if any(o.parameters for o in request.outputs):
        return None
    parts = [(t.name, t.datatype, tuple(t.shape), raw[i]) for i, t in enumerate(tensors)]
    outputs = tuple(o.name for o in request.outputs) or output_names
    return cache_key(name, version, parts, outputs)


def with_id(response: bytes, request_id: str) -> bytes:
    """Set ``id`` (field 3) on a serialized response: a field appended later wins when parsed."""
    if not request_id:
        return response
    encoded = request_id.encode()
    return response + b"\x1a" + protos.varint(len(encoded)) + encoded


def stream_ok(response: bytes) -> bytes:
    """A serialized ``ModelStreamInferResponse`` wrapping a serialized response (field 2)."""
    return b"\x12" + protos.varint(len(response)) + response
