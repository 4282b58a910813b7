"""Client side of the PostgreSQL engine: the per-transaction relay and borrowing.

Login (login.py), named statements (statements.py) and settings replay (settings.py) are
mixins of the same PgClient, kept in their own modules.

A client borrows a server connection when it sends a request and gives it back when the
server reports ReadyForQuery with status idle and nothing the client sent is still unanswered;
a session that gained state the proxy cannot carry is pinned to its connection instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from dbmux.engines.base import ServerError, owner_of
from dbmux.engines.postgres import scanners, wire
from dbmux.engines.postgres.backend import PgServer, send_cancel
from dbmux.engines.postgres.login import LoginMixin
from dbmux.engines.postgres.pinning import DISCARD, PREPARED_STATEMENT
from dbmux.engines.postgres.replay import rerunnable, rerunnable_messages
from dbmux.engines.postgres.settings import NO_LOGIN_SETTINGS, NO_SETTINGS, SettingsMixin
from dbmux.engines.postgres.statements import StatementsMixin
from dbmux.session import ClientSession, Failure, Leftover

if TYPE_CHECKING:
    from dbmux.engines.postgres.engine import PgContext

log = logging.getLogger("dbmux.postgres")

# SQLSTATE of each failure the session reports (see dbmux.session.Failure).
FAILURE_CODES = {
    Failure.TOO_MANY_CLIENTS: "53300",
    Failure.LOGIN_TIMEOUT: "08P01",
    Failure.PROTOCOL_VIOLATION: "08P01",
    Failure.INTERNAL: "XX000",
    Failure.TERMINATED: "57P01",
    Failure.SHUTDOWN: "57P01",  # admin_shutdown
    Failure.BORROW_TIMEOUT: "53300",
    Failure.NO_SERVER: "08006",
}


class PgClient(LoginMixin, StatementsMixin, SettingsMixin, ClientSession):
    """One client connection."""

    __slots__ = (
        "_classifier",
        "_clock",
        "_held_for_wait",
        "_requests",
        "_timed",
        "_whole",
        "channel_binding",
        "ctx",
        "errors_at_attach",
        "expose_names",
        "forget_server_statements",
        "key",
        "last_queue",
        "last_sent",
        "login_settings",
        "lost_reason",
        "outstanding",
        "parsed_settings",
        "pending",
        "pending_syncs",
        "pid_bytes",
        "queue",
        "queue_syncs",
        "refusing",
        "resets",
        "rewriting",
        "scanner",
        "server_params_changed",
        "set_texts",
        "shared_seen",
        "statements",
        "touched",
        "transaction_lost",
        "tx_status",
        "unmemoizable",
        "wanted",
    )
    protocol_violation = wire.ProtocolViolation
    server: PgServer | None

    def __init__(self, ctx: PgContext) -> None:
        super().__init__(ctx.runtime)
        self.ctx = ctx
        self.scanner = scanners.FrontendScanner()
        self.outstanding = 0  # requests sent to the server and not yet answered by ReadyForQuery
        self.tx_status = wire.IDLE
        self.wanted: dict[str, str] = {}  # this session's settings that differ from defaults
        self.pending: list[bytes] = []  # bytes waiting for a server connection
        # What was last relayed to a server, for transaction_replay: bytes, or (named
        # statements) the queue of messages before their names were mapped.
        self.last_sent = b""
        self.last_queue: Sequence[tuple[int, bytes]] = ()
        self.pending_syncs = 0
        # (`waiting` also covers bringing a server's settings to ours.)
        self._held_for_wait = False  # reading paused because more came while waiting
        self.server_params_changed = False
        # Named prepared statements: once the client uses them, its messages are read whole
        # and its statement names mapped to statements shared on each server connection.
        self.rewriting = False
        self._whole = bytearray()  # an unfinished message, in rewriting mode
        self.queue: list[tuple[int, bytes]] = []  # messages waiting for a server / prepare
        self.queue_syncs = 0
        self.forget_server_statements = False
        self.expose_names = False  # pinned by SQL that names the client's statements
        # Shared statements this client ever parsed (made at its first named statement).
        self.shared_seen: set[bytes] | None = None
        self.statements: dict[bytes, tuple[bytes, bytes]] = {}  # name -> (proxy name, text)
        # Settings each parsed statement changes when executed (b"" is the unnamed one).
        self.parsed_settings: dict[bytes, frozenset[str]] = {}
        # Settings this transaction SET or RESET (replay); immutable, so that the many
        # sessions that never SET anything share one empty set.
        self.touched = NO_SETTINGS
        self.set_texts: tuple[bytes, ...] = ()  # the SET statements behind `touched`...
        self.unmemoizable = False  # ...unless some came from elsewhere (see _memo_key)
        self.errors_at_attach = 0
        self.login_settings = NO_LOGIN_SETTINGS
        self.resets = NO_SETTINGS  # settings RESET in this transaction
        self.transaction_lost = False  # the server died while the client sat in a transaction
        # An error was sent (or is owed, when transaction_lost); ReadyForQuery follows at the
        # next Sync.
        self.refusing = False
        self.lost_reason = ""
        # Bound once: the relay reads them for every chunk.
        self._clock = ctx.clock
        self._requests = ctx.metrics.query_requests
        self._timed = ctx.metrics.timed
        self._classifier = ctx.classifier  # (not its bound methods: 128 bytes per client)
        self.key = (0, 0)
        self.pid_bytes = b"\0\0\0\0"  # the process id this client was given, as sent
        # tls-server-end-point of the proxy's certificate, when the client is on TLS
        self.channel_binding: bytes | None = None

    # -- connection lifecycle ---------------------------------------------------------------

    def unregister(self) -> None:
        self.ctx.cancel_keys.pop(self.key, None)

    def leftover(self, server: PgServer) -> Leftover:
        scanner = self.scanner
        if self.outstanding > 0:  # the database would finish work nobody waits for
            return Leftover.RUNNING
        if scanner.last_kind not in wire.SYNCING_TYPES or scanner.mid_message:
            return Leftover.UNKNOWN  # Parse/Bind/... with no Sync, or half a message
        if self.pin_reason is not None:
            return Leftover.SESSION
        return Leftover.TRANSACTION if self.tx_status != wire.IDLE else Leftover.NOTHING

    def cancel(self, server: PgServer) -> None:
        cancel_server(server)

    def fail(self, failure: Failure, text: str, hint: str = "") -> None:
        if failure is Failure.PROTOCOL_VIOLATION:
            text = f"protocol violation: {text}"
        self.fatal(FAILURE_CODES[failure], text, hint=hint)

    def fatal(self, code: str, text: str, *, hint: str = "") -> None:
        """Send FATAL and close: the client's own fault or a refusal. Only at a message
        boundary: in the middle of a server message being relayed, the client would read
        the error as the rest of that message, so it is closed without one."""
        server = self.server
        if server is not None and server.scanner.mid_message:
            self.close_transport(abort=True)
            return
        self.write(wire.error_response(code, text, severity="FATAL", hint=hint))
        self.close_lingering()

    def _forward_cancel(self, process_id: int, secret_key: int) -> None:
        """Cancel what the named client runs right now, on the server it runs on, only; a
        client of another worker is that worker's to cancel."""
        runtime = self.ctx.runtime
        owner = owner_of(process_id)
        if runtime.peers is None or owner == runtime.worker:
            cancel_client(self.ctx, process_id, secret_key)
        else:
            runtime.peers.tell(owner, runtime.config.name, ("cancel", process_id, secret_key))

    # -- relay: client to server (hot path) --------------------------------------------

    def relay(self, data: bytes) -> None:
        if self.rewriting:
            self._relay_messages(data)
            return
        scanner = self.scanner
        try:
            data = scanner.feed(data)
        except wire.ProtocolViolation as error:
            self.ctx.metrics.client_protocol_errors.value += 1
            self.fail(Failure.PROTOCOL_VIOLATION, str(error))
            return
        self.last_active = self._clock.now
        if scanner.statements:
            self._inspect(scanner.statements)
            scanner.statements.clear()
        if scanner.terminated:
            self.close_transport()  # the server stays ours until on_closed
        if self.refusing:
            self._continue_refusal(scanner.syncs)
        elif data:
            self._send_raw(data, scanner.syncs)
        diverted = scanner.diverted
        if diverted is not None:
            # The client names a statement: from now on its names are the proxy's to map,
            # and its messages are read whole.
            scanner.diverted = None
            self._start_rewriting()
            self._relay_messages(diverted)

    def _send_raw(self, data: bytes, syncs: int) -> None:
        """Relay scanned bytes to our server, borrowing one first if needed."""
        self._requests.value += syncs
        if self._timed:
            self.arrived()
        server = self.server
        if server is not None:
            self.outstanding += syncs
            server.scanner.answer = 0
            self.last_sent = data
            server.transport.write(data)
            return
        pool = self.pool
        assert pool is not None  # set at login, before the relay starts
        if not self.pending and not self.waiting:
            server = pool.try_borrow()
            if server is not None and server.applied == self.wanted:
                self.attach(server)
                self.outstanding += syncs
                server.scanner.answer = 0
                self.last_sent = data
                server.transport.write(data)
                return
        self.pending.append(data)
        self.pending_syncs += syncs
        if self.waiting:
            # More arrives while we wait: stop reading until served. (Not before: one
            # request and a wait is the common case, and pausing costs two syscalls.)
            if not self._held_for_wait:
                self._held_for_wait = True
                self.hold_reading()
            return
        self.waiting = True
        if server is None:
            server = pool.request(self)
        if server is not None:
            self.on_connection(server)

    def _start_rewriting(self) -> None:
        """Switch to whole messages with names mapped. What waited for a server is read again
        as messages; what was relayed already is answered first, so the plan of the server's
        answers starts with it."""
        self.rewriting = True
        if self.pending:
            self._whole += b"".join(self.pending)
            self.pending.clear()
            self.pending_syncs = 0
        server = self.server
        if server is not None:
            scanner = self.scanner
            server.scanner.plan = scanners.ReplyPlan(
                server.prepared,
                self.statements,
                groups_in_flight=self.outstanding,
                open_parses=scanner.open_parses,
                open_closes=scanner.open_closes,
            )

    def _inspect(self, messages: list[tuple[int, bytes]]) -> None:
        """Pin the session when a statement leaves state the proxy cannot carry; note the
        settings it changes. A prepared statement changes them when it is executed (Bind),
        not when it is parsed, so with named statements the note waits for the Bind."""
        classifier = self._classifier
        if self.ctx.config.debug_logging:
            for kind, body in messages:
                if kind != 66:  # Query: text; Parse: name, text
                    text = body.partition(b"\0")[2] if kind == 80 else body
                    self.debug_statement(text.partition(b"\0")[0])
        for kind, body in messages:
            if kind == 66:  # Bind: portal, statement
                name = wire.bound_statement(body)
                settings = self.parsed_settings.get(name) if name else None
                if settings:
                    self.touched |= settings
                    self.unmemoizable = True
                continue
            if kind == 81:  # Query: text\0
                verdict = classifier.verdict(body)
            else:  # Parse: name\0 text\0 ...
                verdict = classifier.parse_verdict(body)
                if self.rewriting and verdict.reason is None:
                    name_end = body.find(b"\0")
                    if verdict.settings:
                        self.parsed_settings[body[:name_end]] = verdict.settings
                    else:
                        self.parsed_settings.pop(body[:name_end], None)
                    continue
            if verdict.reason is not None:
                if verdict.reason in (PREPARED_STATEMENT, DISCARD) and self.rewriting:
                    self._statements_dropped(body)
                if self.pin_reason is None:
                    self.pin(verdict.reason)
            elif verdict.settings and self.pin_reason is None:  # (pinned: nothing to carry)
                self.touched |= verdict.settings
                if verdict.resets and self.login_settings:
                    self.resets |= verdict.resets
                    self.unmemoizable = True  # the outcome depends on this client's login
                elif kind == 81 and verdict.memoizable and self.tx_status == wire.IDLE:
                    self.set_texts += (body,)
                else:
                    self.unmemoizable = True

    def on_connection(self, server: PgServer) -> None:
        """The pool lends us a server: bring its settings to ours if needed, then relay
        what waited."""
        if server.applied != self.wanted:
            self.run_own(self._apply_settings(server))
            return
        self.waiting = False
        if self._timed:
            self.sent_at = perf_counter()
        self.attach(server)
        if self.rewriting:
            self._send_queue()
            self._stop_holding_for_wait()
            return
        self.outstanding += self.pending_syncs
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_syncs = 0
        server.scanner.answer = 0
        self.last_sent = data
        server.transport.write(data)
        self._stop_holding_for_wait()

    def arrived(self) -> None:
        """A request arrives: its clock starts, unless an earlier one is still in flight
        (requests sent back to back are timed as one, up to the last answer)."""
        if not self.outstanding and not self.waiting:
            self.request_at = self.sent_at = perf_counter()

    def _stop_holding_for_wait(self) -> None:
        if self._held_for_wait:
            self._held_for_wait = False
            self.release_reading()

    def refuse_request(
        self, failure: Failure, text: str, hint: str = "", error: ServerError | None = None
    ) -> None:
        code = (error.code or "08006") if error is not None else FAILURE_CODES[failure]
        self._refuse_pending(code, text, hint)

    async def _apply_settings(self, server: PgServer) -> None:
        pool = self.pool
        assert pool is not None
        try:
            await server.apply_settings(self.wanted, pool.server_facts or {})
        except ServerError as error:
            self.give_back(server=server)
            self.on_borrow_failed(error)
            return
        except asyncio.CancelledError:
            self.give_back(Leftover.UNKNOWN, server)
            raise
        server.applied = dict(self.wanted)
        self.on_connection(server)

    @property
    def _has_waiting_requests(self) -> bool:
        return bool(self.pending or self.queue)

    def _refuse_pending(self, code: str, text: str, hint: str = "") -> None:
        """Answer the waiting request with an error; the client keeps its connection."""
        syncs = self.pending_syncs + self.queue_syncs
        self.pending.clear()
        self.pending_syncs = 0
        self.queue = []
        self.queue_syncs = 0
        self._refuse(code, text, hint, syncs)
        self._stop_holding_for_wait()

    def _refuse(self, code: str, text: str, hint: str, syncs: int, detail: str = "") -> None:
        """ErrorResponse now, then ReadyForQuery for each Sync or Query as it arrives: the
        server's own discard-until-Sync rule, so drivers stay in step."""
        error = wire.error_response(code, text, detail=detail, hint=hint)
        self.write(error + wire.ready_for_query() * syncs)
        self.refusing = syncs == 0

    def _continue_refusal(self, syncs: int) -> None:
        if self.transaction_lost:
            self.transaction_lost = False
            self._refuse(
                "08006",
                "the server connection of this transaction was lost",
                "the transaction was rolled back; run it again",
                syncs,
                detail=self.lost_reason,
            )
        elif syncs:
            self.refusing = False
            self.write(wire.ready_for_query() * syncs)

    # (ClientSession's methods called by name, not through super(), which builds an object
    # per call: both run once per transaction.)
    def attach(self, server: PgServer) -> None:
        ClientSession.attach(self, server)
        self.errors_at_attach = server.scanner.errors
        owners = self.ctx.session_ids
        owners[server.pid_bytes] = self.pid_bytes
        server.scanner.pid_map = owners
        if self.rewriting:
            server.scanner.plan = scanners.ReplyPlan(server.prepared, self.statements)

    def detach(self) -> PgServer | None:
        server: PgServer | None = ClientSession.detach(self)
        if server is not None:
            server.scanner.plan = None
        return server

    # -- relay: server to client -----------------------------------------------------------

    def server_ready(self, count: int, status: int) -> None:
        """The server answered `count` requests; give it back at the end of a transaction."""
        self.outstanding -= count
        self.tx_status = status
        if self._timed and self.outstanding == 0:
            self._latency.observe(self.request_at, self.sent_at)  # (record_latency, inlined)
        if self.watched:
            self.answered()
        if self.forget_server_statements:
            # SQL about prepared statements ran: what the connection holds is unknown
            # until DISCARD ALL clears it (the session is pinned).
            self.forget_server_statements = False
            server = self.server
            assert server is not None
            server.prepared.clear()
            server.statements_unknown = True
        if self.outstanding > 0 or status != wire.IDLE or self.pin_reason is not None:
            return
        scanner = self.scanner
        if scanner.mid_message or scanner.last_kind not in wire.SYNCING_TYPES:
            return  # more of the client's batch is on its way to this server
        if self.touched or self.server_params_changed:
            server = self.detach()
            assert server is not None  # it is the one that answered
            self._follow_settings(server)
            return
        self.give_back()

    def _flush_pending(self) -> None:
        """Send what waited through the normal borrow path."""
        if self._has_waiting_requests and not self.waiting:
            self.waiting = True
            assert self.pool is not None
            server = self.pool.request(self)
            if server is not None:
                self.on_connection(server)

    def server_lost(self, server: PgServer) -> None:
        """The server connection died under this client."""
        if server.scanner.plan is not None:
            server.scanner.plan.lost()  # names it was parsing were never created
        self.detach()
        self.ctx.metrics.database_connections_lost.value += 1
        if self.is_closed:
            return
        if server.scanner.mid_message:  # the client holds part of a message: no error fits
            self.close_transport(abort=True)
            return
        if self.pin_reason is not None or self.scanner.mid_message:
            why = f"session state ({self.pin_reason})" if self.pin_reason else "a partial message"
            self.fatal("08006", f"the server connection was lost and {why} cannot be recovered")
            return
        if self.ctx.config.transaction_replay and self._rerun_read(server):
            return
        # Messages after the last Sync (Parse/Describe/Flush, say) wait for an answer too,
        # unless the server had answered them in full: then the client goes on with its
        # batch and hears of the loss at its next Sync, as it would from the server itself.
        # (A notice such as "terminating connection because of crash of another server
        # process" is no answer.)
        unsynced = self.scanner.last_kind not in wire.SYNCING_TYPES
        if unsynced and self._answered(server):
            self.transaction_lost = self.refusing = True
            self.lost_reason = server.last_error
        elif self.outstanding > 0 or unsynced:
            self.write(
                wire.error_response(
                    "08006",
                    "the server connection was lost during the request",
                    detail=server.last_error,
                    hint="the transaction was rolled back; run it again",
                )
                + wire.ready_for_query() * self.outstanding
            )
            self.refusing = unsynced
        elif self.tx_status != wire.IDLE:
            self.transaction_lost = self.refusing = True
            self.lost_reason = server.last_error
        self.outstanding = 0
        self.tx_status = wire.IDLE

    def _answered(self, server: PgServer) -> bool:
        """Nothing the client sent is still unanswered: every Sync was, and the server's last
        answer is the kind that ends the answer to the last message relayed (a Flush-ended
        batch: asyncpg's Parse/Describe/Flush)."""
        if self.outstanding:
            return False
        scanner = self.scanner
        if scanner.last_kind in wire.SYNCING_TYPES:
            return True
        return server.scanner.answer in wire.LAST_REPLY.get(scanner.asked, b"")

    def _rerun_read(self, server: PgServer) -> bool:
        """transaction_replay: the one request in flight, outside a transaction, is a read
        the server answered nothing of; it goes to the next server connection (the next
        writer's, after a failover) instead of failing. True if it did."""
        if self.outstanding != 1 or self.tx_status != wire.IDLE or server.scanner.answer:
            return False
        if self.rewriting:  # named statements: the queue runs again, prepared where missing
            prepared = {
                name: rest[: rest.find(b"\0")] for name, (_, rest) in self.statements.items()
            }
            if self.queue or not rerunnable_messages(self.last_queue, prepared):
                return False
            self.queue, self.queue_syncs = list(self.last_queue), 1
        else:
            if self.pending or not rerunnable(self.last_sent):
                return False
            self.pending, self.pending_syncs = [self.last_sent], 1
        self.ctx.metrics.transaction_replays.value += 1
        self.outstanding = 0
        self._flush_pending()
        return True

    @property
    def in_flight(self) -> bool:
        return self.outstanding > 0 or self.waiting  # sent and unanswered, or queued

    @property
    def in_transaction(self) -> bool:
        scanner = self.scanner
        return (
            self.tx_status != wire.IDLE
            or scanner.mid_message
            or scanner.last_kind not in wire.SYNCING_TYPES
        )


def cancel_client(ctx: PgContext, process_id: int, secret_key: int) -> None:
    """Cancel what the client with this BackendKeyData runs now, if it runs anything."""
    target = ctx.cancel_keys.get((process_id, secret_key))
    if target is not None and target.server is not None:
        cancel_server(target.server)


def cancel_server(server: PgServer) -> None:
    """Send a CancelRequest for whatever `server` runs. The connection is not lent again until
    the database has acted on it (see Pool.release), so it cannot hit a later borrower."""
    if server.process_id == 0:
        return
    server.begin_cancel()

    async def deliver() -> None:
        try:
            await send_cancel(
                server.host, server.port, server.process_id, server.secret_key, server.target_tls
            )
        except OSError as error:
            log.info("could not deliver a cancel request: %s", error)
        finally:
            server.end_cancel()

    asyncio.get_running_loop().create_task(deliver())
