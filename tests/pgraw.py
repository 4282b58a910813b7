"""A tiny raw PostgreSQL protocol client for tests that must send what real drivers never do.

It speaks just enough of protocol 3.0 to log in with SCRAM-SHA-256 and run simple queries,
and otherwise lets a test put any bytes on the wire and read back exactly what came.
Deliberately independent of dbmux's own framing code (only the SCRAM math is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from dbmux.auth.scram import ScramClient

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 10, 11, 12

# Generous: a reply we expect must come, we only bound how long a broken proxy can hang us.
REPLY_TIMEOUT = 15.0


def i32(value: int) -> bytes:
    return struct.pack("!i", value)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    """A typed message: kind, int32 length (including itself), payload."""
    return kind + i32(len(payload) + 4) + payload


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = u32(version) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
    )
    body += b"\0"
    return i32(len(body) + 4) + body


def raw_startup(body: bytes) -> bytes:
    """A startup-phase packet with a correct length word around an arbitrary body."""
    return i32(len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def sasl_initial_response(first: bytes, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    return msg(b"p", mechanism + b"\0" + i32(len(first)) + first)


def parse_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse; asserts it is well formed."""
    assert payload.endswith(b"\0"), f"ErrorResponse not NUL-terminated: {payload!r}"
    fields: dict[str, str] = {}
    pos = 0
    while payload[pos] != 0:
        end = payload.index(b"\0", pos)
        fields[chr(payload[pos])] = payload[pos + 1 : end].decode()
        pos = end + 1
    assert pos == len(payload) - 1, f"bytes after the ErrorResponse terminator: {payload!r}"
    return fields


@dataclass
class Message:
    kind: bytes
    payload: bytes

    @property
    def fields(self) -> dict[str, str]:
        return parse_fields(self.payload)

    @property
    def auth_code(self) -> int:
        assert self.kind == b"R", self
        return struct.unpack_from("!i", self.payload)[0]


class ProtocolFailure(AssertionError):
    """The proxy answered with something other than what the test expected."""


class RawClient:
    """One socket to the proxy, driven byte by byte.

    Built on a plain non-blocking socket rather than asyncio streams: a stream reader drops
    bytes it already holds once the peer resets the connection, and a test must still see
    the ErrorResponse that came before such a reset.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.reset = False  # the proxy reset the connection rather than closing it
        self.backend_key: tuple[int, int] | None = None
        self.params: dict[str, str] = {}

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (host, port)), REPLY_TIMEOUT
            )
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()

    # -- sending ------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_sendall(self.sock, data), REPLY_TIMEOUT
        )

    def abort(self) -> None:
        """Drop the socket (the 'client vanished' case); safe to call twice."""
        if self.sock.fileno() >= 0:
            self.sock.close()

    def close_write(self) -> None:
        """Half-close: the proxy sees end of input, we can still read its answer."""
        with contextlib.suppress(OSError):  # already reset by the proxy
            self.sock.shutdown(socket.SHUT_WR)

    # -- receiving ----------------------------------------------------------------------------

    async def _fill(self, deadline: float) -> bool:
        """Read one more chunk; False at end of input."""
        if self.eof:
            return False
        loop = asyncio.get_running_loop()
        timeout = deadline - loop.time()
        if timeout <= 0:
            raise ProtocolFailure("no reply from the proxy in time")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
        except TimeoutError:
            raise ProtocolFailure(
                f"no reply from the proxy in time (holding {bytes(self.buf)[:200]!r})"
            ) from None
        except ConnectionResetError:
            chunk = b""
            self.reset = True
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    async def read_exactly(self, n: int, timeout: float = REPLY_TIMEOUT) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.buf) < n:
            if not await self._fill(deadline):
                raise ProtocolFailure(
                    f"connection closed after {bytes(self.buf)!r} while {n} bytes were expected"
                )
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_message(self, timeout: float = REPLY_TIMEOUT) -> Message:
        header = await self.read_exactly(5, timeout)
        kind, length = header[:1], struct.unpack("!I", header[1:])[0]
        if length < 4 or length > 1 << 30:
            raise ProtocolFailure(f"proxy sent a message {kind!r} with length {length}")
        return Message(kind, await self.read_exactly(length - 4, timeout))

    async def read_all(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """Everything up to the proxy closing the connection (which must happen in time)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while await self._fill(deadline):
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def expect_closed(self, timeout: float = REPLY_TIMEOUT) -> None:
        """The proxy must close the connection without sending anything more."""
        rest = await self.read_all(timeout)
        if rest:
            raise ProtocolFailure(f"expected the connection to close, got {rest!r}")

    async def expect_fatal(self, code: str, timeout: float = REPLY_TIMEOUT) -> dict[str, str]:
        """Skip nothing: the next message must be FATAL `code`, then the socket must close."""
        reply = await self.read_message(timeout)
        if reply.kind != b"E":
            raise ProtocolFailure(f"expected ErrorResponse {code}, got {reply}")
        fields = reply.fields
        if fields.get("S") != "FATAL" or fields.get("C") != code:
            raise ProtocolFailure(f"expected FATAL {code}, got {fields}")
        if fields.get("V", "FATAL") != "FATAL" or not fields.get("M"):
            raise ProtocolFailure(f"malformed ErrorResponse fields {fields}")
        await self.expect_closed(timeout)
        return fields

    async def read_until_ready(self, timeout: float = REPLY_TIMEOUT) -> list[Message]:
        """Messages up to and including ReadyForQuery."""
        out: list[Message] = []
        while True:
            reply = await self.read_message(timeout)
            out.append(reply)
            if reply.kind == b"Z":
                return out

    # -- conversations ------------------------------------------------------------------------

    async def start(self, user: str, database: str, **params: str) -> Message:
        """Send a startup packet; return the first reply (an authentication request)."""
        await self.send(startup_packet({"user": user, "database": database, **params}))
        return await self.read_message()

    async def login(self, user: str, password: str, database: str) -> list[Message]:
        """Full SCRAM-SHA-256 login; returns what followed AuthenticationOk up to ReadyForQuery."""
        sasl = await self.start(user, database)
        self._expect_auth(sasl, AUTH_SASL)
        mechanisms = sasl.payload[4:].split(b"\0")
        assert b"SCRAM-SHA-256" in mechanisms, sasl
        scram = ScramClient(password)
        await self.send(sasl_initial_response(scram.client_first()))
        cont = await self.read_message()
        self._expect_auth(cont, AUTH_SASL_CONTINUE)
        await self.send(msg(b"p", scram.handle_server_first(cont.payload[4:])))
        final = await self.read_message()
        self._expect_auth(final, AUTH_SASL_FINAL)
        scram.verify_server_final(final.payload[4:])
        self._expect_auth(await self.read_message(), AUTH_OK)
        after = await self.read_until_ready()
        for m in after:
            if m.kind == b"S":
                name, value, _ = m.payload.split(b"\0", 2)
                self.params[name.decode()] = value.decode()
            elif m.kind == b"K":
                self.backend_key = struct.unpack("!ii", m.payload)
            elif m.kind == b"E":
                raise ProtocolFailure(f"login failed after AuthenticationOk: {m.fields}")
        assert self.backend_key is not None, "no BackendKeyData"
        assert after[-1].payload == b"I", after[-1]
        return after

    async def simple_query(self, sql: str) -> list[Message]:
        """Run one simple query; raise on an ErrorResponse."""
        await self.send(query(sql))
        replies = await self.read_until_ready()
        for m in replies:
            if m.kind == b"E":
                raise ProtocolFailure(f"query {sql!r} failed: {m.fields}")
        return replies

    @staticmethod
    def _expect_auth(message: Message, code: int) -> None:
        if message.kind != b"R" or message.auth_code != code:
            detail = message.fields if message.kind == b"E" else message
            raise ProtocolFailure(f"expected authentication request {code}, got {detail}")


def data_rows(replies: list[Message]) -> list[list[str | None]]:
    rows = []
    for m in replies:
        if m.kind != b"D":
            continue
        count = struct.unpack_from("!h", m.payload)[0]
        pos, row = 2, []
        for _ in range(count):
            size = struct.unpack_from("!i", m.payload, pos)[0]
            pos += 4
            if size < 0:
                row.append(None)
            else:
                row.append(m.payload[pos : pos + size].decode())
                pos += size
        rows.append(row)
    return rows


def split_messages(data: bytes) -> tuple[list[Message], bytes]:
    """Cut a received byte stream into typed messages; returns (messages, unfinished tail).
    A header with an impossible length fails the test: the proxy must never send one."""
    out: list[Message] = []
    pos = 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!I", data, pos + 1)[0]
        if length < 4 or length > 1 << 30:
            raise ProtocolFailure(f"malformed message header in {data[pos : pos + 40]!r}")
        end = pos + 1 + length
        if end > len(data):
            break
        out.append(Message(data[pos : pos + 1], data[pos + 5 : end]))
        pos = end
    return out, data[pos:]
