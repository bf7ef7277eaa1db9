"""What prepare tells its user while it runs, and how a failure reaches them: one line per step start
and end with the elapsed seconds (when the output is not a terminal; a terminal gets tqdm's bar over
the variants), and every failure as one line naming the file, the step and the reason."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["DEBUG_HINT", "PrepareError", "Progress", "one_line"]

DEBUG_HINT = "run with --log-level debug for the traceback"

log = logging.getLogger(__name__)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type where the message alone would not say what it is, whitespace
    collapsed (ONNX Runtime's messages span lines), cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, (ValueError, OSError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PrepareError(Exception):
    """A step of prepare failed: the message names the file, the step and the reason."""

    def __init__(self, file: str | Path | None, step: str, reason: str) -> None:
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{step}: {reason}")


class Progress:
    """Step lines on ``stream`` (stderr) when it is not a terminal; silent otherwise, or when disabled."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        is_tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self.lines = (not is_tty) if enabled is None else enabled
        self._start = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def say(self, text: str) -> None:
        if self.lines:
            print(f"prepare [{self.elapsed_s:7.1f}s] {text}", file=self._stream, flush=True)

    @contextlib.contextmanager
    def step(self, what: str, file: str | Path | None = None) -> Iterator[None]:
        """Announce ``what``, time it, and turn any failure inside it into a PrepareError about ``file``."""
        started = time.monotonic()
        self.say(f"{what}: started" + (f" ({file})" if file else ""))
        try:
            yield
        except PrepareError:
            raise
        except Exception as exc:
            log.debug("%s failed", what, exc_info=True)
            self.say(f"{what}: failed after {time.monotonic() - started:.1f}s")
            hint = "" if isinstance(exc, (ValueError, OSError)) else f" ({DEBUG_HINT})"
            raise PrepareError(file, what, one_line(exc) + hint) from exc
        self.say(f"{what}: done in {time.monotonic() - started:.1f}s")
