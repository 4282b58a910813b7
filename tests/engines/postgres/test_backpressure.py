"""A client that reads slowly makes dbmux stop reading its server, not buffer the result."""

from __future__ import annotations

import asyncio

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.pgraw import ProtocolFailure, RawClient, query

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
            if server is not None and not server.transport.is_reading():
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
        assert server.transport.is_reading()
    finally:
        client.abort()


EMPTY_QUERIES = query("") * 40_000  # 240 kB, each answered with a ReadyForQuery


async def test_a_client_that_never_reads_refusals_holds_a_bounded_buffer(start_proxy):
    """Refusals the proxy writes itself (here: borrow timeouts while another client holds
    the only server connection) ignore the server's backpressure: without backpressure of
    their own, a client that pipelines requests and never reads the answers grows the
    proxy's buffer for it by every read, without bound."""
    proxy = start_proxy(pool={"max_connections_percent": 2, "connection_borrow_timeout": 0.01})
    loop = asyncio.get_running_loop()
    # The pool's first login opens its connection, which may take longer than the borrow
    # timeout: that login fails, the connection stays for the next one.
    for _ in range(3):
        holder = await RawClient.connect(proxy.host, proxy.port)
        try:
            await holder.login(APP_USER, APP_PASSWORD, APP_DB)
            break
        except ProtocolFailure:
            holder.abort()
    async with holder, await RawClient.connect(proxy.host, proxy.port) as flooder:
        await holder.simple_query("BEGIN")
        await holder.simple_query("SELECT 1")  # the only server connection is the holder's
        await flooder.login(APP_USER, APP_PASSWORD, APP_DB)
        sent = 0
        try:
            while sent < 64 << 20:
                # The proxy stops reading us once its buffer for us is full: our kernel
                # buffers fill and sending waits.
                await asyncio.wait_for(loop.sock_sendall(flooder.sock, EMPTY_QUERIES), 2.0)
                sent += len(EMPTY_QUERIES)
        except TimeoutError:
            pass

        async def sizes() -> list[int]:
            clients = proxy.embedded.proxy().runtime.clients
            return [c.transport.get_write_buffer_size() for c in clients]

        assert max(proxy.embedded.call(sizes())) < 4 << 20
        await holder.simple_query("COMMIT")
        assert [m.kind for m in await holder.simple_query("SELECT 2")][-1] == b"Z"


async def test_replies_the_proxy_writes_itself_stop_a_client_that_never_reads(proxy):
    """A Parse of a name the session already uses is refused by the proxy itself (42P05),
    no server involved. A client that pipelines such requests and never reads must be
    stopped at the high-water mark, not answered into the proxy's memory."""
    from tests.pgraw import msg

    client = await RawClient.connect(proxy.host, proxy.port)
    bystander = None
    try:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        taken = msg(b"P", b"s1\0SELECT 1\0\0\0") + msg(b"S")
        await client.send(taken)
        assert [m.kind for m in await client.read_until_ready()] == [b"1", b"Z"]
        (session,) = proxy.embedded.proxy().runtime.clients
        burst = taken * 20_000  # 560 KB of requests, 2.6 MB of refusals if all answered
        sender = asyncio.create_task(_send_forever(client, burst))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while session.transport.is_reading():
            assert loop.time() < deadline, "the proxy kept reading a client that never reads"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert session.transport.get_write_buffer_size() < 1024 * 1024
        bystander = await RawClient.connect(proxy.host, proxy.port)
        await bystander.login(APP_USER, APP_PASSWORD, APP_DB)
        assert (await bystander.simple_query("SELECT 1"))[-1].kind == b"Z"
        sender.cancel()
    finally:
        client.abort()
        if bystander is not None:
            bystander.abort()


async def _send_forever(client: RawClient, burst: bytes) -> None:
    while True:
        await client.send(burst)
