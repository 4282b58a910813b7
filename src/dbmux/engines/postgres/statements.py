"""Named prepared statements for a PostgreSQL client: its statement names map to statements
shared per server connection by text, prepared lazily where the client borrows."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dbmux.engines.postgres import scanners, wire
from dbmux.session import ClientSession

if TYPE_CHECKING:
    from dbmux.engines.base import Clock
    from dbmux.engines.postgres.backend import PgServer
    from dbmux.engines.postgres.engine import PgContext
    from dbmux.metrics import ProxyMetrics

_DROPS_ALL = re.compile(rb"(?i)\b(?:deallocate\s+(?:prepare\s+)?all|discard\s+all)\b")
CLOSED_STATEMENT = b"dbmux_closed"  # never created: closing it only yields CloseComplete
UNKNOWN_STATEMENT = b"dbmux_unknown"  # never created: the server answers 26000
MAX_CLIENT_STATEMENTS = 10_000  # named statements one client may hold at once


class StatementsMixin(ClientSession):
    """PgClient's relay for sessions that use named statements: whole messages, names mapped."""

    if not TYPE_CHECKING:  # the slots are PgClient's (mypy would look for them here)
        __slots__ = ()

    _clock: Clock
    _held_for_wait: bool
    _requests: Any  # the query_requests counter (engines see the metrics through ctx only)
    _timed: bool  # the latency histograms are on
    _whole: bytearray
    ctx: PgContext
    expose_names: bool
    forget_server_statements: bool
    last_queue: Sequence[tuple[int, bytes]]
    outstanding: int
    parsed_settings: dict[bytes, frozenset[str]]
    queue: list[tuple[int, bytes]]
    queue_syncs: int
    refusing: bool
    scanner: scanners.FrontendScanner
    server: PgServer | None
    shared_seen: set[bytes] | None
    statements: dict[bytes, tuple[bytes, bytes]]
    tx_status: int

    if TYPE_CHECKING:  # provided by PgClient and the classes it mixes in

        def _answered(self, server: PgServer) -> bool: ...
        def arrived(self) -> None: ...
        def _continue_refusal(self, syncs: int) -> None: ...
        def fatal(self, code: str, text: str, *, hint: str = "") -> None: ...
        def _inspect(self, messages: list[tuple[int, bytes]]) -> None: ...

    def _relay_messages(self, data: bytes) -> None:
        """The relay for sessions with named statements: whole messages, names mapped."""
        self._whole += data
        try:
            messages, syncs = wire.take_messages(self._whole)
        except wire.ProtocolViolation as error:
            self.ctx.metrics.client_protocol_errors.value += 1
            self.fatal("08P01", f"protocol violation: {error}")
            return
        self.last_active = self._clock.now
        for i, (kind, _) in enumerate(messages):
            if kind == 88:  # Terminate: relay what came before it
                del messages[i:]
                self.close_transport()
                break
        inspected = [(kind, body) for kind, body in messages if kind in (66, 80, 81)]
        if inspected:
            if self._too_many_statements(inspected):
                return
            self._inspect(inspected)
        if self.refusing:
            self._continue_refusal(syncs)
            return
        if not messages:
            return
        self._requests.value += syncs
        if self._timed:
            self.arrived()
        self.queue += messages
        self.queue_syncs += syncs
        self._send_queue()

    def _too_many_statements(self, messages: list[tuple[int, bytes]]) -> bool:
        """Each client name costs the proxy memory whatever the server holds: a session
        that would keep more than MAX_CLIENT_STATEMENTS is ended (53400), as a server ends
        one that exhausts its memory, rather than let one client grow the proxy without
        bound."""
        names = {body[: body.find(b"\0")] for kind, body in messages if kind == 80 and body[0]}
        if not names:
            return False
        if len(self.statements) + len(names - self.statements.keys()) <= MAX_CLIENT_STATEMENTS:
            return False
        self.fatal(
            "53400",
            f"this session holds more than {MAX_CLIENT_STATEMENTS} prepared statements",
            hint="close statements the session no longer uses",
        )
        return True

    def _send_queue(self) -> None:
        """Relay the queued messages to our server, with the statements they use slipped in
        where the server lacks them (borrowing a server first if needed)."""
        server = self.server
        if server is None:
            if not self.waiting:
                self.waiting = True
                assert self.pool is not None
                server = self.pool.request(self)
                if server is not None:
                    self.on_connection(server)
            elif not self._held_for_wait:
                self._held_for_wait = True
                self.hold_reading()
            return
        if self.queue and self.queue[0][0] == 80 and self._answered(server):
            self._refuse_taken_names()  # nothing is in flight: the answers stay in order
        if not self.queue:
            return
        out = self._map_names(server)
        scanner = self.scanner
        for kind, _ in self.queue:
            if kind not in wire.COPY_TYPES:
                scanner.last_kind = kind
                if kind != wire.FLUSH:
                    scanner.asked = kind
        self.outstanding += self.queue_syncs
        self.last_queue = self.queue
        self.queue = []
        self.queue_syncs = 0
        server.scanner.answer = 0
        server.transport.write(out)

    def _refuse_taken_names(self) -> None:
        """Requests that open with a Parse under a name the client already uses fail as on
        the server, with the client's own name in the message: answered here, in one pass
        over the queue however many such requests a client pipelines. (In a transaction the
        server must see the error too.)"""
        queue, statements = self.queue, self.statements
        start, end = 0, len(queue)
        while start < end and self.tx_status == wire.IDLE:
            kind, body = queue[start]
            name = body[: max(body.find(b"\0"), 0)] if kind == 80 else b""
            if not name or name not in statements:
                break
            text = f'prepared statement "{name.decode(errors="replace")}" already exists'
            self.write(wire.error_response("42P05", text))
            # The server would now skip everything up to the next Sync.
            start += 1
            while start < end and queue[start][0] not in wire.SYNCING_TYPES:
                start += 1
            if start == end:
                self.refusing = True
                break
            start += 1
            self.queue_syncs -= 1
            self.write(wire.ready_for_query())
        del queue[:start]

    def _proxy_name(self, rest: bytes) -> bytes:
        """The shared name of a statement text (query and parameter types)."""
        return self.ctx.statement_names.name(rest)

    def _map_names(self, server: PgServer) -> bytes:
        """The queue as the server must see it (see _Batch)."""
        seen = self.shared_seen
        if seen is None or len(seen) > 2 * MAX_CLIENT_STATEMENTS:
            # (Forgetting is only an optimisation's memory lost: see _named_parse.)
            seen = self.shared_seen = set()
        batch = _Batch(
            self.statements, self.parsed_settings, server, self._proxy_name, self.ctx.metrics
        )
        if self.expose_names:
            # SQL (EXECUTE name) refers to the client's own names: on the pinned connection
            # its statements exist under those names too.
            for name, (_, rest) in list(self.statements.items()):
                batch.ensure(name, rest)
        queue = self.queue
        # The Closes of evicted statements go just before the last Sync (usually the last
        # message): after it, their answers could come when the connection is lent again.
        last_sync = len(queue)
        while last_sync and queue[last_sync - 1][0] not in wire.SYNCING_TYPES:
            last_sync -= 1
        last_sync = last_sync - 1 if last_sync else len(queue)
        for i, (kind, body) in enumerate(queue):
            if i == last_sync:
                batch.evict()
            try:
                batch.add(kind, body, seen)
            except wire.ProtocolViolation:
                batch.out.append(wire.frame(kind, body))  # malformed: the server refuses it
        if last_sync == len(queue):
            batch.evict()
        return b"".join(batch.out)

    def _statements_dropped(self, sql: bytes) -> None:
        """SQL about prepared statements (EXECUTE, DEALLOCATE, DISCARD) reaches the now pinned
        server connection: the client's statements must exist there under the client's own
        names, and what it drops may include shared ones, so the proxy forgets what the
        connection had. DEALLOCATE ALL and DISCARD ALL also clear this client's own
        statements, and only this client's."""
        self.forget_server_statements = True
        self.expose_names = True
        if _DROPS_ALL.search(sql) is not None:
            self.statements.clear()


class _Batch:
    """One queue of client messages on its way to a server connection, as the server must
    see it. Client statement names become the shared names of their texts; a statement the
    server lacks is created by a Parse slipped in before the message that uses it, whose
    answer the server's relay drops (scanners.ReplyPlan); a named Parse whose shared statement
    exists becomes an unnamed Parse of the same text, so the client still gets its
    ParseComplete in order. A statement name the client did not create never reaches the
    server as it is: the server answers it as unknown (26000), as it would directly."""

    def __init__(
        self,
        statements: dict[bytes, tuple[bytes, bytes]],
        parsed_settings: dict[bytes, frozenset[str]],
        server: PgServer,
        proxy_name: Callable[[bytes], bytes],
        metrics: ProxyMetrics,
    ) -> None:
        assert server.scanner.plan is not None
        self.plan = server.scanner.plan
        self.statements = statements
        self.parsed_settings = parsed_settings
        self.server = server
        self.prepared = server.prepared
        self.proxy_name = proxy_name
        # The server's statements as a cache of the clients': a use finds one, or creates it.
        self.hits = metrics.prepared_statement_cache_hits
        self.misses = metrics.prepared_statement_cache_misses
        self.out: list[bytes] = []
        self.refreshed: set[bytes] = set()

    def add(self, kind: int, body: bytes, seen: set[bytes]) -> None:
        """Map one message; `seen`: the shared statements this client ever parsed."""
        plan = self.plan
        if kind == 80:  # Parse: name, text and types
            name, at = wire.split_name(body)
            if name:
                body = self._named_parse(name, body[at:], seen)
                if not body:
                    return
            else:
                plan.parse(b"", b"", creates=False, injected=False)
        elif kind == 66:  # Bind: portal, statement
            portal, at = wire.split_name(body)
            name, after = wire.split_name(body, at)
            if name:
                body = portal + b"\0" + self._server_name(name) + b"\0" + body[after:]
        elif kind == 68 or kind == 67:  # Describe, Close: 'S' statement or 'P' portal
            name = wire.split_name(body, 1)[0] if body[:1] == b"S" else b""
            if name and kind == 67:
                self.statements.pop(name, None)  # the shared statement stays for others
                self.parsed_settings.pop(name, None)
                body = b"S" + CLOSED_STATEMENT + b"\0"  # CloseComplete, nothing closed
            elif name:
                body = b"S" + self._server_name(name) + b"\0"
            if kind == 67:
                plan.close(b"", injected=False)
        elif kind in wire.SYNCING_TYPES:
            plan.sync()
        self.out.append(wire.frame(kind, body))

    def _named_parse(self, name: bytes, rest: bytes, seen: set[bytes]) -> bytes:
        """What a Parse of `name` becomes (b"": it was added as a creating Parse)."""
        plan, prepared = self.plan, self.prepared
        taken = self.statements.get(name)
        if taken is not None:
            # The name is taken: the server's own "already exists" (42P05) answers, to a
            # Parse under the shared name of the existing statement.
            self.ensure(*taken)
            plan.parse(b"", b"", creates=False, injected=False)
            return taken[0] + b"\0" + rest
        shared = self.proxy_name(rest)
        self.statements[name] = (shared, rest)
        if shared in seen and shared not in self.refreshed and shared in prepared:
            # The client prepares a text again: after DDL its old plan may be invalid
            # ("cached plan must not change result type"), so it is created anew.
            self.refreshed.add(shared)
            self.out.append(_close_statement(shared))
            plan.close(shared, injected=True)
            del prepared[shared]
        seen.add(shared)
        if shared not in prepared:
            self._create(shared, rest, name, injected=False)
            return b""
        prepared.move_to_end(shared)
        self.hits.value += 1
        plan.parse(shared, name, creates=False, injected=False)
        return b"\0" + rest

    def _server_name(self, name: bytes) -> bytes:
        """What a Bind or Describe of `name` names on the server: the client's statement
        (made sure to exist), or, for a name the client never created, one that cannot
        exist."""
        entry = self.statements.get(name)
        if entry is None:
            return UNKNOWN_STATEMENT
        self.ensure(*entry)
        return entry[0]

    def ensure(self, shared: bytes, rest: bytes) -> None:
        """The next message uses `shared`: create it first if the server lacks it."""
        if shared in self.prepared:
            self.prepared.move_to_end(shared)
            self.hits.value += 1
        else:
            self._create(shared, rest, b"", injected=True)

    def _create(self, shared: bytes, rest: bytes, client_name: bytes, *, injected: bool) -> None:
        """A Parse creating `shared` (after a Close where the proxy no longer knows what the
        connection holds, so that "already exists" cannot happen)."""
        self.misses.value += 1
        if self.server.statements_unknown:
            self.out.append(_close_statement(shared))
            self.plan.close(b"", injected=True)
        self.out.append(wire.parse_message(shared, rest))
        self.plan.parse(shared, client_name, creates=True, injected=injected)
        self.prepared[shared] = None

    def evict(self) -> None:
        """Close the least recently used statements beyond the connection's capacity. Done
        after the messages that use them (before the batch's last Sync, so no answer of the
        proxy's own is still due when the connection goes back to the pool)."""
        prepared = self.prepared
        while len(prepared) > self.server.prepared_capacity:
            name = next(iter(prepared))
            del prepared[name]
            self.out.append(_close_statement(name))
            self.plan.close(name, injected=True)


def _close_statement(name: bytes) -> bytes:
    return wire.message(b"C", b"S" + name + b"\0")
