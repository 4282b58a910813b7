"""What a MySQL client may send before it has logged in: a handshake response is a few
hundred bytes, so a login packet is capped at a few KB, as PostgreSQL caps its startup
packet, instead of at the 16 MiB of a physical packet."""

from __future__ import annotations

import pytest

from dbmux.engines.mysql import wire
from tests.myraw import RawMy
from tests.mysql_fixtures import MyProxy


def error_of(payload: bytes) -> int:
    assert payload[0] == 0xFF, payload
    return int.from_bytes(payload[1:3], "little")


@pytest.mark.parametrize("length", [wire.MAX_LOGIN_PACKET + 1, (1 << 24) - 1])
async def test_a_handshake_response_longer_than_a_login_needs_is_refused_at_once(
    my_proxy: MyProxy, length: int
) -> None:
    """Without the cap the proxy waited for (and buffered) up to 16 MiB from each
    connection that had not even named its user; it must answer as soon as the header is
    in, with MySQL's error, and hang up."""
    async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
        await raw.packet()  # the greeting
        raw.send(length.to_bytes(3, "little") + b"\x01" + b"\0" * 100)
        _, reply = await raw.packet()
        assert error_of(reply) == wire.ER_NET_READ_ERROR[0]
        assert str(wire.MAX_LOGIN_PACKET).encode() in reply
        assert await raw.read_all() == b""
    assert my_proxy.metrics.client_protocol_errors.value == 1
