"""dbmux's own login to PostgreSQL servers: it trusts a server only after the server proved
it knows the password."""

from __future__ import annotations

import asyncio
import base64
import secrets

import pytest

from dbmux.auth.secrets import Credentials
from dbmux.engines.base import ServerError
from dbmux.engines.postgres import wire
from dbmux.engines.postgres.backend import open_server


async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A "server" that runs SCRAM up to its first message and then says AuthenticationOk
    without the final message, whose signature only the real server could compute."""
    length = int.from_bytes(await reader.readexactly(4), "big")
    await reader.readexactly(length - 4)  # the startup packet
    writer.write(wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    _, payload = await read_message(reader)
    _, first = wire.parse_sasl_initial(payload)
    client_nonce = first.decode().split("r=", 1)[1]
    salt = base64.b64encode(secrets.token_bytes(16)).decode()
    server_first = f"r={client_nonce}{secrets.token_hex(8)},s={salt},i=4096".encode()
    writer.write(wire.authentication(wire.AUTH_SASL_CONTINUE, server_first))
    await read_message(reader)  # the client's proof
    writer.write(wire.authentication(wire.AUTH_OK) + wire.ready_for_query())
    await writer.drain()
    await reader.read()


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind = await reader.readexactly(1)
    length = int.from_bytes(await reader.readexactly(4), "big")
    return kind, await reader.readexactly(length - 4)


async def test_authentication_ok_before_the_servers_scram_proof_is_refused() -> None:
    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServerError, match="without completing SCRAM") as refused:
            await asyncio.wait_for(
                open_server(
                    "127.0.0.1",
                    port,
                    Credentials("app", "secret"),
                    "app",
                    session_init=(),
                    read_limit=False,
                    prepared_capacity=1,
                ),
                30,
            )
        assert refused.value.code == "28000"
    finally:
        server.close()
