"""A raw MySQL client for tests that must send exactly the bytes a driver would not."""

from __future__ import annotations

import asyncio

from dbmux.auth.mysql import native_scramble
from dbmux.engines.mysql import handshake, scanners, wire

WAIT = 10.0
CLIENT_CAPABILITIES = (
    handshake.CLIENT_PROTOCOL_41
    | handshake.CLIENT_SECURE_CONNECTION
    | handshake.CLIENT_PLUGIN_AUTH
    | handshake.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | handshake.CLIENT_CONNECT_WITH_DB
    | handshake.CLIENT_TRANSACTIONS
    | handshake.CLIENT_LONG_PASSWORD
    | handshake.CLIENT_MULTI_RESULTS
)


class RawMy:
    """One connection, spoken packet by packet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting: handshake.Greeting | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> RawMy:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def packet(self) -> tuple[int, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(4), WAIT)
        length = int.from_bytes(header[:3], "little")
        return header[3], await asyncio.wait_for(self.reader.readexactly(length), WAIT)

    async def login(
        self, user: str, password: str, database: str, capabilities: int = CLIENT_CAPABILITIES
    ) -> tuple[int, bytes]:
        """Greeting, handshake response, and the server's answer (OK or ERR)."""
        _, payload = await self.packet()
        self.greeting = handshake.parse_greeting(payload)
        response = handshake.build_handshake_response(
            capabilities=capabilities,
            charset=45,
            user=user,
            auth_response=native_scramble(password, self.greeting.nonce),
            database=database,
            plugin="mysql_native_password",
        )
        self.send(wire.packet(1, response))
        return await self.packet()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def command(self, payload: bytes) -> None:
        self.send(wire.packet(0, payload))

    async def response(self, kind: int = wire.RESPONSE_RESULT) -> list[bytes]:
        """The payloads of one whole response, found with the proxy's own scanner."""
        scanner = scanners.ResponseScanner(deprecate_eof=False)
        scanner.expect(kind)
        payloads = []
        while scanner.busy:
            seq, payload = await self.packet()
            payloads.append(payload)
            scanner.feed(wire.packet(seq, payload))
        return payloads

    async def query(self, sql: str) -> list[bytes]:
        self.command(b"\x03" + sql.encode())
        return await self.response()

    async def read_all(self, timeout: float = WAIT) -> bytes:
        """Everything until the proxy closes the connection."""
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            raise AssertionError("the proxy did not close the connection") from None
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()

    async def __aenter__(self) -> RawMy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
