"""HTTP body compression as Triton's HTTP API takes it: ``Content-Encoding: gzip|deflate`` request bodies
(deflate in the zlib format, as tritonclient sends it) inflated to at most a bound, and ``Accept-Encoding``
chosen by weight among identity, gzip and deflate for the response."""

from __future__ import annotations

import zlib

from rapidserve.server.errors import InvalidRequest, TooLarge

__all__ = ["ENCODINGS", "Unsupported", "compress", "decompress", "response_encoding"]

ENCODINGS = ("gzip", "deflate")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Unsupported(InvalidRequest):
    """A request body in an encoding the server does not take (Triton answers 501, not 400)."""


def decompress(body: bytes | memoryview, encoding: str, limit: int) -> bytes | memoryview:
    """``body`` inflated per its ``Content-Encoding``: never more than ``limit`` bytes (the endpoint's body
    limit) are produced (a small body that inflates beyond it is refused as too large before it is all inflated)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity") or not body:
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise Unsupported(f"unsupported Content-Encoding '{encoding[:40]}'; expected gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"the {encoding} body does not decompress: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise TooLarge(
            f"the {encoding} body inflates to more than {limit} bytes; this endpoint takes at most {limit} "
            "(--grpc-max-message-bytes is the server's message limit)"
        )
    if not inflater.eof:
        raise InvalidRequest(f"the {encoding} body ends before its compressed stream does")
    if inflater.unused_data:
        raise InvalidRequest(f"the {encoding} body has {len(inflater.unused_data)} bytes after its compressed stream")
    return data


def response_encoding(accept: str) -> str:
    """The encoding to answer in: of identity, gzip and deflate, the one ``Accept-Encoding`` weighs
    highest (``q`` 1 when not given; the first of equal weights); identity when none is named."""
    best, weight = "identity", 0.0
    for item in accept.split(","):
        name, _, rest = item.partition(";")
        name = name.strip().lower()
        if name not in ("identity", *ENCODINGS):
            continue
        q = 1.0
        rest = rest.strip()
        if rest.startswith("q="):
            try:
                q = float(rest[2:])
            except ValueError:
                continue
        if q > weight:
            best, weight = name, q
    return best


def compress(data: bytes, encoding: str) -> bytes:
    """``data`` compressed as gzip or deflate (zlib format)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, _WBITS[encoding])
    return compressor.compress(data) + compressor.flush()
