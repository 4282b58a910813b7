"""Server side of the MySQL engine: connect and authenticate to MySQL/MariaDB, run the proxy's
own commands (state replay, prepares, resets), and relay a lent connection's replies."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbmux.auth import mysql as auth
from dbmux.auth.secrets import Credentials
from dbmux.engines.base import (
    CONNECT_TIMEOUT,
    ConnectCodes,
    ServerConnection,
    ServerError,
    TargetSecurity,
    connect_server,
)
from dbmux.engines.mysql import handshake, scanners, settings, wire
from dbmux.relay import ConnectionClosed, ServerEnd

if TYPE_CHECKING:
    from dbmux.engines.mysql.frontend import MyClient

log = logging.getLogger("dbmux.mysql")

NATIVE = "mysql_native_password"
SHA2 = "caching_sha2_password"
CLEAR = "mysql_clear_password"
# The client library's error numbers for what the proxy refuses at login as a client of the
# database: a TLS failure, and a plugin that would expose the password.
CR_SSL_CONNECTION_ERROR = "2026"
CR_AUTH_PLUGIN_ERR = "2061"


@dataclass(slots=True)
class ServerStatement:
    """A statement prepared on one server connection, shared by every client that prepares
    the same text there."""

    statement_id: int
    params: int
    # The prepare reply (parameter and column definitions), for clients preparing it later.
    reply: list[bytes]
    # Parameter types the server holds from the last execute that sent them.
    types: bytes | None = None


def server_error(payload: bytes) -> ServerError:
    err = wire.parse_err(payload)
    return ServerError(err.message, code=str(err.code), fields={"state": err.state})


class MyServer(ServerEnd, ServerConnection):
    """One connection to a MySQL or MariaDB server."""

    goodbye = wire.packet(0, bytes((wire.COM_QUIT,)))

    @property
    def label(self) -> str:
        return f"thread {self.thread_id} on {self.host}:{self.port}"

    def __init__(self, host: str, port: int, capabilities: int, prepared_capacity: int) -> None:
        ServerEnd.__init__(self)
        ServerConnection.__init__(self)
        self.host = host
        self.port = port
        self.capabilities = capabilities
        self.deprecate_eof = bool(capabilities & handshake.CLIENT_DEPRECATE_EOF)
        self.scanner = scanners.ResponseScanner(
            self.deprecate_eof, local_files=bool(capabilities & handshake.CLIENT_LOCAL_FILES)
        )
        self.client: MyClient | None = None
        self.greeting: handshake.Greeting | None = None
        self.thread_id = 0
        # Session state the proxy put here for borrowers: variables (`name` for system
        # variables, `@name` for user variables) as SQL literals, and the current schema.
        self.applied: dict[str, str] = {}
        self.schema = ""
        self.insert_id = 0  # what LAST_INSERT_ID() returns here, as far as OK packets tell
        self.prepared: OrderedDict[bytes, ServerStatement] = OrderedDict()
        self.prepared_capacity = prepared_capacity
        self.discard_needed = False  # a pinned session left state COM_RESET_CONNECTION clears
        # Run at connect and after each COM_RESET_CONNECTION, which undoes what they set.
        self.session_init: tuple[str, ...] = ()
        self.last_error = ""

    # -- login --------------------------------------------------------------------------------

    async def login(
        self, credentials: Credentials, database: str, charset: int, security: TargetSecurity
    ) -> None:
        """The greeting, TLS if the target group asks for it, the handshake response and
        whatever the server's auth plugin asks for, up to OK."""
        seq, payload = await self.read(wire.split_packet)
        self.greeting = greeting = handshake.parse_greeting(payload)
        self.thread_id = greeting.thread_id
        self.capabilities &= greeting.capabilities
        if not database:  # the SSL request must announce what the response then carries
            self.capabilities &= ~handshake.CLIENT_CONNECT_WITH_DB
        if security.tls is not None:
            seq = await self._start_tls(seq, charset, security)
        plugin = greeting.plugin if greeting.plugin in (NATIVE, SHA2) else NATIVE
        nonce = greeting.nonce
        response = handshake.build_handshake_response(
            capabilities=self.capabilities,
            charset=charset,
            user=credentials.username,
            auth_response=_scramble(plugin, credentials.password, nonce),
            database=database,
            plugin=plugin,
        )
        self.write(wire.packet(seq + 1, response))
        self.schema = database
        password = credentials.password
        while True:
            seq, payload = await self.read(wire.split_packet)
            first = payload[:1]
            if first == b"\0":
                return
            if first == b"\xff":
                raise server_error(payload)
            if first == b"\xfe":  # auth switch: another plugin, maybe a new nonce
                name, pos = wire.read_nul_str(payload, 1)
                plugin = name.decode(errors="replace")
                nonce = payload[pos:].rstrip(b"\0") or nonce
                if plugin == CLEAR:
                    self._check_cleartext_allowed(security)
                    self.write(wire.packet(seq + 1, password.encode() + b"\0"))
                elif plugin in (NATIVE, SHA2):
                    self.write(wire.packet(seq + 1, _scramble(plugin, password, nonce)))
                else:
                    raise ServerError(f"the server asks for unsupported auth plugin {plugin}")
            elif first == b"\x01" and plugin == SHA2:  # caching_sha2_password's more data
                if payload[1:] == b"\x03":  # fast authentication succeeded; OK follows
                    continue
                if payload[1:] != b"\x04":
                    raise ServerError("unexpected caching_sha2_password data during login")
                self.write(
                    wire.packet(seq + 1, self._full_authentication(password, nonce, security))
                )
            else:
                raise ServerError(f"unexpected packet 0x{payload[0]:02x} during login")

    async def _start_tls(self, seq: int, charset: int, security: TargetSecurity) -> int:
        """The SSL request and the TLS handshake (its failure raises TlsHandshakeFailed);
        the sequence number the handshake response follows."""
        tls = security.tls
        assert tls is not None and self.greeting is not None
        if not self.greeting.capabilities & handshake.CLIENT_SSL:
            raise ServerError(
                f"{self.host}:{self.port} does not offer TLS; {security.tls_hint()}",
                code=CR_SSL_CONNECTION_ERROR,
            )
        if self.inbox:  # bytes before the handshake would be read as if they came over TLS
            raise ServerError(f"{self.host}:{self.port} sent data before the TLS handshake")
        self.capabilities |= handshake.CLIENT_SSL
        seq += 1
        self.write(wire.packet(seq, handshake.build_ssl_request(self.capabilities, charset)))
        await self.start_tls(
            tls.current, CONNECT_TIMEOUT, server_hostname=tls.server_hostname(self.host)
        )
        return seq

    def _full_authentication(self, password: str, nonce: bytes, security: TargetSecurity) -> bytes:
        """caching_sha2_password's answer when the server has no cached hash: the password
        itself in the TLS channel, RSA-encrypted with the configured key of the server
        otherwise. The server's own offer of its key is never asked for: without TLS, whoever
        sits in between could hand over a key of his own and read the password."""
        if self.tls:
            return password.encode() + b"\0"
        if security.server_public_key is None:
            raise ServerError(
                f"{self.host}:{self.port} needs the password (caching_sha2_password full"
                " authentication) on a connection without TLS; set target_group.tls to"
                " encrypt the connection or target_group.server_public_key_file to the"
                " server's RSA public key",
                code=CR_AUTH_PLUGIN_ERR,
            )
        try:
            return auth.encrypt_password(password, nonce, security.server_public_key)
        except ValueError as error:
            raise ServerError(
                f"target_group.server_public_key_file is unusable: {error}", code=CR_AUTH_PLUGIN_ERR
            ) from None

    def _check_cleartext_allowed(self, security: TargetSecurity) -> None:
        if not self.tls and not security.allow_cleartext_password:
            raise ServerError(
                f"{self.host}:{self.port} asks for the password in cleartext"
                " (mysql_clear_password) on a connection without TLS; refused"
                " (target_group.tls encrypts the connection,"
                " target_group.allow_cleartext_password allows it)",
                code=CR_AUTH_PLUGIN_ERR,
            )

    # -- the proxy's own commands -------------------------------------------------------------

    async def exchange(self, payload: bytes, kind: int) -> list[bytes]:
        """Send one command and read its whole response (logical payloads); an ERR raises
        ServerError. Not for large results: the proxy's own queries are small."""
        self.stop_relaying()
        try:
            self.write(wire.packet(0, payload))
            scanner = self.scanner
            scanner.expect(kind)
            raw = bytearray()
            while scanner.busy:
                packet = await self.read(wire.split_raw)
                raw += packet
                scanner.feed(packet)
        finally:
            self.resume_relaying()
        reader = wire.PacketReader()
        payloads = []
        while (item := reader.take(raw)) is not None:
            payloads.append(item)
        if scanner.insert_id:
            self.insert_id = scanner.insert_id
        if scanner.failed:
            raise server_error(payloads[-1])
        return payloads

    async def query(self, sql: str) -> tuple[list[wire.Column], list[list[bytes | None]]]:
        payloads = await self.exchange(
            bytes((wire.COM_QUERY,)) + sql.encode(), wire.RESPONSE_RESULT
        )
        return wire.parse_text_result(payloads, self.deprecate_eof)

    async def read_server_limit(self) -> None:
        _, rows = await self.query("SELECT @@max_connections")
        # Accounts without SUPER get max_connections; one more is kept for SUPER.
        self.server_limit = (int(rows[0][0] or 1), 0)

    async def read_facts(self) -> dict[str, str]:
        """What the clients of a pool need to know of its server, read once per pool."""
        try:
            _, rows = await self.query("SELECT @@max_allowed_packet")
        except ServerError:
            return {}
        return {"max_allowed_packet": (rows[0][0] or b"").decode()}

    async def prepare(self, text: bytes) -> ServerStatement:
        """This connection's statement for `text`, prepared now if it has none; raises the
        server's error when the text cannot be prepared."""
        statement = self.prepared.get(text)
        if statement is not None:
            self.prepared.move_to_end(text)
            return statement
        payloads = await self.exchange(
            bytes((wire.COM_STMT_PREPARE,)) + text, wire.RESPONSE_PREPARE
        )
        ok = wire.parse_prepare_ok(payloads[0])
        statement = ServerStatement(ok.statement_id, ok.params, payloads)
        self.prepared[text] = statement
        while len(self.prepared) > self.prepared_capacity:
            _, evicted = self.prepared.popitem(last=False)
            self.write(
                wire.packet(0, wire.with_statement_id(b"\x19\0\0\0\0", evicted.statement_id))
            )
        return statement

    async def apply_state(self, wanted: dict[str, str], schema: str) -> None:
        """Bring this session's variables and schema to a client's. Only differences are
        sent; a system variable the client does not have is reset with
        COM_RESET_CONNECTION, which also clears the statements prepared here."""
        applied = self.applied
        if any(name not in wanted and name[0] != "@" for name in applied):
            await self.reset_session()
            applied = self.applied
        changes = {key: value for key, value in wanted.items() if applied.get(key) != value}
        changes.update((key, "NULL") for key in applied if key not in wanted)
        if changes:
            await self.query(settings.set_statement(changes))
        self.applied = dict(wanted)
        if schema != self.schema and schema:
            await self.exchange(bytes((wire.COM_INIT_DB,)) + schema.encode(), wire.RESPONSE_SIMPLE)
            self.schema = schema

    async def reset_session(self) -> None:
        """COM_RESET_CONNECTION: the session is as new (the schema stays), then started
        again."""
        await self.exchange(bytes((wire.COM_RESET_CONNECTION,)), wire.RESPONSE_SIMPLE)
        self.applied = {}
        self.prepared.clear()
        self.insert_id = 0
        await self.start_session()

    async def start_session(self) -> None:
        for statement in self.session_init:
            await self.query(statement)

    async def reset(self) -> None:
        """Before the next borrower: roll back what is open; clear a pinned session's state."""
        if self.discard_needed:
            # Releases table locks and named locks too; a global read lock needs its own.
            await self.reset_session()
            await self.query("UNLOCK TABLES")
            self.discard_needed = False
        elif self.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            await self.query("ROLLBACK")

    async def ping(self) -> None:
        await self.exchange(bytes((wire.COM_PING,)), wire.RESPONSE_SIMPLE)

    # -- relay --------------------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        scanner = self.scanner
        try:
            done = scanner.feed(data)
        except wire.ProtocolViolation as error:
            log.error("server %s:%s broke the protocol: %s", self.host, self.port, error)
            self.close()
            return
        if scanner.unsolicited is not None:
            self._note_goodbye(scanner.unsolicited)
            scanner.unsolicited = None
            return
        client = self.client
        if client is None:
            return
        refused = done and scanner.failed and wire.is_read_only_refusal(data)
        if refused and client.retry_on_next_writer(self, data):
            return
        replay_log = client.replay_log
        if replay_log is not None:  # transaction_replay: what the client sees, digested
            replay_log.hasher.update(data)
            if client.replaying:  # ...or what it saw, seen again: not sent twice
                if done:
                    client.response_done(done)
                return
        client.transport.write(data)  # type: ignore[union-attr]  # attached, so open (hot path)
        if done:
            client.response_done(done)
        elif scanner.file_requested:  # LOAD DATA LOCAL: the client's file comes next
            scanner.file_requested = False
            client.upload_file()

    def _note_goodbye(self, payload: bytes) -> None:
        err = wire.parse_err(payload)
        self.last_error = f"{err.code} {err.message}"
        log.info("server connection %s:%s ends: %s", self.host, self.port, self.last_error)

    def on_closed(self, exc: Exception | None) -> None:
        client = self.client
        self.close(by_peer=True)
        if client is not None:
            client.server_lost(self)


def _scramble(plugin: str, password: str, nonce: bytes) -> bytes:
    if plugin == SHA2:
        return auth.sha2_scramble(password, nonce)
    return auth.native_scramble(password, nonce)


async def read_greeting(host: str, port: int) -> handshake.Greeting:
    """The server's greeting, without logging in: what the proxy shows its own clients."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    try:
        header = await asyncio.wait_for(reader.readexactly(4), CONNECT_TIMEOUT)
        length = int.from_bytes(header[:3], "little")
        return handshake.parse_greeting(await reader.readexactly(length))
    finally:
        writer.close()


CONNECT_CODES = ConnectCodes(
    timeout="2013", lost="2013", unreachable="2003", insecure=CR_SSL_CONNECTION_ERROR
)


async def open_server(
    host: str,
    port: int,
    credentials: Credentials,
    database: str,
    *,
    capabilities: int,
    charset: int,
    session_init: tuple[str, ...],
    read_limit: bool,
    prepared_capacity: int,
    security: TargetSecurity,
) -> MyServer:
    """Connect, authenticate, start the session (and read the server's limit when asked)."""

    async def log_in(server: MyServer) -> None:
        await server.login(credentials, database, charset, security)
        server.resume_relaying()

    return await connect_server(
        lambda: MyServer(host, port, capabilities, prepared_capacity),
        host,
        port,
        log_in,
        session_init=session_init,
        read_limit=read_limit,
        codes=CONNECT_CODES,
        security=security,
        lost=(ConnectionClosed, wire.ProtocolViolation),
    )
