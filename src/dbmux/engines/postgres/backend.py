"""Server side of the PostgreSQL engine: connect, authenticate, run the proxy's own queries,
and relay a lent connection's replies to its client."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from dbmux.auth.md5 import md5_response
from dbmux.auth.scram import MECHANISM, ScramClient, ScramError
from dbmux.auth.secrets import Credentials
from dbmux.auth.tls import TargetSideTls, end_point_hash
from dbmux.engines.base import (
    CONNECT_TIMEOUT,
    ConnectCodes,
    ServerConnection,
    ServerError,
    TargetSecurity,
    connect_server,
)
from dbmux.engines.postgres import scanners, wire
from dbmux.relay import ServerEnd

if TYPE_CHECKING:
    from dbmux.engines.postgres.frontend import PgClient

log = logging.getLogger("dbmux.postgres")


def quote_literal(value: str) -> str:
    """A string literal that reads the same whatever standard_conforming_strings is (the
    session may have it off): backslashes go in an E'' string, as PostgreSQL's own
    quote_literal() does."""
    quoted = "'" + value.replace("'", "''") + "'"
    return "E" + quoted.replace("\\", "\\\\") if "\\" in value else quoted


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PgServer(ServerEnd, ServerConnection):
    """One connection to a PostgreSQL server."""

    goodbye = wire.TERMINATE

    @property
    def label(self) -> str:
        return f"pid {self.process_id} on {self.host}:{self.port}"

    def __init__(self, host: str, port: int, prepared_capacity: int = 500) -> None:
        ServerEnd.__init__(self)
        ServerConnection.__init__(self)
        self.host = host
        self.port = port
        self.client: PgClient | None = None
        self.scanner = scanners.BackendScanner()
        # Reported parameters (ParameterStatus) as the server last told us.
        self.params: dict[str, str] = {}
        # Settings the proxy applied for a borrower, differing from the pool's defaults.
        self.applied: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.pid_bytes = b"\0\0\0\0"
        self.last_error = ""  # why the server said it was closing, for the client's message
        # Shared prepared statements on this connection (proxy names), least recently used
        # first, as the clients' relays create and close them (see scanners.ReplyPlan).
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        self.prepared_capacity = prepared_capacity
        # A pinned session ran SQL about prepared statements: until DISCARD ALL, a statement
        # is closed before it is created, in case it is still there.
        self.statements_unknown = False
        self.discard_needed = False  # a pinned session left state that DISCARD ALL clears
        self.session_init: tuple[str, ...] = ()  # run at connect and after each DISCARD ALL
        self.sasl_mechanism = ""  # what the login's SASL exchange ran, if it ran one
        self.target_tls: TargetSideTls | None = None  # what it runs over TLS with (cancels too)

    async def start_session(self) -> None:
        for statement in self.session_init:
            await self.run(statement)

    # -- lifecycle ----------------------------------------------------------------------------

    async def login(
        self, credentials: Credentials, database: str, security: TargetSecurity
    ) -> None:
        """TLS if the target group asks for it, then startup and authentication, up to the
        first ReadyForQuery."""
        if security.tls is not None:
            await self._start_tls(security)
            self.target_tls = security.tls
        self.write(wire.startup_message({"user": credentials.username, "database": database}))
        scram: ScramClient | None = None
        while True:
            kind, payload = await self.read(wire.split_message)
            if kind == 82:  # R
                code, data = wire.parse_auth(payload)
                if code == wire.AUTH_OK:
                    if scram is not None and not scram.verified:
                        # A server (or whoever sits in between) that did not prove it knows
                        # the password is not trusted with sessions.
                        raise ServerError(
                            "the server reported login success without completing SCRAM",
                            code="28000",
                        )
                    continue
                if code == wire.AUTH_SASL:
                    mechanisms = [m for m in data.split(b"\0") if m]
                    scram = self._scram_client(credentials.password, mechanisms)
                    first = scram.client_first()
                    self.write(wire.sasl_initial_response(scram.mechanism, first))
                    self.sasl_mechanism = scram.mechanism
                elif code == wire.AUTH_SASL_CONTINUE and scram is not None:
                    try:
                        # PBKDF2 off the event loop: it takes milliseconds per connection.
                        final = await asyncio.to_thread(scram.handle_server_first, data)
                        self.write(wire.password_message(final))
                    except ScramError as error:
                        raise ServerError(
                            f"SCRAM exchange with the server failed: {error}"
                        ) from None
                elif code == wire.AUTH_SASL_FINAL and scram is not None:
                    try:
                        scram.verify_server_final(data)
                    except ScramError as error:
                        raise ServerError(
                            f"the server failed SCRAM verification: {error}"
                        ) from None
                elif code == wire.AUTH_MD5:
                    response = md5_response(credentials.username, credentials.password, data[:4])
                    self.write(wire.password_message(response + b"\0"))
                elif code == wire.AUTH_CLEARTEXT:
                    if not self.tls and not security.allow_cleartext_password:
                        raise ServerError(
                            f"{self.host}:{self.port} asks for the password in cleartext on a"
                            " connection without TLS; refused (target_group.tls encrypts the"
                            " connection, target_group.allow_cleartext_password allows it)",
                            code="28000",
                        )
                    self.write(wire.password_message(credentials.password.encode() + b"\0"))
                else:
                    raise ServerError(f"unsupported authentication request {code} from the server")
            elif kind == 83:  # S
                name, value = wire.parse_parameter_status(payload)
                self.params[name] = value
            elif kind == 75:  # K
                self.process_id, self.secret_key = wire.parse_cancel(b"\0\0\0\0" + payload)
                self.pid_bytes = payload[:4]
            elif kind == 69:  # E
                raise _server_error(payload)
            elif kind == 90:  # Z
                return
            # NoticeResponse and anything else during startup: nothing to do.

    async def _start_tls(self, security: TargetSecurity) -> None:
        """SSLRequest; on 'S' the TLS handshake (its failure raises TlsHandshakeFailed)."""
        tls = security.tls
        assert tls is not None
        self.write(wire.SSL_REQUEST_MESSAGE)
        answer = await self.read(wire.split_byte)
        if answer != b"S":
            refused = "does not accept TLS" if answer in (b"N", b"E") else "garbled the TLS request"
            raise ServerError(
                f"{self.host}:{self.port} {refused}; {security.tls_hint()}",
                code="28000",
            )
        if self.inbox:  # bytes before the handshake would be read as if they came over TLS
            raise ServerError(
                f"{self.host}:{self.port} sent unencrypted data after accepting TLS",
                code="08P01",
            )
        await self.start_tls(
            tls.current, CONNECT_TIMEOUT, server_hostname=tls.server_hostname(self.host)
        )

    def _scram_client(self, password: str, mechanisms: list[bytes]) -> ScramClient:
        """SCRAM-SHA-256-PLUS, bound to this TLS connection's server certificate, where the
        server offers it; plain SCRAM-SHA-256 otherwise."""
        if self.tls and f"{MECHANISM}-PLUS".encode() in mechanisms:
            ssl_object = self.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                from cryptography import x509  # (only here: see dbmux.auth.tls)

                binding = end_point_hash(x509.load_der_x509_certificate(der))
                return ScramClient(password, channel_binding=binding)
        if MECHANISM.encode() not in mechanisms:
            raise ServerError(f"server offers no supported SASL mechanism {mechanisms}")
        return ScramClient(password, on_tls=self.tls)

    async def run(self, sql: str) -> list[list[str | None]]:
        """Run the proxy's own simple query; rows of the last result as text."""
        self.stop_relaying()
        try:
            self.write(wire.query(sql))
            rows: list[list[str | None]] = []
            error: ServerError | None = None
            while True:
                kind, payload = await self.read(wire.split_message)
                if kind == 68:  # D
                    rows.append(wire.parse_data_row(payload))
                elif kind == 84:  # T: a new result starts
                    rows = []
                elif kind == 69:
                    error = _server_error(payload)
                elif kind == 83:
                    name, value = wire.parse_parameter_status(payload)
                    self.params[name] = value
                elif kind == 90:
                    self.scanner.status = payload[0]
                    if error is not None:
                        raise error
                    return rows
        finally:
            self.resume_relaying()

    async def read_server_limit(self) -> None:
        rows = await self.run(
            "SELECT current_setting('max_connections'),"
            " current_setting('superuser_reserved_connections')"
        )
        self.server_limit = (int(rows[0][0] or 1), int(rows[0][1] or 0))

    async def reset(self) -> None:
        """Before the next borrower: roll back an open transaction (DISCARD ALL refuses to
        run inside one), clear a pinned session's state."""
        if self.scanner.status != wire.IDLE:
            await self.run("ROLLBACK")
        if self.discard_needed:
            await self.run("DISCARD ALL")
            self.discard_needed = False
            self.applied.clear()
            self.prepared.clear()
            self.statements_unknown = False
            await self.start_session()

    async def apply_settings(
        self, wanted: dict[str, str], defaults: dict[str, str], *, force: bool = False
    ) -> None:
        """Make the session's settings equal to `wanted`, touching only what differs (with
        `force`: set every value in `wanted` and leave the others alone). set_config takes
        each value as the server printed it; SET would re-quote list settings such as
        search_path."""
        resets = [] if force else [name for name in self.applied if name not in wanted]
        changes = [
            f"set_config({quote_literal(name)}, {quote_literal(value)}, false)"
            for name, value in wanted.items()
            if force or self.applied.get(name, defaults.get(name)) != value
        ]
        # Separate queries: the literals of a query are read before any of it runs, so a
        # RESET of standard_conforming_strings must not share one with them.
        if resets:
            await self.run(";".join(f"RESET {quote_ident(name)}" for name in resets))
        if changes:
            await self.run("SELECT " + ", ".join(changes))
        if not force:
            self.applied = dict(wanted)

    async def read_settings(self, names: set[str]) -> dict[str, str | None]:
        """The values settings have in this session now (None: a custom setting never set).
        current_setting() per name: reading the pg_settings view costs far more."""
        ordered = sorted(names)
        columns = ", ".join(f"current_setting({quote_literal(n)}, true)" for n in ordered)
        (row,) = await self.run(f"SELECT {columns}")
        return dict(zip(ordered, row, strict=True))

    async def ping(self) -> None:
        await self.run("")  # an empty query: EmptyQueryResponse, ReadyForQuery

    def close(self, graceful: bool = False, *, by_peer: bool = False) -> None:
        super().close(graceful, by_peer=by_peer)
        if self.scanner.pid_map is not None:
            # Its process id's owner (for NotificationResponse) goes with it: server
            # connections come and go, and the map of them must not only grow.
            self.scanner.pid_map.pop(self.pid_bytes, None)

    # -- relay --------------------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        scanner = self.scanner
        try:
            data = scanner.feed(data)
        except wire.ProtocolViolation as error:
            log.error("server %s:%s broke the protocol: %s", self.host, self.port, error)
            self.close()
            return
        if scanner.params:
            self._note_params()
        if scanner.fatal is not None:
            self._note_fatal(scanner.fatal)
        client = self.client
        if client is None:
            return
        if data:
            client.transport.write(data)  # type: ignore[union-attr]  # attached, so open (hot path)
        if scanner.ready:
            client.server_ready(scanner.ready, scanner.status)

    def _note_fatal(self, payload: bytes) -> None:
        """The server is ending this connection and closes the socket next."""
        fields = wire.parse_fields(payload)
        self.last_error = f"{fields.get('C', '')} {fields.get('M', '')}".strip()
        log.info("server connection %s:%s ends: %s", self.host, self.port, self.last_error)

    def _note_params(self) -> None:
        for payload in self.scanner.params:
            name, value = wire.parse_parameter_status(payload)
            self.params[name] = value
        self.scanner.params.clear()
        if self.client is not None:
            self.client.server_params_changed = True

    def on_closed(self, exc: Exception | None) -> None:
        client = self.client
        self.close(by_peer=True)
        if client is not None:
            client.server_lost(self)


def _server_error(payload: bytes) -> ServerError:
    fields = wire.parse_fields(payload)
    return ServerError(fields.get("M", "server error"), code=fields.get("C", ""), fields=fields)


CONNECT_CODES = ConnectCodes(timeout="08001", lost="08006", unreachable="08001", insecure="28000")


async def open_server(
    host: str,
    port: int,
    credentials: Credentials,
    database: str,
    *,
    session_init: tuple[str, ...],
    read_limit: bool,
    prepared_capacity: int,
    security: TargetSecurity,
) -> PgServer:
    """Connect, authenticate, start the session (and read the server's limit when asked)."""

    async def log_in(server: PgServer) -> None:
        await server.login(credentials, database, security)

    server = await connect_server(
        lambda: PgServer(host, port, prepared_capacity),
        host,
        port,
        log_in,
        session_init=session_init,
        read_limit=read_limit,
        codes=CONNECT_CODES,
        security=security,
    )
    server.resume_relaying()
    return server


async def send_cancel(
    host: str, port: int, process_id: int, secret_key: int, tls: TargetSideTls | None
) -> None:
    """Deliver a CancelRequest, over TLS when the target group's connections use it: the key
    cancels the session's queries for whoever reads it on the way. The server closes the
    connection once it has acted on it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    try:
        if tls is not None:
            writer.write(wire.SSL_REQUEST_MESSAGE)
            if await asyncio.wait_for(reader.readexactly(1), CONNECT_TIMEOUT) != b"S":
                raise ConnectionRefusedError(f"{host}:{port} does not accept TLS")
            await writer.start_tls(
                tls.current,
                server_hostname=tls.server_hostname(host),
                ssl_handshake_timeout=CONNECT_TIMEOUT,
            )
        writer.write(wire.cancel_request(process_id, secret_key))
        await writer.drain()
        await asyncio.wait_for(reader.read(), CONNECT_TIMEOUT)
    finally:
        writer.close()
