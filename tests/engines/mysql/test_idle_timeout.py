"""idle_client_timeout counts silence with nothing in flight: a client reading a long result
slowly is not idle, however long that takes; once it has it all and stays silent, it is told
ERR 4031 and disconnected. (The cases both engines share: tests/test_session.py.)"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from dbmux.engines.mysql import scanners, wire
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy
from tests.slow_reader import IDLE, ROW, ROWS, pace


async def expect_timeout_error(raw: RawMy) -> None:
    """The next packet is ERR 4031 naming the setting (sequence id 0), then the socket closes."""
    seq, payload = await raw.packet()
    assert (seq, payload[0]) == (0, 0xFF), payload
    assert int.from_bytes(payload[1:3], "little") == wire.ER_CLIENT_INTERACTION_TIMEOUT[0]
    assert b"idle_client_timeout" in payload
    assert await raw.read_all() == b""


async def test_a_client_reading_a_long_result_slowly_is_not_idle_then_silence_is(
    start_my_proxy: Callable[..., MyProxy],
) -> None:
    """A client that reads a large result slowly sends nothing meanwhile; without the
    in-flight check it is cut off mid-result. Once it has it all and stays silent, it is
    disconnected with ERR 4031 as before."""
    proxy = start_my_proxy(idle_client_timeout=IDLE)
    async with await RawMy.connect(proxy.host, proxy.port) as raw:
        # A small receive buffer: the result waits in the proxy, not in our kernel.
        raw.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        _, ok = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert ok[0] == 0, ok
        raw.command(b"\x03SELECT REPEAT('x', %d) FROM seq_1_to_%d" % (ROW, ROWS))
        scanner = scanners.ResponseScanner(deprecate_eof=False)
        scanner.expect(wire.RESPONSE_RESULT)
        start = asyncio.get_running_loop().time()
        packets = 0
        while scanner.busy:
            seq, payload = await raw.packet()
            scanner.feed(wire.packet(seq, payload))
            packets += 1
            await pace(start, packets / ROWS)
        assert not scanner.failed
        assert packets > ROWS  # the rows, their column definition, the EOF packets
        await expect_timeout_error(raw)
