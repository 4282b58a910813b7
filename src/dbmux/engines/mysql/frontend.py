"""Client side of the MySQL engine: one command at a time, a server connection borrowed for
each transaction, and the session's state carried from one server connection to the next.

Login (login.py), prepared statements (statements.py), session state (settings.py) and
transaction replay (replay.py) are mixins of the same MyClient, kept in their own modules.

MySQL clients send a command and wait for its reply, so the client is served strictly in
order: while a command is answered, later ones wait in the inbox. A server connection goes
back to the pool when a reply ends with SERVER_STATUS_IN_TRANS clear, unless the session is
pinned or holds long data for a statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from dbmux.engines.base import BorrowTimeout, Lender, PeerUnavailable, ServerError, owner_of
from dbmux.engines.mysql import scanners, wire
from dbmux.engines.mysql.backend import MyServer
from dbmux.engines.mysql.kill import ER_NOT_SUPPORTED_YET, find_kill
from dbmux.engines.mysql.login import LoginMixin, LoginRefused, borrow_hint, error_of, too_many
from dbmux.engines.mysql.pinning import NO_STATE
from dbmux.engines.mysql.replay import ReplayMixin, TransactionLog
from dbmux.engines.mysql.settings import NO_LONG_DATA, NOTHING_TOUCHED, SettingsMixin
from dbmux.engines.mysql.statements import (
    ClientStatement,
    CommandFailed,
    Request,
    StatementsMixin,
)
from dbmux.relay import ConnectionClosed
from dbmux.session import ClientSession, Failure, Leftover

if TYPE_CHECKING:
    from dbmux.engines.mysql.engine import MyContext

log = logging.getLogger("dbmux.mysql")

SET_OPTION = "set_option"  # COM_SET_OPTION changes how the server connection parses
INBOX_LIMIT = 1 << 20  # stop reading a client that sends this much ahead of its replies


class MyClient(
    LoginMixin,
    StatementsMixin,
    SettingsMixin,
    ReplayMixin,
    ClientSession,
):
    """One MySQL client connection."""

    __slots__ = (
        "_after_replay",
        "_clock",
        "_held",
        "_replay_queue",
        "_requests",
        "_timed",
        "_verdict",
        "busy",
        "cancelling",
        "capabilities",
        "connection_id",
        "ctx",
        "insert_id",
        "last_prepared",
        "long_data",
        "memo_text",
        "next_statement_id",
        "nonce",
        "pending_schema",
        "queued",
        "reader",
        "replay_log",
        "replaying",
        "retried",
        "schema",
        "schema_touched",
        "sent",
        "statement_bytes",
        "statements",
        "touched",
        "transaction_lost",
        "upload",
        "variant",
        "want_insert_id",
        "wanted",
    )
    protocol_violation = wire.ProtocolViolation
    server: MyServer | None

    def __init__(self, ctx: MyContext) -> None:
        super().__init__(ctx.runtime)
        self.ctx = ctx
        self.reader = wire.PacketReader()
        self.capabilities = 0
        self.variant = 0
        self.nonce = b""
        self.connection_id = 0
        # Session state: variables as SQL literals (`name` system, `@name` user), schema.
        self.wanted: dict[str, str] = {}
        self.schema = ""
        self.insert_id = 0
        self.touched = NOTHING_TOUCHED  # variables this transaction may have changed
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
        self.long_data = NO_LONG_DATA
        self.busy = False  # a command is being answered
        self.sent: Request | None = None  # the last command sent to a server
        self.retried: Request | None = None  # ...and the last one run again on a new writer
        self.replay_log = TransactionLog() if ctx.config.transaction_replay else None
        self.replaying = False  # running the logged transaction again on a new connection
        self.queued: Request | None = None  # the command `waiting` for a server
        self.transaction_lost = ""  # why, when the server died under an open transaction
        self.cancelling: MyServer | None = None  # whose query our KILL QUERY stops
        self.upload: scanners.UploadScanner | None = None  # a LOAD DATA LOCAL file coming
        self._held = False  # reading paused: too much sent ahead of the replies
        self._clock = ctx.clock
        self._requests = ctx.metrics.query_requests
        self._timed = ctx.metrics.timed
        self._verdict = ctx.classifier.verdict

    # -- lifecycle ----------------------------------------------------------------------------

    def unregister(self) -> None:
        self.ctx.sessions.pop(self.connection_id, None)

    def leftover(self, server: MyServer) -> Leftover:
        if server.scanner.busy:
            return Leftover.UNKNOWN  # mid-reply
        if self.pin_reason is not None or self.long_data:
            return Leftover.SESSION
        if server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            return Leftover.TRANSACTION
        return Leftover.NOTHING

    def fail(self, failure: Failure, text: str, hint: str = "") -> None:
        if failure is Failure.TERMINATED:  # MySQL's own goodbye (an ERR, sequence id 0)
            self.goodbye(wire.ER_CLIENT_INTERACTION_TIMEOUT, text)
        elif failure is Failure.SHUTDOWN:
            self.goodbye(wire.ER_SERVER_SHUTDOWN, f"{text}: {hint}")
        elif failure is Failure.TOO_MANY_CLIENTS:
            # Sequence id 2 answers a handshake response, 0 comes instead of the greeting.
            self.refuse_login(too_many(2 if self.nonce else 0, text, hint))
        elif failure is Failure.INTERNAL:
            self.close_transport()
        else:  # during login: the reply to the handshake response
            message = f"{text}: {hint}" if hint else text
            self.refuse_login(LoginRefused(2, wire.ER_NET_READ_ERROR, message))

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
        if seq is None:
            self.close_transport()
            return
        self.write(wire.packet(seq, wire.err_packet(error, message)))
        self.close_lingering()

    def _interjection(self, server: MyServer | None) -> int | None:
        """The sequence id an ERR of the proxy's own takes if written now, or None where it
        cannot go without corrupting what the client reads: inside a packet relayed from
        `server` (the one serving the current command), or while the proxy talks to that
        server itself, or replays a transaction."""
        if not self.busy:
            return 0  # between commands: a goodbye, as servers send it
        if server is None:
            return 1 if self.waiting else None  # waiting to be lent a server
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

    # -- commands -----------------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        self.last_active = self._clock.now
        if not self.busy and not self.inbox and not self.reader.parts:
            # The common case: one whole command, sequence id 0, in one chunk.
            n = len(data)
            if (
                n > 4
                and data[3] == 0
                and data[0] | data[1] << 8 | data[2] << 16 == n - 4 < 0xFFFFFF
                and n - 4 <= self.reader.limit
            ):
                self._requests.value += 1
                if self._timed:
                    self.request_at = self.sent_at = perf_counter()
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
        # A client that does not read our answers gets no more of them (relay.ClientEnd
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
            if self._timed:
                self.request_at = self.sent_at = perf_counter()
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
        self.upload = scanners.UploadScanner()
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
            server.transport.write(data)
            return b""
        self.upload = None
        server.transport.write(data[:end])
        server.scanner.upload_done()
        return data[end:]

    def on_write_blocked(self, blocked: bool) -> None:
        super().on_write_blocked(blocked)
        if not blocked and self.relaying and not self.busy and self.inbox:
            self._next_commands()

    def _violation(self, error: tuple[int, str], message: str) -> None:
        self.ctx.metrics.client_protocol_errors.value += 1
        self.reply_error(error, message)
        self.close_lingering()

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
        text = payload[1:]
        kill = find_kill(text)
        if kill is not None:
            if kill.refusal:
                self.reply_error(ER_NOT_SUPPORTED_YET, kill.refusal)
            else:
                self._kill(kill.connection_id, query=kill.query)
            return
        if self.ctx.config.debug_logging:
            self.debug_statement(text)
        verdict = self._verdict(text)
        if verdict is not NO_STATE:
            self._note(verdict, text)
        self._forward(payload, wire.RESPONSE_RESULT, frame=frame)

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Serve a command that needs the proxy's own round trips."""
        self.busy = True
        task = self.run_own(self._serve(coro))
        # Cancelled before it started (the client left at once), `coro` never ran: closing
        # it spares the "never awaited" warning. (A finished coroutine ignores close.)
        task.add_done_callback(lambda _: coro.close())

    async def _serve(self, coro: Coroutine[Any, Any, None]) -> None:
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
            self.queued, self.waiting = request, True
            self.run_own(self._step_then_send(server))
            return
        if server is None:
            pool = self.pool
            assert pool is not None
            server = pool.try_borrow()
            if server is None or not self._in_step(server):
                self.queued, self.waiting = request, True
                if server is None:
                    server = pool.request(self)
                if server is not None:
                    self.on_connection(server)
                return
            self.attach(server)
        self._send(server, request)

    def _send(self, server: MyServer, request: Request) -> None:
        self.sent = request
        if self.replay_log is not None:
            self._command_sent(request)
        payload, kind, statement, frame = request
        if statement is not None:
            metrics = self.ctx.metrics
            if statement.text in server.prepared:
                metrics.prepared_statement_cache_hits.value += 1
                self._send_statement(server, payload, statement, kind)
            else:
                metrics.prepared_statement_cache_misses.value += 1
                self._start(self._prepare_then_send(payload, statement, kind))
            return
        if kind is not None:
            server.scanner.expect(kind)
        server.transport.write(frame or wire.packet(0, payload))

    def on_connection(self, conn: MyServer) -> None:
        """The pool lends us a server: bring it to this session's state, then send."""
        request = self.queued
        if request is None:  # the client left meanwhile
            self.give_back(server=conn)
            return
        if not self._in_step(conn):
            self.run_own(self._step_then_send(conn))
            return
        self.queued, self.waiting = None, False
        if self._timed:
            self.sent_at = perf_counter()
        self.attach(conn)
        self._send(conn, request)

    async def _step_then_send(self, server: MyServer) -> None:
        try:
            await self._bring_in_step(server)
        except ServerError as error:
            if server is not self.server:
                self.give_back(server=server)
            self.on_borrow_failed(error)
            return
        except (ConnectionClosed, OSError) as error:
            if server is self.server and server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
                self.transaction_lost = str(error)  # told at the client's next command
            self.give_back(Leftover.UNKNOWN, server)
            self.on_borrow_failed(ServerError(str(error), code="2013"))
            return
        except asyncio.CancelledError:
            self.give_back(Leftover.UNKNOWN, server)
            raise
        self.on_connection(server)

    def refuse_request(
        self, failure: Failure, text: str, hint: str = "", error: ServerError | None = None
    ) -> None:
        self.queued = None
        if error is not None:
            self.reply_error(error_of(error), text)
        elif failure is Failure.BORROW_TIMEOUT:
            self.reply_error(wire.ER_CON_COUNT_ERROR, f"{text}: {hint}")
        else:
            self.reply_error(wire.CR_SERVER_LOST, text)
        self._end_command()

    async def _borrow(self) -> MyServer:
        """This session's server connection (borrowed now if it has none), in step."""
        server = self.server
        fresh = server is None
        if server is None:
            pool = self.pool
            assert pool is not None
            try:
                server = await pool.borrow()
            except BorrowTimeout:
                self.ctx.metrics.borrow_timeouts.value += 1
                raise CommandFailed(wire.ER_CON_COUNT_ERROR, borrow_hint(pool)) from None
            except ServerError as error:
                raise CommandFailed(error_of(error), str(error)) from None
            self.attach(server)  # from here on_closed gives it back whatever happens
        assert server is not None
        if not self._in_step(server):
            try:
                await self._bring_in_step(server)
            except ServerError as error:
                if fresh:
                    self.give_back(server=server)
                raise CommandFailed(error_of(error), str(error)) from None
        return server

    # -- replies ------------------------------------------------------------------------------

    def response_done(self, count: int) -> None:
        """The server answered the command: give the connection back at the end of a
        transaction, learning first what the transaction changed in the session."""
        server = self.server
        assert server is not None
        if self.watched:
            self.answered()
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
        if self._timed:
            self.record_latency()
        self._release_if_idle(server)

    def _holds(self, server: MyServer) -> bool:
        """The session must keep this server connection: an open transaction, a pin, or a
        statement's long data waiting there for its execute."""
        return bool(
            server.scanner.status & wire.SERVER_STATUS_IN_TRANS
            or self.pin_reason is not None
            or self.long_data
        )

    def _release_if_idle(self, server: MyServer) -> None:
        if self._holds(server):
            self._end_command()
            return
        if self.touched or self.schema_touched:
            memo = self.ctx.set_results.outcome(self.variant, self.memo_text or b"")
            if memo is not None and len(self.touched) == len(memo):
                self._settle(server, memo)
                return
            self.run_own(self._learn_state(server))
            return
        self.give_back(server=server)
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

    @property
    def in_transaction(self) -> bool:
        server = self.server
        return bool(self.long_data) or (
            server is not None and bool(server.scanner.status & wire.SERVER_STATUS_IN_TRANS)
        )

    # -- KILL ---------------------------------------------------------------------------------

    def _kill(self, connection_id: int, *, query: bool) -> None:
        """KILL [QUERY] names the connection id the proxy gave a client: stop what that
        client runs now, on the server connection it runs on, and never another's. A client
        of another worker is that worker's to stop."""
        runtime = self.ctx.runtime
        owner = owner_of(connection_id)
        if runtime.peers is not None and owner != runtime.worker:
            self._start(self._kill_elsewhere(owner, connection_id, query))
            return
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
            self._start(self._stop_query(server.thread_id))
        elif target is self and not query:
            # As the server answers a connection that kills itself: the ERR is the reply.
            self._leave(1, wire.ER_CONNECTION_KILLED, "Connection was killed")
        else:
            self.ok()

    async def _kill_elsewhere(self, owner: int, connection_id: int, query: bool) -> None:
        runtime = self.ctx.runtime
        assert runtime.peers is not None
        request = ("kill", connection_id, self.user, query)
        try:
            refusal = await runtime.peers.ask(owner, runtime.config.name, request)
        except PeerUnavailable as error:  # restarting, or busy past the wait for an answer
            refusal = (
                wire.ER_NO_SUCH_THREAD,
                f"Unknown thread id: {connection_id} (the worker owning it did not answer: "
                f"{error})",
            )
        if refusal is not None:
            raise CommandFailed(*refusal)
        self.ok()
        self._end_command()

    async def killed(self, *, query: bool) -> None:
        """A client of another worker KILLed this one (with `query`, only what it runs)."""
        server = self.server
        running = server is not None and server.scanner.busy
        if not query:
            self.goodbye(wire.ER_CONNECTION_KILLED, "Connection was killed")
        if running and self.pool is not None:
            assert server is not None
            server.begin_cancel()  # not lent again before the KILL is done
            try:
                await stop_query_on(self.pool, server.thread_id)
            finally:
                server.end_cancel()

    async def _stop_query(self, thread_id: int) -> None:
        """KILL QUERY on the target's server connection, sent from one of ours. A killed
        client's own server connection may be closed first (it was mid-reply): then the
        server has nothing left to stop, and the KILL has done what was asked."""
        server = await self._borrow()
        try:
            await server.query(f"KILL QUERY {thread_id:d}")
        except ServerError as error:
            if error.code != str(wire.ER_NO_SUCH_THREAD[0]):
                raise CommandFailed(error_of(error), str(error)) from None
        finally:
            if self.server is server:
                self._release_if_idle_quietly(server)
        self.ok()
        self._end_command()

    # -- failures and backpressure ------------------------------------------------------------

    def server_lost(self, server: MyServer) -> None:
        """The server connection died under this client."""
        seq = self._interjection(server)  # where the relayed reply, if any, was cut
        self.detach()
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
            self.touched = NOTHING_TOUCHED
            self._end_command()
        elif server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            # (Lost during the proxy's own exchange, which its task answers, the same.)
            self.transaction_lost = reason


async def stop_query_on(lender: Lender, thread_id: int) -> None:
    """KILL QUERY `thread_id` through a connection borrowed from `lender` (a thread that is
    gone has nothing left to stop)."""
    server: MyServer = await lender.borrow()
    try:
        await server.query(f"KILL QUERY {thread_id:d}")
    except ServerError as error:
        if error.code != str(wire.ER_NO_SUCH_THREAD[0]):
            raise
    finally:
        lender.release(server)
