"""idle_client_timeout counts silence with nothing in flight, and nothing else: a client whose
query runs, whose result it is still reading, or who waits for a server connection is not
idle, however long that takes; a silent one is still told 57P01 and disconnected."""

from __future__ import annotations

import asyncio
import socket

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.engines.postgres.test_lifecycle import POOL_OF_ONE, connect, wait_until
from tests.pgraw import RawClient, query
from tests.slow_reader import IDLE, ROW, ROWS, pace


async def test_a_client_waiting_for_a_long_query_is_not_idle(start_proxy) -> None:
    """Without it a query running longer than idle_client_timeout ends with 57P01 and a
    closed connection, as if the client that waits for its answer had gone silent."""
    proxy = start_proxy(idle_client_timeout=IDLE)
    conn = await connect(proxy)
    try:
        assert await conn.fetchval("SELECT 1 FROM pg_sleep(3)") == 1
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


async def test_a_client_reading_a_long_result_slowly_is_not_idle_then_silence_is(
    start_proxy,
) -> None:
    """A client that reads a large result slowly sends nothing meanwhile; without the
    in-flight check it is cut off mid-result. Once it has it all and stays silent, it is
    disconnected with 57P01 as before."""
    proxy = start_proxy(idle_client_timeout=IDLE)
    async with await RawClient.connect(proxy.host, proxy.port) as raw:
        # A small receive buffer: the result waits in the proxy, not in our kernel.
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        await raw.send(query(f"SELECT repeat('x', {ROW}) FROM generate_series(1, {ROWS})"))
        start = asyncio.get_running_loop().time()
        rows = 0
        while (message := await raw.read_message()).kind != b"Z":
            assert message.kind in (b"T", b"D", b"C"), message
            rows += message.kind == b"D"
            await pace(start, rows / ROWS)
        assert rows == ROWS
        fields = await raw.expect_fatal("57P01", timeout=15)
        assert "idle_client_timeout" in fields["M"]


async def test_a_client_waiting_for_a_server_connection_is_not_idle(start_proxy) -> None:
    """A client queued for the only server connection while another's query runs sends
    nothing while it waits; without the check it is disconnected before it is served."""
    proxy = start_proxy(idle_client_timeout=IDLE, pool={**POOL_OF_ONE})
    holder, waiter = await connect(proxy), await connect(proxy)
    try:
        slow = asyncio.create_task(holder.fetchval("SELECT 1 FROM pg_sleep(3)"))
        await wait_until(lambda: proxy.pools.lent_count == 1)  # the holder's query runs
        assert await waiter.fetchval("SELECT 2") == 2
        assert await slow == 1
    finally:
        await holder.close()
        await waiter.close()


async def test_a_silent_client_is_still_disconnected_with_57P01(start_proxy) -> None:
    """The in-flight check must not keep a silent session alive, in a transaction or not."""
    proxy = start_proxy(idle_client_timeout=IDLE)
    async with await RawClient.connect(proxy.host, proxy.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        await raw.send(query("BEGIN; SELECT 1"))
        assert (await raw.read_until_ready())[-1].payload == b"T"
        fields = await raw.expect_fatal("57P01", timeout=15)
        assert "idle_client_timeout" in fields["M"]
