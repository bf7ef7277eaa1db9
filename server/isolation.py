"""Fault isolation: a failing batch's errors stay with the requests that cause them, at a bounded cost.

When an instance raises on a batch of several requests, the batch is run again in halves on the same
instance (a failing half in halves again), so only the requests that fail on their own get the error.
A caller sees one line naming the model, the exception and a reference; the log keeps the rest under
that reference. An instance that takes requests unmerged (``PerRequest``, a Python model) answers
each request on its own, errors included; only a run that raises (``execute`` itself failed) is split.

Two limits keep one caller from costing everyone else much:

- Engine runs. Isolating every request of a failing batch of N takes up to 2N-2 runs more, and a caller
  could poison batch after batch. Reruns are paid from a budget per model: it starts at
  ``RERUN_RESERVE`` runs, every batch the model runs adds ``RERUNS_PER_BATCH`` (up to the reserve
  again), and every split of a failing part spends two. A part the budget cannot split fails as a
  whole with its own error, as the batch would without isolation. So reruns never add more than half
  to a model's engine runs (plus the reserve, which is also the most one batch can take), while the
  occasional failure of a healthy model is isolated in full. One counter bounds both one batch and a
  stream of them: a cap per batch alone would let a caller make every batch cost that cap again, and
  skipping isolation after a share of recent batches needed it would leave one batch unbounded.
- The log. Every failure is logged on one line with its reference, but only the first
  ``TRACEBACKS_PER_WINDOW`` in each ``LOG_WINDOW_S`` with their traceback; how many went without is
  logged when the window has passed (with the next failure) or when the model unloads.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve.engines.base import EngineInputError
from rapidserve.server.errors import EngineError, InvalidRequest, RapidServeError

__all__ = [
    "LOG_WINDOW_S",
    "RERUNS_PER_BATCH",
    "RERUN_RESERVE",
    "TRACEBACKS_PER_WINDOW",
    "Answers",
    "Arrays",
    "BatchRunner",
    "FaultIsolation",
    "Instance",
    "Isolated",
    "Part",
    "PerRequest",
    "Ran",
]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
BatchRunner = Callable[[Arrays, Sequence[str]], Arrays]
Answers = list[Arrays | Exception]  # a ``PerRequest`` run's outputs or exception, one per request


@dataclass(frozen=True, slots=True)
class PerRequest:
    """An instance that takes a batch's requests unmerged (a list of inputs dicts) and answers each on
    its own: its outputs, or the exception that request alone gets (``Engine.infer_requests``)."""

    run: Callable[[list[Arrays], Sequence[str]], Answers]


Instance = BatchRunner | PerRequest
# a run's outputs (one batch's, or a PerRequest's answers), ns spent merging its inputs, ns in the instance
Ran = tuple[Arrays | Answers, int, int]

RERUN_RESERVE = 32  # reruns a model may spend at once (and on one batch)
RERUNS_PER_BATCH = 0.5  # reruns each batch run adds to the budget
TRACEBACKS_PER_WINDOW = 3  # failures per model logged with their traceback...
LOG_WINDOW_S = 1.0  # ...in each window of this length
ERROR_TEXT_MAX = 200  # characters of an engine error a caller sees (one line; the log has the rest)
INPUT_ERROR_TEXT_MAX = 1000  # an EngineInputError is written for the caller, and may list what fits
LOG_TEXT_MAX = 500  # characters of an exception on a log line without its traceback
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[\w.~+-]+(?:/[\w.~+@-]*)+")


@dataclass(slots=True)
class Part:
    """Requests ``batch[start:stop]`` of a failed batch, run again: their outputs or their error (once
    through ``FaultIsolation.answers``, the error their callers get)."""

    start: int
    stop: int
    result: Arrays | Answers | Exception
    input_ns: int = 0
    infer_ns: int = 0


@dataclass(slots=True)
class Isolated:
    """A batch of several requests that failed with ``error``, and the parts it ended in after ``reruns`` runs."""

    error: Exception
    parts: list[Part]
    reruns: int


class FaultIsolation:
    """One model's fault isolation. ``run`` executes a batch where the batcher runs it (an instance's
    thread, or the event loop); ``caller_error`` and ``answers`` turn failures into what callers get,
    and log them, on the event loop. The limits are the module's constants unless given."""

    def __init__(
        self,
        name: str,
        *,
        reserve: int = RERUN_RESERVE,
        reruns_per_batch: float = RERUNS_PER_BATCH,
        tracebacks: int = TRACEBACKS_PER_WINDOW,
        window_s: float = LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._reserve = reserve
        self._per_batch = reruns_per_batch
        self._budget = float(reserve)
        self._batches = itertools.count(1)  # next() numbers batches atomically, from any thread
        self._paid = 0  # batches whose share is in the budget
        self._lock = threading.Lock()  # the budget: a model's instances may fail at once
        self._tracebacks = tracebacks
        self._window_s = window_s
        self._clock = clock
        self._window_end = -math.inf
        self._shown = 0
        self._hidden = 0

    # -- where the batch runs --------------------------------------------------------------------

    def run(self, instance: Instance, inputs: list[Arrays], outputs: Sequence[str]) -> Ran | Isolated:
        """Run the requests' inputs as one batch. When a batch of several fails, it is run again in
        parts as far as the budget pays; a single request's exception is raised."""
        number = next(self._batches)
        try:
            return _run(instance, inputs, outputs)
        except Exception as exc:
            if len(inputs) == 1:
                raise
            with self._lock:
                if number > self._paid:
                    self._budget = min(self._reserve, self._budget + self._per_batch * (number - self._paid))
                    self._paid = number
            parts: list[Part] = []
            reruns = self._split(instance, inputs, outputs, 0, len(inputs), exc, parts)
            return Isolated(exc, parts, reruns)

    def _split(
        self,
        instance: Instance,
        inputs: list[Arrays],
        outputs: Sequence[str],
        start: int,
        stop: int,
        error: Exception,
        parts: list[Part],
    ) -> int:
        """Requests ``start:stop`` failed together with ``error``: run both halves again if the budget
        pays for them, and split a failing half again, down to single requests, whose errors are their
        own. Appends the parts in request order; returns the runs made."""
        if stop - start == 1 or not self._spend(2):
            parts.append(Part(start, stop, error))
            return 0
        runs = 2
        middle = (start + stop) // 2
        for low, high in ((start, middle), (middle, stop)):
            try:
                result, input_ns, infer_ns = _run(instance, inputs[low:high], outputs)
            except Exception as exc:
                runs += self._split(instance, inputs, outputs, low, high, exc, parts)
            else:
                parts.append(Part(low, high, result, input_ns, infer_ns))
        return runs

    def _spend(self, runs: int) -> bool:
        with self._lock:
            if self._budget < runs:
                return False
            self._budget -= runs
            return True

    # -- on the event loop -----------------------------------------------------------------------

    def caller_error(self, exc: Exception) -> RapidServeError:
        """What a caller sees of an instance's exception: one line. An engine failure is logged under
        a reference that the caller's message gives (with its traceback, within the limit)."""
        if isinstance(exc, EngineInputError):
            return InvalidRequest(f"model '{self._name}': {_one_line(exc, INPUT_ERROR_TEXT_MAX)}")
        reference = secrets.token_hex(4)
        if self._traceback_allowed():
            log.error("model '%s' failed (reference %s)", self._name, reference, exc_info=exc)
        else:
            log.error(
                "model '%s' failed (reference %s): %s: %s [traceback not logged: more than %d in %g s]",
                self._name, reference, type(exc).__name__, _one_line(exc, LOG_TEXT_MAX, paths=True),
                self._tracebacks, self._window_s,
            )  # fmt: skip
        head = f"model '{self._name}' failed: {type(exc).__name__}"
        tail = f" (reference {reference} in the server log)"
        detail = _one_line(exc, ERROR_TEXT_MAX - len(head) - len(tail) - 2)
        return EngineError(f"{head}: {detail}{tail}" if detail else head + tail)

    def answers(self, isolated: Isolated) -> list[Part]:
        """The parts of an isolated batch, each error replaced by what its callers get (one reference per
        distinct error); logs one line on the batch."""
        errors: dict[tuple[type[Exception], str], RapidServeError] = {}
        alone = together = requests = 0
        for part in isolated.parts:
            requests += part.stop - part.start
            if isinstance(part.result, Exception):
                if part.stop - part.start == 1:
                    alone += 1
                else:
                    together += part.stop - part.start
                key = (type(part.result), str(part.result))
                if key not in errors:
                    errors[key] = self.caller_error(part.result)
                part.result = errors[key]
        if isolated.reruns:
            outcome = f"run again in parts ({isolated.reruns} runs), {alone} failed on their own"
            if together:
                outcome += f", {together} together when the model's rerun budget ran out"
        else:
            outcome = "not run again in parts: the model's rerun budget is spent"
        log.warning(
            "model '%s': a batch of %d requests failed (%s: %s); %s",
            self._name, requests, type(isolated.error).__name__, _one_line(isolated.error, ERROR_TEXT_MAX), outcome,
        )  # fmt: skip
        return isolated.parts

    def _traceback_allowed(self) -> bool:
        now = self._clock()
        if now >= self._window_end:
            self.flush()
            self._window_end, self._shown = now + self._window_s, 0
        if self._shown < self._tracebacks:
            self._shown += 1
            return True
        self._hidden += 1
        return False

    def flush(self) -> None:
        """Log how many failures of the last window went without their traceback, if any did."""
        if self._hidden:
            log.warning(
                "model '%s': %d more failures logged without their traceback (at most %d in %g s)",
                self._name, self._hidden, self._tracebacks, self._window_s,
            )  # fmt: skip
            self._hidden = 0


def _run(instance: Instance, inputs: list[Arrays], outputs: Sequence[str]) -> Ran:
    """Concatenate the requests along dim 0 (no copy for a single request) and run the instance; a
    ``PerRequest`` instance gets them as they are."""
    start = time.monotonic_ns()
    if isinstance(instance, PerRequest):
        answers = instance.run(inputs, outputs)
        return answers, 0, time.monotonic_ns() - start
    if len(inputs) == 1:
        merged = inputs[0]
    else:
        merged = {name: np.concatenate([request[name] for request in inputs]) for name in inputs[0]}
    ready = time.monotonic_ns()
    result = instance(merged, outputs)
    return result, ready - start, time.monotonic_ns() - ready


def _one_line(exc: BaseException, limit: int, paths: bool = False) -> str:
    """An exception's message on one line: its last non-empty line (a traceback or an engine's dump
    ends with the error itself), whitespace collapsed, absolute paths hidden unless ``paths`` (for the
    log), at most ``limit`` characters."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[-1].split()) if lines else ""
    if not paths:
        text = _ABSOLUTE_PATH.sub("<path>", text)
    if limit <= 0:
        return ""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
