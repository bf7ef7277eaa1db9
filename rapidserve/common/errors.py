"""The error the shared tensor codec raises, and how any message quotes text a caller sent."""

from __future__ import annotations

__all__ = ["InvalidTensor", "shown"]


class InvalidTensor(ValueError):
    """A tensor on the wire does not match its own header: unknown datatype, impossible shape, or data
    of the wrong length. The server answers it as an invalid request; a client raises it as it is."""


def shown(text: str, limit: int = 80) -> str:
    """``text`` as a message may quote it: at most ``limit`` characters, control characters escaped."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
