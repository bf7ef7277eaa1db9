"""Protobuf wire-format helpers for the inference messages, where the generated classes would copy.

A large ``ModelInferRequest`` is split as it is received: its ``raw_input_contents`` (field 7) become
views of the received bytes and only the rest is parsed, so tensor data exists once in memory instead
of three times (gRPC's bytes, the parsed message's copy, and the copy every field access makes).
"""

from __future__ import annotations

from typing import Any

from rapidserve import protos

__all__ = ["SPLIT_FROM_BYTES", "SplitInferRequest", "parse_infer_request", "varint_at"]

# Below this a request is parsed whole: the copies cost less than walking its fields in Python.
SPLIT_FROM_BYTES = 1 << 20
_RAW_INPUT_CONTENTS = 7
_LENGTH_DELIMITED = 2


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
    """A ``ModelInferRequest`` from its serialized bytes: parsed whole when small or when its layout is
    unusual (the parser then judges it), split when large. Raises protobuf's DecodeError like
    ``FromString``."""
    if len(data) < SPLIT_FROM_BYTES:
        return protos.ModelInferRequest.FromString(data)
    view = memoryview(data)
    rest = bytearray()
    raw: list[memoryview] = []
    pos = 0
    try:
        while pos < len(view):
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
            elif wire_type == 0:
                _, pos = varint_at(view, pos)
                rest += view[start:pos]
            else:  # fixed-width or group fields have no place in this message: let the parser say so
                return protos.ModelInferRequest.FromString(data)
    except ValueError:
        return protos.ModelInferRequest.FromString(data)  # raises DecodeError with the parser's reason
    message = protos.ModelInferRequest.FromString(bytes(rest))
    return SplitInferRequest(message, raw, len(data))
