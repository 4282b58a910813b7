"""Client side of the MySQL engine: one command at a time, a server connection borrowed for
each transaction, and the session's state carried from one server connection to the next.

MySQL clients send a command and wait for its reply, so the client is served strictly in
order: while a command is answered, later ones wait in the inbox. A server connection goes
back to the pool when a reply ends with SERVER_STATUS_IN_TRANS clear, unless the session is
pinned or holds long data for a statement.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbmux.auth import mysql as auth
from dbmux.auth.admission import Refusal, source_address
from dbmux.engines.base import ClientSession, ServerError
from dbmux.engines.mysql import handshake, pinning, state, wire
from dbmux.engines.mysql.backend import NATIVE, MyServer
from dbmux.engines.mysql.kill import find_kill
from dbmux.engines.mysql.replay import ReplayMixin, TransactionLog
from dbmux.framed import ClientEnd, ConnectionClosed
from dbmux.pool import Borrower, BorrowTimeout, Lender

if TYPE_CHECKING:
    from dbmux.engines.mysql.engine import MyContext

log = logging.getLogger("dbmux.mysql")

CURSOR = "cursor"  # COM_STMT_EXECUTE that opens a server-side cursor
SET_OPTION = "set_option"  # COM_SET_OPTION changes how the server connection parses
MAX_CLIENT_STATEMENTS = 10_000  # prepared statements one client may hold at once
MAX_CLIENT_STATEMENT_BYTES = 64 << 20  # ...and the bytes of their texts
# Variables a session may have the proxy carry to each server connection it borrows; past
# that it is pinned (SESSION_STATE_SIZE) and its server connection holds them, as directly.
MAX_CARRIED_STATE = 1000
SESSION_STATE_SIZE = "session_state_size"
INBOX_LIMIT = 1 << 20  # stop reading a client that sends this much ahead of its replies
DEFAULT_COMMAND_LIMIT = 64 << 20  # until the server's max_allowed_packet is known
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
ER_NOT_SUPPORTED_YET = (1235, "42000")  # a KILL dbmux cannot carry out for the client


class LoginRefused(Exception):
    """Login ends with this ERR packet (sequence id `seq`) and the connection is closed."""

    def __init__(self, seq: int, error: tuple[int, str], message: str) -> None:
        super().__init__(message)
        self.seq, self.error, self.message = seq, error, message


class CommandFailed(Exception):
    """A command is answered with this ERR packet; the client keeps its connection."""

    def __init__(self, error: tuple[int, str], message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


@dataclass(slots=True)
class ClientStatement:
    """A statement the client prepared, under the id the proxy gave it."""

    text: bytes
    params: int
    verdict: pinning.Verdict
    types: bytes | None = None  # the parameter types its last execute sent


# A command on its way to a server: payload, reply shape, statement, packet as sent.
Request = tuple[bytes, "int | None", "ClientStatement | None", "bytes | None"]


def borrow_hint(pool: Lender) -> str:
    return f"timed out waiting for a database connection: {pool.borrow_hint()}"


def too_many(seq: int, refusal: Refusal) -> LoginRefused:
    """MySQL's "Too many connections" (1040), saying which limit was reached."""
    return LoginRefused(
        seq, wire.ER_CON_COUNT_ERROR, f"Too many connections: {refusal.text} ({refusal.hint})"
    )


def command_limit(setting: int | None, facts: dict[str, str] | None) -> int:
    """Bytes of one command the proxy buffers: max_command_size, else the server's own
    max_allowed_packet (past which it refuses a command anyway)."""
    if setting is not None:
        return setting
    known = (facts or {}).get("max_allowed_packet", "")
    return int(known) if known.isdigit() else DEFAULT_COMMAND_LIMIT


def error_of(error: ServerError) -> tuple[int, str]:
    code = int(error.code) if error.code.isdigit() else wire.CR_SERVER_LOST[0]
    return code, str(error.fields.get("state", "HY000"))


class MyClient(ReplayMixin, ClientEnd, ClientSession, Borrower):
    """One MySQL client connection."""

    def __init__(self, ctx: MyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.reader = wire.PacketReader()
        self.server: MyServer | None = None
        self.pool: Lender | None = None
        self.user = ""
        self.capabilities = 0
        self.variant = 0
        self.nonce = b""
        self.connection_id = 0
        self.pin_reason: str | None = None
        # Session state: variables as SQL literals (`name` system, `@name` user), schema.
        self.wanted: dict[str, str] = {}
        self.schema = ""
        self.insert_id = 0
        self.touched: set[str] = set()  # variables this transaction may have changed
        self.schema_touched = False
        self.memo_text: bytes | None = None  # the transaction's one memoizable SET
        self.want_insert_id = False  # the command reads LAST_INSERT_ID()
        self.pending_schema: str | None = None  # COM_INIT_DB sent, not yet answered
        self.statements: dict[int, ClientStatement] = {}
        self.statement_bytes = 0  # the length of their texts
        self.next_statement_id = 1
        self.last_prepared = 0
        # Texts of the server statements holding this client's long data: the session keeps
        # its server connection until each is executed, reset or closed.
        self.long_data: set[bytes] = set()
        self.busy = False  # a command is being answered
        self.sent: Request | None = None  # the last command sent to a server
        self.retried: Request | None = None  # ...and the last one run again on a new writer
        self.replay_log = TransactionLog() if ctx.config.transaction_replay else None
        self.replaying = False  # running the logged transaction again on a new connection
        self.waiting: Request | None = None  # command waiting for a server
        self.transaction_lost = ""  # why, when the server died under an open transaction
        self.cancelling: MyServer | None = None  # whose query our KILL QUERY stops
        self.upload: wire.UploadScanner | None = None  # a LOAD DATA LOCAL file coming
        self.last_active = ctx.clock.now
        self.logged_in = False
        self._task: asyncio.Task[None] | None = None
        self._held = False  # reading paused: too much sent ahead of the replies
        self._clock = ctx.clock
        self._requests = ctx.metrics.query_requests
        self._verdict = ctx.classifier.verdict

    # -- lifecycle ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ctx.metrics.client_connections_received.value += 1
        self.ctx.clients.add(self)
        self._task = self.ctx.loop.create_task(self._login())

    def on_closed(self, exc: Exception | None) -> None:
        ctx = self.ctx
        ctx.clients.discard(self)
        ctx.sessions.pop(self.connection_id, None)
        ctx.metrics.client_connections_closed.value += 1
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.waiting is not None and self.pool is not None:
            self.pool.withdraw(self)
        server = self._detach()
        if server is None:
            return
        if server.scanner.busy:
            server.close()  # mid-reply: its state is unknown
            return
        if self.pin_reason is not None or self.long_data:
            server.needs_reset = server.discard_needed = True
        elif server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            server.needs_reset = True
        server.pool.release(server) if server.pool else server.close()

    def expire(self, reason: str) -> None:
        """Idle timeout or shutdown: MySQL's own goodbye (an ERR with sequence id 0)."""
        self.goodbye(wire.ER_CLIENT_INTERACTION_TIMEOUT, f"terminating connection: {reason}")

    def goodbye(self, error: tuple[int, str], message: str) -> None:
        """Close with an ERR first where the client can read it as one; in the middle of a
        relayed reply, a bare close (which drivers report as a lost connection)."""
        server = self.server
        if server is not None and server.scanner.busy:
            server.hold_reading()  # no more of the reply behind the ERR; on_closed closes it
        self._leave(self._interjection(server), error, message)

    def _leave(self, seq: int | None, error: tuple[int, str], message: str) -> None:
        if self.write_blocked:
            # A client that does not read would keep a graceful close (and the server
            # connection behind it) waiting for it forever: reset it instead.
            self.close_transport(abort=True)
            return
        if seq is not None:
            self.write(wire.packet(seq, wire.err_packet(error, message)))
        self.close_transport()

    def _interjection(self, server: MyServer | None) -> int | None:
        """The sequence id an ERR of the proxy's own takes if written now, or None where it
        cannot go without corrupting what the client reads: inside a packet relayed from
        `server` (the one serving the current command), or while the proxy talks to that
        server itself, or replays a transaction."""
        if not self.busy:
            return 0  # between commands: a goodbye, as servers send it
        if server is None:
            return 1 if self.waiting is not None else None  # waiting to be lent a server
        scanner = server.scanner
        if self.replaying or not server.relaying or not scanner.busy or not scanner.at_boundary:
            return None
        return scanner.seq + 1

    def reply(self, *payloads: bytes, seq: int = 1) -> None:
        """Answer the current command (sequence ids from `seq`)."""
        self.write(b"".join(wire.packet(seq + i, p) for i, p in enumerate(payloads)))

    def reply_error(self, error: tuple[int, str], message: str, *, seq: int = 1) -> None:
        self.reply(wire.err_packet(error, message), seq=seq)

    def ok(self) -> None:
        self.reply(wire.ok_packet(status=self._status()))

    def _status(self) -> int:
        server = self.server
        if server is not None:
            return server.scanner.status
        return wire.SERVER_STATUS_AUTOCOMMIT if self.wanted.get("autocommit") != "0" else 0

    def pin(self, reason: str) -> None:
        self.pin_reason = reason
        self.ctx.metrics.count_pin(reason)
        if self.ctx.config.debug_logging:
            log.info("client %s pinned to its server connection: %s", self.user, reason)

    # -- login --------------------------------------------------------------------------------

    async def _login(self) -> None:
        ctx = self.ctx
        admission = ctx.runtime.admission
        admission.enter(self, self._drop_pending)
        try:
            async with asyncio.timeout(ctx.config.client_login_timeout) as deadline:
                await self._handshake(deadline)
        except LoginRefused as refusal:
            self.write(wire.packet(refusal.seq, wire.err_packet(refusal.error, refusal.message)))
            self.close_transport()
        except wire.ProtocolViolation as error:
            ctx.metrics.client_protocol_errors.value += 1
            self.write(wire.packet(2, wire.err_packet(wire.ER_NET_READ_ERROR, str(error))))
            self.close_transport()
        except TimeoutError:
            limit = ctx.config.client_login_timeout
            message = f"login took too long: client_login_timeout is {limit:g} s"
            self.write(wire.packet(2, wire.err_packet(wire.ER_NET_READ_ERROR, message)))
            self.close_transport()
        except ConnectionClosed:
            self.close_transport()
        except Exception:  # a bug must cost this client only, and say so
            log.exception("login of a client failed unexpectedly")
            self.close_transport()
        finally:
            admission.leave(self)

    def _drop_pending(self, refusal: Refusal) -> None:
        # Sequence id 2 answers a handshake response, 0 comes instead of the greeting.
        error = too_many(2 if self.nonce else 0, refusal)
        self.write(wire.packet(error.seq, wire.err_packet(error.error, error.message)))
        self.close_transport()

    async def _handshake(self, deadline: asyncio.Timeout) -> None:
        ctx = self.ctx
        admission = ctx.runtime.admission
        refusal = admission.refusal()
        if refusal is not None:
            raise too_many(0, refusal)
        self.hold_reading()  # nothing is due from the client before the greeting
        try:
            greeting = await ctx.server_greeting()
        except (OSError, TimeoutError, ServerError, wire.ProtocolViolation) as error:
            raise LoginRefused(0, (2003, "HY000"), f"cannot reach the database: {error}") from None
        finally:
            self.release_reading()
        self.nonce = auth.new_nonce()
        self.connection_id = ctx.new_connection_id(self)
        offered = greeting.capabilities & handshake.PROXY_CAPABILITIES
        self.write(
            wire.packet(
                0,
                handshake.build_greeting(
                    handshake.Greeting(
                        greeting.version,
                        self.connection_id,
                        self.nonce,
                        offered,
                        greeting.charset,
                        wire.SERVER_STATUS_AUTOCOMMIT,
                        ctx.default_plugin,
                    )
                ),
            )
        )
        seq, payload = await self.read(wire.split_login_packet)
        response = handshake.parse_handshake_response(payload)
        if response.ssl_request:
            raise LoginRefused(seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, "TLS is not available")
        if response.capabilities & handshake.CLIENT_COMPRESS:
            raise LoginRefused(
                seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, "compression is not supported by dbmux"
            )
        self.capabilities = response.capabilities & offered
        self.user = response.user
        seq = await self._authenticate(response.user, response.plugin, response.auth_response, seq)
        refusal = admission.admit(self)  # again: others may have logged in meanwhile
        if refusal is not None:
            raise too_many(seq + 1, refusal)
        deadline.reschedule(None)  # proved: no longer a pending login
        database = response.database if self.capabilities & handshake.CLIENT_CONNECT_WITH_DB else ""
        await self._join_pool(database, response.charset, seq + 1)
        self.reply(wire.ok_packet(), seq=seq + 1)
        ctx.metrics.client_connections_setup_succeeded.value += 1
        self.logged_in = True
        self.last_active = ctx.clock.now
        leftover = self.start_relaying()
        if leftover:
            self.relay(leftover)

    async def _authenticate(self, user: str, plugin: str, response: bytes, seq: int) -> int:
        """Check the client's password against the proxy's secret with the user's plugin
        (switching plugins if the client started with another); the last sequence id."""
        ctx = self.ctx
        throttle = ctx.runtime.throttle
        address = source_address(self.transport)
        await throttle.sit_out(self, throttle.before_check(address))
        login = ctx.users.get(user)
        method = ctx.plugin_for(login.auth_type if login else None)
        # Unknown users go through the same exchange, so the reply does not tell who exists.
        password = login.credentials.password if login else secrets.token_hex(16)
        if (plugin or NATIVE) != method:
            if not self.capabilities & handshake.CLIENT_PLUGIN_AUTH:
                raise LoginRefused(
                    seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, f"the client cannot use {method}"
                )
            self.write(wire.packet(seq + 1, handshake.auth_switch_request(method, self.nonce)))
            seq, response = await self.read(wire.split_login_packet)
        if method == NATIVE:
            ok = auth.verify_native(password, self.nonce, response)
        elif auth.verify_sha2(password, self.nonce, response):
            self.write(wire.packet(seq + 1, b"\x01\x03"))  # fast authentication succeeded
            seq += 1
            ok = True
        else:
            ok, seq = await self._full_sha2_auth(password, seq)
        if not ok or login is None:
            ctx.metrics.client_connections_setup_failed_auth.value += 1
            await throttle.sit_out(self, throttle.failed(user, address))
            using = "YES" if response else "NO"
            raise LoginRefused(
                seq + 1,
                wire.ER_ACCESS_DENIED_ERROR,
                f"Access denied for user '{user}'@'{address or '?'}' (using password: {using})",
            )
        return seq

    async def _full_sha2_auth(self, password: str, seq: int) -> tuple[bool, int]:
        """caching_sha2_password full authentication: the client fetches the proxy's RSA key
        and sends its password encrypted (without TLS, a cleartext password is refused)."""
        self.write(wire.packet(seq + 1, b"\x01\x04"))
        seq, data = await self.read(wire.split_login_packet)
        if data != b"\x02":
            return False, seq
        self.write(wire.packet(seq + 1, b"\x01" + self.ctx.rsa_key.public_pem))
        seq, data = await self.read(wire.split_login_packet)
        sent = self.ctx.rsa_key.decrypt_password(data, self.nonce)
        return sent is not None and hmac.compare_digest(sent, password), seq

    async def _join_pool(self, database: str, charset: int, seq: int) -> None:
        """Pick the pool of this (database, user, capabilities, charset); its first client
        checks with a real server connection that the database accepts the login."""
        self.variant = (self.capabilities & handshake.SESSION_CAPABILITIES) | charset << 48
        self.pool = pool = self.ctx.pools.get(database, self.user, self.variant)
        self.schema = database
        if pool.server_facts is None:
            # Nothing is due from the client until the OK: what it sends meanwhile (for up
            # to connection_borrow_timeout) stays in the kernel's buffer, not the proxy's.
            self.hold_reading()
            try:
                pool.server_facts = await self._read_server_facts(pool, seq)
            finally:
                self.release_reading()
        self.reader.limit = command_limit(self.ctx.config.max_command_size, pool.server_facts)

    async def _read_server_facts(self, pool: Lender, seq: int) -> dict[str, str]:
        """A pool's first client checks on a server connection that the database accepts
        the login, and learns what the server allows (max_allowed_packet)."""
        try:
            server = await pool.borrow()
        except BorrowTimeout:
            raise LoginRefused(seq, wire.ER_CON_COUNT_ERROR, borrow_hint(pool)) from None
        except ServerError as error:
            raise LoginRefused(seq, error_of(error), str(error)) from None
        try:
            return await server.read_facts()
        finally:
            pool.release(server)

    # -- commands -----------------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        self.last_active = self._clock.now
        if not self.busy and not self.inbox and not self.reader.partial:
            # The common case: one whole command, sequence id 0, in one chunk.
            n = len(data)
            if (
                n > 4
                and data[3] == 0
                and data[0] | data[1] << 8 | data[2] << 16 == n - 4 < 0xFFFFFF
                and n - 4 <= self.reader.limit
            ):
                self._requests.value += 1
                try:
                    self._command(data[4:], data)
                except wire.ProtocolViolation as error:
                    self._violation(wire.ER_NET_READ_ERROR, str(error))
                return
        if self.upload is not None:
            data = self._upload(data)
            if not data:
                return
        self.inbox += data
        if not self.busy:
            self._next_commands()
        elif len(self.inbox) > INBOX_LIMIT and not self._held:
            self._held = True
            self.hold_reading()

    def _next_commands(self) -> None:
        # A client that does not read our answers gets no more of them (framed.ClientEnd
        # stops reading it too): what it sent waits here until its buffer drains.
        while not self.busy and not self.is_closed and not self.write_blocked:
            try:
                payload = self.reader.take(self.inbox)
            except wire.ProtocolViolation:  # refused on the header, before it is buffered
                limit = self.reader.limit
                self._violation(
                    wire.ER_NET_PACKET_TOO_LARGE,
                    f"Got a packet bigger than max_command_size ({limit} bytes)",
                )
                return
            if payload is None:
                break
            if self.reader.first_seq != 0:
                self._violation(
                    wire.ER_NET_PACKETS_OUT_OF_ORDER,
                    "Got packets out of order (a command with sequence id "
                    f"{self.reader.first_seq})",
                )
                return
            self._requests.value += 1
            try:
                self._command(payload)
            except wire.ProtocolViolation as error:
                self._violation(wire.ER_NET_READ_ERROR, str(error))
                return
        if self._held and not self.busy:
            self._held = False
            self.release_reading()

    def upload_file(self) -> None:
        """The server asks for the file of a LOAD DATA LOCAL (only of a client that offered
        CLIENT_LOCAL_FILES: no other shares its connection). What the client sends is relayed
        as it comes, with the server's backpressure, up to the file's empty last packet; the
        connection stays lent until the server's reply. Bytes already here are the file's."""
        self.upload = wire.UploadScanner()
        if self.replay_log is not None:
            self.replay_log.replayable = False  # the file cannot be asked for again
        if self._held:  # the file must flow whatever the client sent ahead
            self._held = False
            self.release_reading()
        if self.inbox:
            ahead = bytes(self.inbox)
            self.inbox.clear()
            self.inbox += self._upload(ahead)

    def _upload(self, data: bytes) -> bytes:
        """Relay file bytes to the server; return what follows the file (commands)."""
        server = self.server
        assert server is not None and self.upload is not None  # server_lost ends the upload
        end = self.upload.feed(data)
        if end < 0:
            server.transport.write(data)  # type: ignore[union-attr]
            return b""
        self.upload = None
        server.transport.write(data[:end])  # type: ignore[union-attr]
        server.scanner.upload_done()
        return data[end:]

    def on_write_blocked(self, blocked: bool) -> None:
        super().on_write_blocked(blocked)
        if not blocked and self.relaying and not self.busy and self.inbox:
            self._next_commands()

    def _violation(self, error: tuple[int, str], message: str) -> None:
        self.ctx.metrics.client_protocol_errors.value += 1
        self.reply_error(error, message)
        self.close_transport()

    def _command(self, payload: bytes, frame: bytes | None = None) -> None:
        """Serve one command; `frame` is its packet as received, when it was one packet."""
        if not payload:
            raise wire.ProtocolViolation("empty command packet")
        command = payload[0]
        if self.transaction_lost and command not in (wire.COM_QUIT, wire.COM_PING):
            reason, self.transaction_lost = self.transaction_lost, ""
            self.reply_error(
                wire.CR_SERVER_LOST,
                "the server connection of this transaction was lost; the transaction was "
                f"rolled back, run it again ({reason})",
            )
            return
        if command == wire.COM_QUERY:
            self._query(payload, frame)
        elif command in (wire.COM_STMT_EXECUTE, wire.COM_STMT_BULK_EXECUTE):
            self._execute(payload)
        elif command == wire.COM_STMT_PREPARE:
            self._start(self._prepare(payload))
        elif command == wire.COM_STMT_CLOSE:
            self._close_statement(payload)
        elif command == wire.COM_STMT_SEND_LONG_DATA:
            self._send_long_data(payload)
        elif command == wire.COM_STMT_RESET:
            self._reset_statement(payload)
        elif command == wire.COM_STMT_FETCH:
            self._fetch(payload)
        elif command == wire.COM_PING:
            self.ok()
        elif command == wire.COM_QUIT:
            self.close_transport()
        elif command == wire.COM_INIT_DB:
            self.pending_schema = payload[1:].decode(errors="replace")
            self._forward(payload, wire.RESPONSE_SIMPLE)
        elif command == wire.COM_FIELD_LIST:
            self._forward(payload, wire.RESPONSE_FIELDS)
        elif command == wire.COM_STATISTICS:
            self._forward(payload, wire.RESPONSE_STRING)
        elif command == wire.COM_RESET_CONNECTION:
            self._reset_session()
            self.ok()
        elif command == wire.COM_CHANGE_USER:
            self._start(self._change_user(payload))
        elif command == wire.COM_PROCESS_KILL and len(payload) >= 5:
            self._kill(int.from_bytes(payload[1:5], "little"), query=False)
        elif command == wire.COM_SET_OPTION:
            if self.pin_reason is None:
                self.pin(SET_OPTION)
            self._forward(payload, wire.RESPONSE_SIMPLE)
        else:
            self.reply_error(wire.ER_UNKNOWN_COM_ERROR, f"Unknown command 0x{command:02x}")

    def _query(self, payload: bytes, frame: bytes | None = None) -> None:
        kill = find_kill(payload[1:])
        if kill is not None:
            if kill.refusal:
                self.reply_error(ER_NOT_SUPPORTED_YET, kill.refusal)
            else:
                self._kill(kill.connection_id, query=kill.query)
            return
        verdict = self._verdict(payload[1:])
        if verdict is not pinning.NO_STATE:
            self._note(verdict, payload[1:])
        self._forward(payload, wire.RESPONSE_RESULT, frame=frame)

    def _note(self, verdict: pinning.Verdict, text: bytes | None) -> None:
        """What a statement about to run does to the session."""
        if verdict.reason is not None:
            if self.pin_reason is None:
                self.pin(verdict.reason)
            return
        if self.pin_reason is not None:
            return  # its own server connection holds the state: nothing to follow
        aliases = self.ctx.aliases
        system_vars = {aliases.get(name, name) for name in verdict.system_vars}
        names = system_vars | {"@" + name for name in verdict.user_vars}
        if any(not set(name) <= _NAME_CHARS for name in system_vars):
            if self.pin_reason is None:
                self.pin(pinning.UNCLASSIFIED)  # a name the proxy will not put in SQL
            return
        if names:
            memoizable = (
                text is not None
                and not verdict.user_vars
                and not self.touched
                and b"@" not in text
                and b"(" not in text
                and b";" not in text.rstrip(b"; \t\r\n")
            )
            self.memo_text = text if memoizable else None
            self.touched |= names
        self.schema_touched |= verdict.schema
        self.want_insert_id = verdict.last_insert_id

    def _start(self, coro: object) -> None:
        """Serve a command that needs the proxy's own round trips."""
        self.busy = True
        self._task = self.ctx.loop.create_task(self._serve(coro))  # type: ignore[arg-type]

    async def _serve(self, coro: asyncio.Future[None]) -> None:
        try:
            await coro
        except CommandFailed as failure:
            self.reply_error(failure.error, failure.message)
            self._end_command()
        except wire.ProtocolViolation as error:
            self._violation(wire.ER_NET_READ_ERROR, str(error))
        except (ConnectionClosed, OSError) as error:
            self.reply_error(wire.CR_SERVER_LOST, f"lost the server connection: {error}")
            self._end_command()
        except Exception:
            log.exception("a command of client %s failed unexpectedly", self.user)
            self.close_transport()

    # -- borrowing ----------------------------------------------------------------------------

    def _in_step(self, server: MyServer) -> bool:
        return (
            server.applied == self.wanted
            and server.schema == self.schema
            and (not self.want_insert_id or server.insert_id == self.insert_id)
        )

    def _forward(
        self,
        payload: bytes,
        kind: int | None,
        statement: ClientStatement | None = None,
        frame: bytes | None = None,
    ) -> None:
        """Send a command to this session's server connection, borrowing one if needed.
        `kind` is the shape of its reply (None: it has none); a statement command is
        rewritten for the server's statement; `frame` is the packet as the client sent it."""
        self.busy = True
        request = (payload, kind, statement, frame)
        server = self.server
        if server is not None and self.want_insert_id and server.insert_id != self.insert_id:
            # Mid-transaction on a connection whose LAST_INSERT_ID() is another client's.
            self.waiting = request
            self._task = self.ctx.loop.create_task(self._step_then_send(server))
            return
        if server is None:
            pool = self.pool
            assert pool is not None
            server = pool.try_borrow()
            if server is None or not self._in_step(server):
                self.waiting = request
                if server is None:
                    server = pool.request(self)
                if server is not None:
                    self.on_connection(server)
                return
            self._attach(server)
        self._send(server, request)

    def _send(self, server: MyServer, request: Request) -> None:
        self.sent = request
        if self.replay_log is not None:
            self._command_sent(request)
        payload, kind, statement, frame = request
        if statement is not None:
            if statement.text in server.prepared:
                self._send_statement(server, payload, statement, kind)
            else:
                self._start(self._prepare_then_send(payload, statement, kind))
            return
        if kind is not None:
            server.scanner.expect(kind)
        server.transport.write(frame or wire.packet(0, payload))  # type: ignore[union-attr]

    def on_connection(self, conn: MyServer) -> None:  # type: ignore[override]
        """The pool lends us a server: bring it to this session's state, then send."""
        request = self.waiting
        if request is None:  # the client left meanwhile
            conn.pool.release(conn) if conn.pool else conn.close()
            return
        if not self._in_step(conn):
            self._task = self.ctx.loop.create_task(self._step_then_send(conn))
            return
        self.waiting = None
        self._attach(conn)
        self._send(conn, request)

    async def _step_then_send(self, server: MyServer) -> None:
        try:
            await self._bring_in_step(server)
        except ServerError as error:
            if server is not self.server:
                server.pool.release(server) if server.pool else server.close()
            self.on_borrow_failed(error)
            return
        except (ConnectionClosed, OSError) as error:
            server.close()
            self.on_borrow_failed(ServerError(str(error), code="2013"))
            return
        except asyncio.CancelledError:
            server.close()
            raise
        self.on_connection(server)

    async def _bring_in_step(self, server: MyServer) -> None:
        await server.apply_state(self.wanted, self.schema)
        if self.want_insert_id and server.insert_id != self.insert_id:
            await server.query(f"SELECT LAST_INSERT_ID({self.insert_id:d})")
            server.insert_id = self.insert_id

    def on_borrow_failed(self, error: Exception) -> None:
        self.waiting = None
        pool = self.pool
        assert pool is not None
        if isinstance(error, BorrowTimeout):
            self.ctx.metrics.borrow_timeouts.value += 1
            self.reply_error(wire.ER_CON_COUNT_ERROR, borrow_hint(pool))
        elif isinstance(error, ServerError):
            self.reply_error(error_of(error), str(error))
        else:
            self.reply_error(wire.CR_SERVER_LOST, f"no database connection: {error}")
        self._end_command()

    async def _borrow(self) -> MyServer:
        """This session's server connection (borrowed now if it has none), in step."""
        server = self.server
        fresh = server is None
        if server is None:
            pool = self.pool
            assert pool is not None
            try:
                server = await pool.borrow()  # type: ignore[assignment]
            except BorrowTimeout:
                self.ctx.metrics.borrow_timeouts.value += 1
                raise CommandFailed(wire.ER_CON_COUNT_ERROR, borrow_hint(pool)) from None
            except ServerError as error:
                raise CommandFailed(error_of(error), str(error)) from None
            self._attach(server)  # from here on_closed gives it back whatever happens
        assert server is not None
        if not self._in_step(server):
            try:
                await self._bring_in_step(server)
            except ServerError as error:
                if fresh:
                    self._give_back(server)
                raise CommandFailed(error_of(error), str(error)) from None
        return server

    def _attach(self, server: MyServer) -> None:
        self.server = server
        server.client = self

    def _detach(self) -> MyServer | None:
        server = self.server
        if server is None:
            return None
        self.drop_holds(server)
        server.client = None
        self.server = None
        return server

    # -- a write the writer refused as read-only ---------------------------------------------

    def retry_on_next_writer(self, server: MyServer, refusal: bytes) -> bool:
        """The writer refused the command as read-only, before running it: a switchover
        has begun. A command that opened no transaction and is not part of one waits for
        the next writer (up to connection_borrow_timeout) and runs there, once; the client
        sees the refusal only if no new writer comes. True if the refusal is held.
        Either way the targets are probed at once. (On a read-only endpoint the refusal is
        the right answer, and says nothing of the writer.)"""
        if not self.ctx.follows_writer:
            return False
        self.ctx.targets.suspect()
        request = self.sent
        if request is None or request is self.retried or self._holds(server):
            return False
        self.retried = request
        self._give_back(server)
        self._start(self._rerun(request, refusal))
        return True

    async def _rerun(self, request: Request, refusal: bytes) -> None:
        targets = self.ctx.targets
        pool = self.pool
        assert pool is not None
        if not await targets.wait_for_change(targets.generation, pool.timeout):
            self.write(refusal)
            self._end_command()
            return
        self.waiting = request
        server = pool.request(self)
        if server is not None:
            self.on_connection(server)

    # -- replies ------------------------------------------------------------------------------

    def response_done(self, count: int) -> None:
        """The server answered the command: give the connection back at the end of a
        transaction, learning first what the transaction changed in the session."""
        server = self.server
        assert server is not None
        scanner = server.scanner
        if scanner.insert_id:
            self.insert_id = server.insert_id = scanner.insert_id
            scanner.insert_id = 0
        if scanner.failed:
            self.memo_text = None  # a SET that failed changed nothing; do not remember it
        if self.pending_schema is not None:
            if not scanner.failed:
                self.schema = server.schema = self.pending_schema
            self.pending_schema = None
        if self.replay_log is not None:
            if self.replaying:
                self._replayed()
                return
            self._logged(server)
        self._release_if_idle(server)

    def _holds(self, server: MyServer) -> bool:
        """The session must keep this server connection: an open transaction, a pin, or a
        statement's long data waiting there for its execute."""
        return bool(
            server.scanner.status & wire.SERVER_STATUS_IN_TRANS
            or self.pin_reason is not None
            or self.long_data
        )

    def _give_back(self, server: MyServer) -> None:
        self._detach()
        server.pool.release(server)  # type: ignore[union-attr]

    def _release_if_idle(self, server: MyServer) -> None:
        if self._holds(server):
            self._end_command()
            return
        if self.touched or self.schema_touched:
            memo = self.ctx.set_results.get((self.variant, self.memo_text or b""))
            if memo is not None and len(self.touched) == len(memo):
                self._settle(server, memo)
                return
            self._task = self.ctx.loop.create_task(self._learn_state(server))
            return
        self._give_back(server)
        self._end_command()

    def _end_command(self) -> None:
        if self.cancelling is not None:
            self.cancelling.end_cancel()
            self.cancelling = None
        self.busy = False
        self.want_insert_id = False
        if self.inbox and not self.is_closed:
            self._next_commands()
        elif self._held:
            self._held = False
            self.release_reading()

    @property
    def in_flight(self) -> bool:
        return self.busy  # a command is being answered, or waits for a server connection

    async def _learn_state(self, server: MyServer) -> None:
        """Read back the variables and schema the transaction may have changed. The reply
        has been relayed already; the client's next command waits until this is done."""
        readback = state.Readback(sorted(self.touched), self.schema_touched)
        memo_key = (self.variant, self.memo_text) if self.memo_text else None
        try:
            values, schema = await self._read_state(server, readback)
        except Exception as error:
            log.warning("closing client %s: cannot read its session state: %s", self.user, error)
            self._detach()
            server.close()
            # The reply was relayed whole: the ERR stands between commands, as a goodbye.
            self._leave(
                0,
                wire.CR_SERVER_LOST,
                f"Lost the server connection while reading back this session's state ({error})",
            )
            return
        if schema is not None:
            self.schema = server.schema = schema
        if memo_key is not None:
            self.ctx.remember_set(memo_key, values)
        self._settle(server, values)

    async def _read_state(
        self, server: MyServer, readback: state.Readback
    ) -> tuple[dict[str, str | None], str | None]:
        try:
            columns, rows = await server.query(readback.sql)
            return readback.values(columns, rows[0])
        except ServerError:
            pass
        # One of them is no session variable (the SET failed too): read them one by one.
        values: dict[str, str | None] = {}
        for key in readback.keys:
            single = state.Readback([key], False)
            try:
                columns, rows = await server.query(single.sql)
            except ServerError:
                continue
            values.update(single.values(columns, rows[0])[0])
        schema = None
        if readback.schema:
            _, rows = await server.query("SELECT DATABASE()")
            schema = (rows[0][0] or b"").decode(errors="replace")
        return values, schema

    def _settle(self, server: MyServer, values: dict[str, str | None]) -> None:
        """Take the values read back as the session's own; the server now holds them."""
        for key in self.touched:
            value = values.get(key)
            if value is None:
                self.wanted.pop(key, None)
            else:
                self.wanted[key] = value
        self.touched.clear()
        self.schema_touched = False
        self.memo_text = None
        server.applied = dict(self.wanted)
        if len(self.wanted) > MAX_CARRIED_STATE:
            self.pin(SESSION_STATE_SIZE)
        else:
            self._give_back(server)
        self._end_command()

    # -- prepared statements ------------------------------------------------------------------

    async def _prepare(self, payload: bytes) -> None:
        text = payload[1:]
        if find_kill(text) is not None:  # its execute would reach the server as is
            raise CommandFailed(
                ER_NOT_SUPPORTED_YET,
                "KILL and dynamic SQL cannot be prepared through dbmux: they could end server "
                "connections lent to other clients; send KILL <connection id> as a query",
            )
        if (
            len(self.statements) >= MAX_CLIENT_STATEMENTS
            or self.statement_bytes + len(text) > MAX_CLIENT_STATEMENT_BYTES
        ):
            raise CommandFailed(
                wire.ER_MAX_PREPARED_STMT_COUNT_REACHED,
                f"Can't create more than {MAX_CLIENT_STATEMENTS} prepared statements (or "
                f"{MAX_CLIENT_STATEMENT_BYTES >> 20} MiB of their texts) on one connection "
                "through dbmux; close some with COM_STMT_CLOSE",
            )
        verdict = self._verdict(text)
        server = await self._borrow()
        try:
            statement = await server.prepare(text)
        except ServerError as error:
            raise CommandFailed(error_of(error), str(error)) from None
        finally:
            if self.server is server:
                self._release_if_idle_quietly(server)
        statement_id = self.next_statement_id
        self.next_statement_id = statement_id % 0xFFFFFFFE + 1
        self.statements[statement_id] = ClientStatement(text, statement.params, verdict)
        self.statement_bytes += len(text)
        self.last_prepared = statement_id
        first, *rest = statement.reply
        self.reply(wire.with_statement_id(first, statement_id), *rest)
        self._end_command()

    def _release_if_idle_quietly(self, server: MyServer) -> None:
        """Give back a connection borrowed only for the proxy's own work."""
        if not (self._holds(server) or self.touched):
            self._give_back(server)

    def _statement(self, payload: bytes) -> ClientStatement:
        statement_id = wire.statement_id(payload)
        if statement_id == 0xFFFFFFFF:  # MariaDB: the statement prepared last
            statement_id = self.last_prepared
        statement = self.statements.get(statement_id)
        if statement is None:
            raise CommandFailed(
                wire.ER_UNKNOWN_STMT_HANDLER,
                f"Unknown prepared statement handler ({statement_id}) given to dbmux",
            )
        return statement

    def _execute(self, payload: bytes) -> None:
        try:
            statement = self._statement(payload)
        except CommandFailed as failure:
            self.reply_error(failure.error, failure.message)
            return
        if statement.verdict is not pinning.NO_STATE:
            self._note(statement.verdict, None)
        opens_cursor = payload[0] == wire.COM_STMT_EXECUTE and payload[5:6] not in (b"", b"\0")
        if opens_cursor and self.pin_reason is None:
            self.pin(CURSOR)  # COM_STMT_FETCH must reach the same connection
        self._forward(payload, wire.RESPONSE_RESULT, statement)

    async def _prepare_then_send(
        self,
        payload: bytes,
        statement: ClientStatement,
        kind: int | None,
    ) -> None:
        server = await self._borrow()
        try:
            await server.prepare(statement.text)
        except ServerError as error:
            self._release_if_idle_quietly(server)
            raise CommandFailed(error_of(error), str(error)) from None
        self._send_statement(server, payload, statement, kind)

    def _send_statement(
        self, server: MyServer, payload: bytes, statement: ClientStatement, kind: int | None
    ) -> None:
        """Relay a statement command under the server's statement id, with the parameter
        types the server statement needs (it may never have seen this client's)."""
        self.busy = kind is not None
        ours = server.prepared[statement.text]
        server.prepared.move_to_end(statement.text)
        out = wire.with_statement_id(payload, ours.statement_id)
        command = payload[0]
        if statement.params and command == wire.COM_STMT_EXECUTE:
            flag_at, types = wire.execute_types(payload, statement.params)
            if types is not None:
                statement.types = ours.types = types
            elif statement.types is not None and ours.types != statement.types:
                out = wire.with_execute_types(out, flag_at, statement.types)
                ours.types = statement.types
        elif statement.params and command == wire.COM_STMT_BULK_EXECUTE and len(payload) >= 7:
            flags = payload[5] | payload[6] << 8
            if flags & 128:  # SEND_TYPES_TO_SERVER
                statement.types = ours.types = payload[7 : 7 + 2 * statement.params]
            elif statement.types is not None and ours.types != statement.types:
                flags |= 128
                out = out[:5] + bytes((flags & 0xFF, flags >> 8)) + statement.types + out[7:]
                ours.types = statement.types
        if command in (wire.COM_STMT_EXECUTE, wire.COM_STMT_BULK_EXECUTE, wire.COM_STMT_RESET):
            # Only this statement's long data is used up: another's still sits on its own
            # server statement, which other clients share once the connection goes back.
            self.long_data.discard(statement.text)
        if kind is not None:
            server.scanner.expect(kind)
        server.transport.write(wire.packet(0, out))  # type: ignore[union-attr]
        if kind is None:
            self._end_command()

    def _send_long_data(self, payload: bytes) -> None:
        """Long data stays on the server statement until that statement's execute (or reset):
        the session keeps its server connection until then. No reply."""
        try:
            statement = self._statement(payload)
        except CommandFailed:
            return  # the server would ignore it too; the execute reports the error
        self.long_data.add(statement.text)
        self._forward(payload, None, statement)

    def _close_statement(self, payload: bytes) -> None:
        """COM_STMT_CLOSE (no reply). The server statement stays, shared by text; long data
        the client sent for it goes, as it would with the statement on a direct connection."""
        statement = self.statements.pop(wire.statement_id(payload), None)
        if statement is not None:
            self.statement_bytes -= len(statement.text)
        server = self.server
        if statement is None or server is None or statement.text not in self.long_data:
            return
        self.long_data.discard(statement.text)
        self._start(self._drop_long_data(server, statement.text))

    async def _drop_long_data(self, server: MyServer, text: bytes) -> None:
        """Clear long data on a shared server statement (COM_STMT_RESET, the proxy's own
        command), then give the connection back if nothing else holds it."""
        ours = server.prepared.get(text)
        try:
            if ours is not None:  # else evicted from the server, and its long data with it
                reset = bytes((wire.COM_STMT_RESET, 0, 0, 0, 0))
                await server.exchange(
                    wire.with_statement_id(reset, ours.statement_id), wire.RESPONSE_SIMPLE
                )
        except ServerError:
            server.needs_reset = server.discard_needed = True  # reset before anyone uses it
        except (ConnectionClosed, OSError):
            pass  # server_lost has dealt with the session; the close has no reply
        if self.server is server:
            self._release_if_idle(server)
        else:
            self._end_command()

    def _reset_statement(self, payload: bytes) -> None:
        try:
            statement = self._statement(payload)
        except CommandFailed as failure:
            self.reply_error(failure.error, failure.message)
            return
        server = self.server
        if server is not None and statement.text in server.prepared:
            self._send(server, (payload, wire.RESPONSE_SIMPLE, statement, None))
        else:
            self.ok()  # nothing of it sits on any server connection

    def _fetch(self, payload: bytes) -> None:
        try:
            statement = self._statement(payload)
        except CommandFailed as failure:
            self.reply_error(failure.error, failure.message)
            return
        server = self.server
        if server is None or statement.text not in server.prepared:
            self.reply_error(wire.ER_UNKNOWN_STMT_HANDLER, "the statement has no open cursor")
            return
        self._send(server, (payload, wire.RESPONSE_ROWS, statement, None))

    # -- session commands ---------------------------------------------------------------------

    def _reset_session(self) -> None:
        """COM_RESET_CONNECTION: the session starts over (its schema stays, as on a server);
        a connection it held is reset before anyone else uses it."""
        server = self._detach()
        if server is not None:
            server.needs_reset = server.discard_needed = True
            server.pool.release(server) if server.pool else server.close()
        self.wanted = {}
        self.touched.clear()
        self.schema_touched = False
        self.statements.clear()
        self.statement_bytes = 0
        self.insert_id = 0
        self.pin_reason = None
        self.long_data.clear()

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: log in again as another user (checked by the proxy, against the
        connection's nonce), then start over as a new session of that user's pool."""
        change = handshake.parse_change_user(payload, self.capabilities)
        try:
            seq = await self._authenticate(change.user, change.plugin, change.auth_response, 0)
        except LoginRefused as refusal:
            self.reply_error(refusal.error, refusal.message, seq=refusal.seq)
            self.close_transport()
            return
        self._reset_session()
        self.user = change.user
        charset = change.charset if change.charset is not None else self.variant >> 48
        try:
            await self._join_pool(change.database, charset, seq + 1)
        except LoginRefused as refusal:
            self.reply_error(refusal.error, refusal.message, seq=refusal.seq)
            self.close_transport()
            return
        self.reply(wire.ok_packet(), seq=seq + 1)
        self._end_command()

    def _kill(self, connection_id: int, *, query: bool) -> None:
        """KILL [QUERY] names the connection id the proxy gave a client: stop what that
        client runs now, on the server connection it runs on, and never another's."""
        target = self.ctx.sessions.get(connection_id)
        if target is None:
            self.reply_error(wire.ER_NO_SUCH_THREAD, f"Unknown thread id: {connection_id}")
            return
        if target.user != self.user:
            self.reply_error(wire.ER_KILL_DENIED, f"You are not owner of thread {connection_id}")
            return
        server = target.server
        running = server is not None and server.scanner.busy
        if not query and target is not self:
            target.goodbye(wire.ER_CONNECTION_KILLED, "Connection was killed")
        if running:
            # The target's connection is not lent again until the KILL is done, so it
            # cannot stop the query of whoever would borrow it next.
            assert server is not None
            server.begin_cancel()
            self.cancelling = server
            self._forward(b"\x03KILL QUERY %d" % server.thread_id, wire.RESPONSE_SIMPLE)
        elif target is self and not query:
            # As the server answers a connection that kills itself: the ERR is the reply.
            self._leave(1, wire.ER_CONNECTION_KILLED, "Connection was killed")
        else:
            self.ok()

    # -- failures and backpressure ------------------------------------------------------------

    def server_lost(self, server: MyServer) -> None:
        """The server connection died under this client."""
        seq = self._interjection(server)  # where the relayed reply, if any, was cut
        self._detach()
        self.upload = None
        self.ctx.metrics.database_connections_lost.value += 1
        if self.is_closed:
            return
        reason = server.last_error or "the server closed the connection"
        if self.pin_reason is not None or self.long_data:
            # Session state only that connection had: gone, as on a direct connection.
            self._leave(
                seq,
                wire.CR_SERVER_LOST,
                f"Lost the server connection this session was pinned to ({reason}); its "
                "session state is gone",
            )
            return
        if self.replaying:
            self._replay_failed(f"the new server connection was lost too ({reason})")
            return
        if self._replay_after_loss(server, reason):
            return
        if server.scanner.busy and server.relaying:
            if seq is None:  # the reply was cut inside a packet: the stream cannot go on
                self.close_transport()
                return
            self.reply_error(
                wire.CR_SERVER_LOST,
                f"Lost connection to the server during query ({reason}); the transaction "
                "was rolled back",
                seq=seq,
            )
            self.touched.clear()
            self._end_command()
        elif server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            # (Lost during the proxy's own exchange, which its task answers, the same.)
            self.transaction_lost = reason
