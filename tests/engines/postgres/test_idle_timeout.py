"""idle_client_timeout counts silence with nothing in flight: a client reading a long result
slowly is not idle, however long that takes; once it has it all and stays silent, it is told
57P01 and disconnected. (The cases both engines share: tests/test_session.py.)"""

from __future__ import annotations

import asyncio
import socket

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.pgraw import RawClient, query
from tests.slow_reader import IDLE, ROW, ROWS, pace


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
