"""The MySQL handshake on bytes: greetings and handshake responses read back as built, SSL
requests recognised, clients older than protocol 4.1 refused."""

from __future__ import annotations

import pytest

from dbmux.engines.mysql import handshake
from dbmux.engines.mysql.wire import SERVER_STATUS_AUTOCOMMIT, ProtocolViolation


def test_a_greeting_built_by_the_proxy_parses_back() -> None:
    greeting = handshake.Greeting(
        "10.11.6-MariaDB",
        7,
        bytes(range(33, 53)),
        handshake.PROXY_CAPABILITIES & ~handshake.CLIENT_LONG_PASSWORD,
        45,
        SERVER_STATUS_AUTOCOMMIT,
        "mysql_native_password",
    )
    assert handshake.parse_greeting(handshake.build_greeting(greeting)) == greeting


def test_a_handshake_response_carries_mariadb_extended_capabilities() -> None:
    caps = handshake.SERVER_BASE_CAPABILITIES & ~handshake.CLIENT_LONG_PASSWORD
    caps |= handshake.MARIADB_CLIENT_STMT_BULK_OPERATIONS
    payload = handshake.build_handshake_response(
        capabilities=caps,
        charset=45,
        user="app",
        auth_response=b"\x01" * 20,
        database="app",
        plugin="mysql_native_password",
    )
    parsed = handshake.parse_handshake_response(payload)
    assert (parsed.capabilities, parsed.user, parsed.database) == (caps, "app", "app")
    assert parsed.auth_response == b"\x01" * 20
    assert parsed.plugin == "mysql_native_password"


def test_an_ssl_request_is_recognised_and_pre_41_clients_are_refused() -> None:
    ssl = (handshake.CLIENT_PROTOCOL_41 | handshake.CLIENT_SSL).to_bytes(4, "little") + bytes(28)
    assert handshake.parse_handshake_response(ssl).ssl_request
    with pytest.raises(ProtocolViolation, match=r"4\.1"):
        handshake.parse_handshake_response(bytes(40))
