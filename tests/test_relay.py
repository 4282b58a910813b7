"""The transport plumbing both engines share (dbmux.relay), seen from a client: a refused
client reads why it was refused, even when it kept sending after its login packet."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbmux.engines.mysql import handshake, wire
from dbmux.testing.certs import TestCA
from tests.mysql_fixtures import MY_DB, MY_USER
from tests.pgraw import startup_packet

CONNECTIONS = 30  # the race between a RST and the refusal is timing-dependent: try often
BURST = 48 * 1024  # sent right after the login packet, within the proxy's linger budget
CHUNK = 4096


def refusal_read_after_burst(
    address: tuple[str, int], login: Callable[[socket.socket], bytes]
) -> bytes:
    """Connect, send the login packet `login` returns and a burst of bytes behind it, then
    read everything the proxy says until it closes. A reset instead of a close raises."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(login(sock))
        try:
            for _ in range(BURST // CHUNK):
                sock.sendall(b"\0" * CHUNK)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy is gone already; what it said must still be readable
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_refused_postgresql_client_that_keeps_sending_still_reads_the_refusal(
    start_proxy: Any, tmp_path: Path
) -> None:
    """Unread bytes at close make the kernel send a RST, which can overtake the FATAL; the
    proxy shuts down its write side and drops what comes until the client closes."""
    proxy = start_proxy(tls=TestCA(tmp_path).issue("proxy").as_tls(), require_tls=True)
    startup = startup_packet({"user": "app", "database": "app"})
    for _ in range(CONNECTIONS):
        reply = refusal_read_after_burst((proxy.host, proxy.port), lambda _: startup)
        assert b"accepts TLS connections only" in reply


def test_a_refused_mysql_client_that_keeps_sending_still_reads_the_refusal(
    start_my_proxy: Any, tmp_path: Path
) -> None:
    proxy = start_my_proxy(tls=TestCA(tmp_path).issue("proxy").as_tls(), require_tls=True)

    def handshake_response(sock: socket.socket) -> bytes:
        greeting = b""
        while len(greeting) < 4 or len(greeting) < 4 + int.from_bytes(greeting[:3], "little"):
            greeting += sock.recv(65536)
        response = handshake.build_handshake_response(
            capabilities=handshake.SERVER_BASE_CAPABILITIES,
            charset=45,
            user=MY_USER,
            auth_response=b"",
            database=MY_DB,
            plugin="mysql_native_password",
        )
        return wire.packet(1, response)

    for _ in range(CONNECTIONS):
        reply = refusal_read_after_burst((proxy.host, proxy.port), handshake_response)
        assert (3159).to_bytes(2, "little") in reply
        assert b"insecure transport" in reply
