"""Messages the proxy must read whole (a client's Query, a server's ErrorResponse) are
reassembled in linear time, so one huge message never stalls the other clients."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.pgraw import RawClient, query

HUGE = 256 << 20
PIECE = 64 << 10


async def _bystander(proxy, done: asyncio.Event) -> int:
    """Transactions another client completes until `done`."""
    conn = await asyncpg.connect(proxy.url())
    completed = 0
    try:
        while not done.is_set():
            assert await conn.fetchval("SELECT $1::int + 1", completed) == completed + 1
            completed += 1
    finally:
        await conn.close()
    return completed


async def test_a_256_mib_query_streamed_in_pieces_does_not_stall_other_clients(start_proxy):
    """Re-joining the held-back pieces on every read made a 256 MiB Query cost minutes of
    event-loop time (quadratic), during which no other client got an answer."""
    proxy = start_proxy(pool={"max_connections_percent": 10})
    hog = await RawClient.connect(proxy.host, proxy.port)
    await hog.login(APP_USER, APP_PASSWORD, APP_DB)
    done = asyncio.Event()
    bystander = asyncio.create_task(_bystander(proxy, done))
    try:
        message = query("SELECT length('" + "x" * HUGE + "')")
        sent_during = []
        async with asyncio.timeout(240):
            for at in range(0, len(message), PIECE):
                await hog.send(message[at : at + PIECE])
                if at % (32 << 20) == 0:
                    await asyncio.sleep(0.01)  # let the bystander's answers in
                    sent_during.append(at)
            replies = await hog.read_until_ready(timeout=120)
        assert [m.kind for m in replies][-3:] == [b"D", b"C", b"Z"]
        done.set()
        completed = await bystander
        assert completed >= len(sent_during)
    finally:
        done.set()
        await asyncio.gather(bystander, return_exceptions=True)
        hog.abort()


async def test_a_huge_error_from_the_server_does_not_stall_other_clients(start_proxy):
    """A server's ErrorResponse is read whole (a FATAL one is kept from the client): a
    32 MB error message arrives in hundreds of pieces and must be joined once."""
    proxy = start_proxy(pool={"max_connections_percent": 10})
    done = asyncio.Event()
    bystander = asyncio.create_task(_bystander(proxy, done))
    try:
        conn = await asyncpg.connect(proxy.url())
        try:
            async with asyncio.timeout(240):
                try:
                    await conn.fetchval("SELECT repeat('x', 32000000)::int")
                    raise AssertionError("the cast cannot succeed")
                except asyncpg.InvalidTextRepresentationError as error:
                    assert len(str(error)) > 32_000_000
                assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        done.set()
        assert await bystander > 0
    finally:
        done.set()
        await asyncio.gather(bystander, return_exceptions=True)
