"""The supervisor-worker channel: asks are answered, failures and a lost peer become
PeerUnavailable (never a hang), and a message over the bound closes the channel."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from dbmux.engines.base import PeerUnavailable
from dbmux.workers.channel import MAX_MESSAGE, Channel

pytestmark = pytest.mark.timeout(30)


async def pair(handler: Any) -> tuple[Channel, Channel, asyncio.Event]:
    """(asking end, answering end with `handler`, set when the asking end sees it go)."""
    ours, theirs = socket.socketpair()
    lost = asyncio.Event()
    asking = await Channel.open(ours, lambda body: None, lost.set)
    answering = await Channel.open(theirs, handler)
    return asking, answering, lost


async def test_an_ask_gets_the_other_sides_answer_sync_or_async() -> None:
    async def slow(body: tuple[Any, ...]) -> Any:
        await asyncio.sleep(0.01)
        return ("slow", *body)

    asking, answering, _ = await pair(lambda body: body[0] * 2)
    assert await asking.ask(21) == 42
    answering.handler = slow
    answers = await asyncio.gather(*(asking.ask(n) for n in range(5)))
    assert answers == [("slow", n) for n in range(5)]


async def test_tells_arrive_in_order() -> None:
    seen: list[int] = []
    asking, _, _ = await pair(lambda body: seen.append(body[0]))
    for n in range(100):
        asking.tell(n)
    await asking.ask(-1)  # answered after every tell before it
    assert seen == [*range(100), -1]


async def test_a_failing_handler_is_a_peer_unavailable_for_the_asker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unavailable(body: tuple[Any, ...]) -> Any:
        raise PeerUnavailable("no proxy named 'x'")

    def broken(body: tuple[Any, ...]) -> Any:
        raise ZeroDivisionError("a bug")

    asking, answering, _ = await pair(unavailable)
    with pytest.raises(PeerUnavailable, match="no proxy named"):
        await asking.ask("peer")
    answering.handler = broken
    with pytest.raises(PeerUnavailable, match="ZeroDivisionError: a bug"):
        await asking.ask("peer")
    # A bug is logged where it happened, with its traceback (and not held against the test).
    bugs = [r for r in caplog.records if r.exc_info]
    assert [r.exc_info[0] for r in bugs if r.exc_info] == [ZeroDivisionError]
    caplog.clear()


async def test_a_lost_peer_fails_what_waits_and_what_is_asked_later() -> None:
    never = asyncio.Event()

    async def hang(body: tuple[Any, ...]) -> Any:
        await never.wait()

    asking, answering, lost = await pair(hang)
    waiting = asyncio.ensure_future(asking.ask("anything"))
    await asyncio.sleep(0.05)
    answering.close()
    with pytest.raises(PeerUnavailable):
        await waiting
    await lost.wait()
    with pytest.raises(PeerUnavailable):
        await asking.ask("again")


async def test_an_answer_that_takes_too_long_is_given_up() -> None:
    asking, _, _ = await pair(lambda body: asyncio.sleep(10))
    with pytest.raises(PeerUnavailable, match="no answer"):
        await asking.ask("slow", timeout=0.1)


async def test_a_message_over_the_bound_closes_the_channel() -> None:
    ours, theirs = socket.socketpair()
    lost = asyncio.Event()
    await Channel.open(theirs, lambda body: None, lost.set)
    ours.sendall(struct.pack("!I", MAX_MESSAGE + 1))
    await lost.wait()
    ours.close()
