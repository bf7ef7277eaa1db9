"""Admission by bytes: how much request data the server holds at once, across all calls and models.

gRPC has no content length: a request's size is known only once its message has been read, and while
it is read gRPC buffers it, then copies it into Python. So a unary call reserves room for two of the
largest messages the server accepts before it reads (the buffers and the copy), and holds its real
size from then until it is answered:

- a call whose message could not fit beside the bytes already held is refused at once
  (``Overloaded``, RESOURCE_EXHAUSTED), before its body is read;
- a call that would fit, but only once reads in progress end, waits for them (FIFO), at most the read
  timeout or until its deadline (then DEADLINE_EXCEEDED);
- a message must arrive within the read timeout of its read starting, so a slow sender cannot hold a
  reservation for long.

HTTP knows a body's length before reading it: its reads reserve what the body can hold instead
(``read(..., reserve=...)``).

Stream messages cannot be refused unread (the answer needs their ``id``): each stream reads one
message at a time and admits it by its real size, answering RESOURCE_EXHAUSTED when it does not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rapidserve.server.errors import DeadlineExceeded, Overloaded

__all__ = ["Admission"]

T = TypeVar("T")


class Admission:
    def __init__(
        self, budget_bytes: int, max_message_bytes: int, read_timeout_s: float, name: str = "--max-inflight-bytes"
    ) -> None:
        if budget_bytes < 2 * max_message_bytes:
            raise ValueError(
                f"an in-flight budget of {budget_bytes} bytes cannot take one message of {max_message_bytes} "
                "bytes and gRPC's copy of it: it must be at least twice the message limit"
            )
        self.name = name  # what the messages call this budget
        self.budget = budget_bytes
        self.reserve = 2 * max_message_bytes  # per read in progress: gRPC's buffers, and its copy into Python
        self.read_timeout_s = read_timeout_s
        self.held = 0  # bytes of admitted requests not yet answered
        self.reading = 0  # reads in progress
        self.reserved = 0  # bytes the reads in progress reserve (``reserve`` each, unless told less)
        self._waiting: deque[tuple[asyncio.Future[bool], int]] = deque()
        self._reads: dict[asyncio.Task[Any], float] = {}  # reads in progress: when each gives up
        self._late: set[asyncio.Task[Any]] = set()  # reads the sweep cancelled
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_s = min(max(read_timeout_s / 4, 0.01), 1.0)

    def _room_to_read(self, reserve: int) -> bool:
        return self.held + self.reserved + reserve <= self.budget

    def _could_ever_fit(self, reserve: int) -> bool:
        """Whether a read could start once the reads in progress end (else: refuse at once)."""
        return self.held + reserve <= self.budget

    def refusal(self) -> Overloaded:
        return Overloaded(
            f"the server holds {self.held} bytes of requests and admits {self.budget} at once "
            f"({self.name}); a new request could need {self.reserve}; retry later"
        )

    async def read(
        self,
        receive: Callable[[], Awaitable[T]],
        size_of: Callable[[T], int],
        deadline: float | None,
        reserve: int | None = None,
    ) -> tuple[T, int]:
        """Receive one unary message within the budget; returns it and the bytes it holds, which the
        caller gives back with ``release`` once the request is answered. (gRPC itself ends the call
        when the client's deadline passes.) ``reserve``: the most the read can hold, where the caller
        knows it (HTTP's declared length); by default ``self.reserve``."""
        reserve = self.reserve if reserve is None else min(reserve, self.budget)
        if not self._could_ever_fit(reserve):
            raise self.refusal()
        if self._waiting or not self._room_to_read(reserve):
            await self._wait_turn(deadline, reserve)  # then a slot is ours
        else:
            self.reading += 1
            self.reserved += reserve
        task = asyncio.current_task()
        assert task is not None
        # a sweep cancels reads past their time: cheaper than a timer each
        self._reads[task] = time.monotonic() + self.read_timeout_s
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)
        try:
            message = await receive()
            size = size_of(message)
            if not self.admit(size):  # (stream messages admitted meanwhile may have used the room)
                raise self.refusal()
        except asyncio.CancelledError:
            if task not in self._late:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            raise self._late_error() from None
        finally:
            del self._reads[task]
            self._late.discard(task)
            self.reading -= 1  # the reservation goes only once the real size is held
            self.reserved -= reserve
            if self._waiting:
                self._wake()
        return message, size

    def _sweep(self) -> None:
        """Cancel the reads whose message has not arrived in time."""
        now = time.monotonic()
        for task, give_up in self._reads.items():
            if give_up <= now and task not in self._late:
                self._late.add(task)
                task.cancel()
        self._sweeper = None
        if self._reads:
            self._sweeper = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)

    def admit(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit in the budget (stream messages, already read)."""
        if self.held + size > self.budget:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size
        if self._waiting:
            self._wake()

    async def _wait_turn(self, deadline: float | None, reserve: int) -> None:
        """Wait for a read slot, at most the read timeout and until ``deadline``."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((waiter, reserve))
        give_up = time.monotonic() + self.read_timeout_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        try:
            granted = await asyncio.wait_for(asyncio.shield(waiter), max(give_up - time.monotonic(), 0.001))
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.reading -= 1  # the slot was handed over just as this call gave up
                self.reserved -= reserve
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove((waiter, reserve))
            self._wake()
            if isinstance(exc, asyncio.TimeoutError):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded("the deadline passed while the request waited for room to be read") from None
                raise Overloaded(
                    f"other requests are being read and the server admits {self.budget} bytes at once "
                    f"({self.name}); retry later"
                ) from None
            raise
        if not granted:
            raise self.refusal()

    def _wake(self) -> None:
        """Hand read slots to waiters in arrival order; refuse those that cannot fit at all."""
        while self._waiting:
            first, reserve = self._waiting[0]
            if first.done():
                self._waiting.popleft()
            elif not self._could_ever_fit(reserve):
                self._waiting.popleft()
                first.set_result(False)
            elif self._room_to_read(reserve):
                self._waiting.popleft()
                self.reading += 1
                self.reserved += reserve
                first.set_result(True)
            else:
                return  # room comes back when a read ends or a request is answered

    @staticmethod
    def _late_error() -> Exception:
        return DeadlineExceeded(
            "the request's message did not arrive in time (--grpc-request-read-timeout-secs); "
            "the client sent its headers but not its body"
        )
