"""The in-flight byte budget: reservations before a read, refusal at once, FIFO waits, read timeouts."""

from __future__ import annotations

import asyncio
import time

import pytest

from rapidserve.server.admission import Admission
from rapidserve.server.errors import DeadlineExceeded, Overloaded

MB = 2**20


class Sender:
    """A message that arrives when the test says so; its size is what ``size_of`` reports."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.arrived = asyncio.Event()
        self.receiving = asyncio.Event()  # set once the admission started reading it

    async def receive(self) -> Sender:
        self.receiving.set()
        await self.arrived.wait()
        return self


def size_of(sender: Sender) -> int:
    return sender.size


async def test_reads_start_while_reservations_fit_and_later_ones_wait_their_turn() -> None:
    # each read reserves two messages (40 MB): gRPC's buffers and its copy into Python
    admission = Admission(budget_bytes=90 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
    senders = [Sender(10 * MB) for _ in range(4)]
    reads = [asyncio.create_task(admission.read(s.receive, size_of, None)) for s in senders]
    await asyncio.wait_for(asyncio.gather(senders[0].receiving.wait(), senders[1].receiving.wait()), 5)
    await asyncio.sleep(0)
    assert admission.reading == 2  # 2 x 40 MB; a third would not fit in 90 MB
    assert not senders[2].receiving.is_set()
    senders[0].arrived.set()
    message, held = await reads[0]
    assert (message, held) == (senders[0], 10 * MB)
    # 10 MB held + 2 reads x 40 MB = 90 MB: the third read may start now, the fourth still waits
    await asyncio.wait_for(senders[2].receiving.wait(), 5)
    assert not senders[3].receiving.is_set()
    for sender in senders[1:]:
        sender.arrived.set()
    results = await asyncio.gather(*reads[1:])
    assert [held for _, held in results] == [10 * MB] * 3
    assert admission.held == 40 * MB and admission.reading == 0
    for _, held in [(None, 10 * MB), *results]:
        admission.release(held)
    assert admission.held == 0


async def test_a_request_that_cannot_fit_beside_the_held_bytes_is_refused_before_it_is_read() -> None:
    admission = Admission(budget_bytes=100 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
    assert admission.admit(70 * MB)
    sender = Sender(MB)
    with pytest.raises(Overloaded, match="--max-inflight-bytes"):
        await admission.read(sender.receive, size_of, None)
    assert not sender.receiving.is_set()  # its body was never asked for
    admission.release(70 * MB)
    sender.arrived.set()
    assert (await admission.read(sender.receive, size_of, None))[1] == MB


async def test_waiters_that_can_no_longer_fit_are_refused_when_the_budget_fills_up() -> None:
    admission = Admission(budget_bytes=80 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
    big = [Sender(20 * MB), Sender(20 * MB)]
    reads = [asyncio.create_task(admission.read(s.receive, size_of, None)) for s in big]
    await asyncio.wait_for(asyncio.gather(*(s.receiving.wait() for s in big)), 5)
    waiter = Sender(MB)
    waiting = asyncio.create_task(admission.read(waiter.receive, size_of, None))
    await asyncio.sleep(0)
    assert admission.admit(5 * MB)  # e.g. a stream's message
    for sender in big:
        sender.arrived.set()
    await asyncio.gather(*reads)  # 5 + 20 + 20 held: one more read (40 MB) does not fit
    with pytest.raises(Overloaded):
        await waiting
    assert not waiter.receiving.is_set()
    assert admission.reading == 0


async def test_a_message_that_does_not_arrive_in_time_ends_deadline_exceeded_and_frees_its_slot() -> None:
    admission = Admission(budget_bytes=100 * MB, max_message_bytes=20 * MB, read_timeout_s=0.05)
    never = Sender(MB)
    with pytest.raises(DeadlineExceeded, match="did not arrive in time"):
        await admission.read(never.receive, size_of, None)
    assert admission.reading == 0


async def test_a_waiting_call_gives_up_at_its_deadline_and_leaves_no_reservation() -> None:
    admission = Admission(budget_bytes=80 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
    slow = [Sender(MB), Sender(MB)]
    reads = [asyncio.create_task(admission.read(s.receive, size_of, None)) for s in slow]
    await asyncio.wait_for(asyncio.gather(*(s.receiving.wait() for s in slow)), 5)
    late = Sender(MB)
    with pytest.raises(DeadlineExceeded, match="waited for room"):
        await admission.read(late.receive, size_of, time.monotonic() + 0.05)
    assert not late.receiving.is_set()
    patient = Admission(budget_bytes=80 * MB, max_message_bytes=20 * MB, read_timeout_s=0.05)
    patient._sweep_s = 0.5  # the held reads are cut off later than the third one's wait ends, however busy
    slow_too = [Sender(MB), Sender(MB)]
    holding = [asyncio.create_task(patient.read(s.receive, size_of, None)) for s in slow_too]
    await asyncio.wait_for(asyncio.gather(*(s.receiving.wait() for s in slow_too)), 5)
    with pytest.raises(Overloaded, match="being read"):  # no deadline: the wait is bounded all the same
        await patient.read(Sender(MB).receive, size_of, None)
    for task in holding:
        with pytest.raises(DeadlineExceeded):
            await task
    assert admission.reading == 2
    for sender in slow:
        sender.arrived.set()
    await asyncio.gather(*reads)
    assert admission.reading == 0 and admission.held == 2 * MB


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    admission = Admission(budget_bytes=80 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
    first, second = Sender(MB), Sender(MB)
    reads = [asyncio.create_task(admission.read(s.receive, size_of, None)) for s in (first, second)]
    await asyncio.wait_for(asyncio.gather(first.receiving.wait(), second.receiving.wait()), 5)
    third = Sender(MB)
    waiting = asyncio.create_task(admission.read(third.receive, size_of, None))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    first.arrived.set()
    second.arrived.set()
    await asyncio.gather(*reads)
    assert admission.reading == 0
    fourth = Sender(MB)
    fourth.arrived.set()
    assert (await admission.read(fourth.receive, size_of, None))[1] == MB


def test_a_budget_that_cannot_take_one_message_is_refused() -> None:
    with pytest.raises(ValueError, match="at least twice the message limit"):
        Admission(budget_bytes=30 * MB, max_message_bytes=20 * MB, read_timeout_s=30)
