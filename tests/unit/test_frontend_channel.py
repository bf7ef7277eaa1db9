"""The control channel between the engine and a front end, over a real socket pair: what one loop turn
sends arrives in order as one frame, and a closed peer is ChannelClosed, never a hang."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from rapidserve.server.frontend.channel import Channel, ChannelClosed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ends = (await Channel.open(left), await Channel.open(right))
    yield ends
    for end in ends:
        end.close()


async def next_turn() -> None:
    """Let the loop run the callbacks queued so far (the channel flushes in a callback of its own)."""
    await asyncio.sleep(0)


async def test_what_one_loop_turn_sends_arrives_as_one_frame_in_order(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    for i in range(50):
        a.send(("infer", i, b"x" * i))
    assert await b.receive() == [("infer", i, b"x" * i) for i in range(50)]


async def test_many_turns_arrive_as_one_frame_each_in_order(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    sizes = [1, 3, 1, 7, 2] * 20
    sent = 0
    for size in sizes:
        for _ in range(size):
            a.send(sent)
            sent += 1
        await next_turn()
        await a.drain()
    frames = [await b.receive() for _ in sizes]
    assert [len(frame) for frame in frames] == sizes
    assert [m for frame in frames for m in frame] == list(range(sent))


async def test_both_directions_at_once_and_a_frame_far_larger_than_the_read_buffer(
    pair: tuple[Channel, Channel],
) -> None:
    a, b = pair
    big = bytes(range(256)) * 20_000  # 5 MB: several reads make one frame
    a.send(("big", big))
    b.send(("small",))
    got_b, got_a = await asyncio.gather(b.receive(), a.receive())
    assert got_b == [("big", big)] and got_a == [("small",)]


async def test_serve_hands_each_message_over_and_raises_channel_closed_when_the_peer_closes(
    pair: tuple[Channel, Channel],
) -> None:
    a, b = pair
    seen: list[int] = []
    serving = asyncio.create_task(b.serve(seen.append))
    for i in range(10):
        a.send(i)
        if i % 3 == 0:
            await next_turn()
    await a.drain()
    a.close()
    with pytest.raises(ChannelClosed):
        await serving
    assert seen == list(range(10))  # everything sent before the close was handed over first
    assert b.closed


async def test_a_peer_that_dies_mid_frame_is_channel_closed() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.open(right)
    left.sendall((1000).to_bytes(8, "little") + b"only part of it")
    left.close()
    with pytest.raises(ChannelClosed):
        await channel.receive()
    channel.send(("late",))  # sending on a closed channel drops the message rather than raising
    channel.close()


async def test_receive_after_the_peer_closed_with_nothing_sent_is_channel_closed(
    pair: tuple[Channel, Channel],
) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ChannelClosed):
        await b.receive()
    with pytest.raises(ChannelClosed):
        await b.receive()


async def test_a_message_that_may_wait_rides_with_the_next_frame_in_order(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.later(("free", 1))
    await next_turn()
    a.later(("free", 2))
    a.send(("infer", 3))  # the next frame takes the waiting ones along, in the order they were sent
    assert await b.receive() == [("free", 1), ("free", 2), ("infer", 3)]


async def test_a_message_that_may_wait_goes_alone_when_nothing_else_is_sent(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.later(("free", 1))
    assert await asyncio.wait_for(b.receive(), 10) == [("free", 1)]


async def test_a_message_whose_handling_fails_does_not_stop_the_others(
    pair: tuple[Channel, Channel], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    seen: list[int] = []

    def handle(message: tuple[str, int]) -> None:
        if message[1] == 2:
            raise ValueError("a bug in one message's handling")
        seen.append(message[1])

    serving = asyncio.create_task(b.serve(handle))
    for i in range(5):
        a.send(("infer", i))  # one frame: the failure is in the middle of it
    await next_turn()
    a.close()
    with pytest.raises(ChannelClosed):
        await serving
    assert seen == [0, 1, 3, 4]
    assert "control message 'infer' failed" in caplog.text
