"""A client that reads slowly makes dbmux stop reading its server, not buffer the result."""

from __future__ import annotations

import asyncio

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.pgraw import RawClient, query

BIG_RESULT = "SELECT repeat('x', 1000) FROM generate_series(1, 200000)"  # about 200 MB


def lent_server(proxy):
    (pool,) = proxy.pools.pools.values()
    (server,) = pool.lent
    return server


async def test_slow_reader_pauses_the_server_instead_of_buffering(proxy):
    client = await RawClient.connect(proxy.host, proxy.port)
    try:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(query(BIG_RESULT))  # and then read nothing for a while

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            lent = proxy.pools.lent_count
            server = lent_server(proxy) if lent else None
            if server is not None and server.reading_paused:
                break
            assert loop.time() < deadline, "the proxy never paused the server connection"
            await asyncio.sleep(0.05)
        (session,) = proxy.embedded.proxy().runtime.clients
        buffered = session.transport.get_write_buffer_size()
        assert buffered < 4 * 1024 * 1024  # a few high-water marks, not 200 MB

        rows = 0
        while (reply := await client.read_message(timeout=60)).kind != b"Z":
            rows += reply.kind == b"D"
        assert rows == 200_000
        assert not server.reading_paused
    finally:
        client.abort()
