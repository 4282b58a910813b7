"""Backpressure on what the proxy writes to a MySQL client: a client that sends requests
and never reads their answers must not make the proxy buffer those answers without bound,
whether a server wrote them or the proxy itself did."""

from __future__ import annotations

import asyncio
import contextlib

from dbmux.engines.mysql import wire
from tests.engines.mysql.test_bad_input import assert_serves_a_good_client, bystander, logged_in
from tests.myraw import WAIT
from tests.mysql_fixtures import MyProxy

__all__ = ["bystander"]  # the fixture, used by name

PING = wire.packet(0, bytes((wire.COM_PING,)))
BATCH = PING * 20_000  # 100 kB of requests, 220 kB of answers
MAX_SENT = 40 << 20  # far more answers than the kernel's socket buffers hold
BOUND = 4 << 20  # the proxy's buffer for one client: its high-water mark plus one read's answers


def buffered_for_clients(proxy: MyProxy) -> list[int]:
    """Bytes the proxy holds in its transports for each logged-in client, read on its loop."""

    async def sizes() -> list[int]:
        clients = proxy.embedded.proxy().runtime.clients
        return [c.transport.get_write_buffer_size() for c in clients if c.transport]

    return proxy.embedded.call(sizes())


async def test_a_client_that_pipelines_pings_and_never_reads_holds_a_bounded_buffer(
    my_proxy: MyProxy, bystander
) -> None:
    """COM_PING is answered by the proxy itself: without its own backpressure, each read
    of pings from a client that never reads the answers adds 2.2 times its size to the
    proxy's memory, until the process runs out of it."""
    async with await logged_in(my_proxy) as raw:
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < MAX_SENT:
                raw.send(BATCH)
                sent += len(BATCH)
                # The proxy stops reading us once its buffer for us is full: our kernel
                # buffers fill and drain() waits.
                await asyncio.wait_for(raw.writer.drain(), 2.0)
        assert max(buffered_for_clients(my_proxy)) < BOUND
        await assert_serves_a_good_client(my_proxy)
        # The answers were only held back: reading them lets the proxy go on, to the last.
        first = await raw.response(wire.RESPONSE_SIMPLE)
        assert first[0][:1] == b"\0"
        answer = len(wire.packet(1, first[0]))
        left = (sent // len(PING) - 1) * answer
        while left:
            left -= len(await asyncio.wait_for(raw.reader.read(min(left, 1 << 20)), WAIT))
        assert any(p.endswith(b"42") for p in await raw.query("SELECT 40 + 2"))
