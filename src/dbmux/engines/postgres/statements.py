"""Named prepared statements for a PostgreSQL client: its statement names map to statements
shared per server connection by text, prepared lazily where the client borrows."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from dbmux.engines.base import ServerError
from dbmux.engines.postgres import wire
from dbmux.framed import ConnectionClosed

if TYPE_CHECKING:
    from dbmux.engines.postgres.backend import PgServer

_DROPS_ALL = re.compile(rb"(?i)\b(?:deallocate\s+(?:prepare\s+)?all|discard\s+all)\b")
CLOSED_STATEMENT = b"dbmux_closed"  # never created: closing it only yields CloseComplete


class StatementsMixin:
    """PgClient's relay for sessions that use named statements: whole messages, names mapped."""

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
            self._inspect(inspected)
        if self.refusing:
            self._continue_refusal(syncs)
            return
        if not messages:
            return
        self._requests.value += syncs
        self.queue += messages
        self.queue_syncs += syncs
        self._send_queue()

    def _send_queue(self, failed: bool = False) -> None:
        """Relay the queued messages to our server once every statement they use is there
        (or preparing one `failed`, and the server skips them up to the next Sync)."""
        server = self.server
        if server is None:
            if not self.waiting:
                self.waiting = True
                server = self.pool.request(self)  # type: ignore[union-attr]
                if server is not None:
                    self.on_connection(server)
            elif not self._held_for_wait:
                self._held_for_wait = True
                self.hold_reading()
            return
        if self.preparing or not self.queue:
            return
        if self.outstanding == 0 and self._refuse_taken_name():
            return
        missing = [] if failed else self._missing_statements(server)
        if missing:
            # Prepared by the proxy's own round trip, once nothing the client sent is
            # unanswered (server_ready calls back when the pipeline drains).
            if self.outstanding == 0:
                self.preparing = True
                self._task = self.ctx.loop.create_task(self._prepare(server, missing))
            return
        out = self._map_names(server, failed)
        self.refreshed.clear()
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

    def _refuse_taken_name(self) -> bool:
        """A Parse under a name the client already uses fails as on the server, with the
        client's own name in the message: answered here when it opens the request."""
        kind, body = self.queue[0]
        name = wire.split_name(body)[0] if kind == 80 else b""
        if not name or name not in self.statements or self.tx_status != wire.IDLE:
            return False  # (in a transaction the server must see the error too)
        text = f'prepared statement "{name.decode(errors="replace")}" already exists'
        self.write(wire.error_response("42P05", text))
        # The server would now skip everything up to the next Sync.
        syncs = [i for i, (k, _) in enumerate(self.queue) if k in wire.SYNCING_TYPES]
        if syncs:
            self.queue = self.queue[syncs[0] + 1 :]
            self.queue_syncs -= 1
            self.write(wire.ready_for_query())
        else:
            self.queue = []
            self.refusing = True
        if self.queue:
            self._send_queue()
        return True

    def _proxy_name(self, rest: bytes) -> bytes:
        """The shared name of a statement text (query and parameter types)."""
        return self.ctx.statement_names.name(rest)

    def _missing_statements(self, server: PgServer) -> list[tuple[bytes, bytes]]:
        """Statements the queue uses (Bind, Describe) that this server lacks and that no
        Parse earlier in the queue creates."""
        missing: list[tuple[bytes, bytes]] = []
        coming: set[bytes] = set()
        statements = self.statements
        if self.expose_names:
            # SQL (EXECUTE name) refers to the client's own names: on the pinned connection
            # its statements exist under those names too.
            for name, (_, rest) in statements.items():
                if name not in server.prepared:
                    missing.append((name, rest))
                    coming.add(name)
        for kind, body in self.queue:
            if kind == 80:  # Parse: the proxy creates the shared statement itself
                name, at = wire.split_name(body)
                existing = statements.get(name) if name else None
                if existing is not None:  # a name taken: the old statement answers (42P05)
                    if existing[0] not in server.prepared and existing[0] not in coming:
                        missing.append(existing)
                        coming.add(existing[0])
                    continue
                shared = self._proxy_name(body[at:]) if name else None
                if shared in self.shared_seen and shared not in self.refreshed:
                    # The client prepares a text again: after DDL its old plan may be
                    # invalid ("cached plan must not change result type"), so create it
                    # anew here rather than relay to the stale one.
                    server.prepared.pop(shared, None)
                    self.refreshed.add(shared)
                if shared is not None and shared not in server.prepared and shared not in coming:
                    missing.append((shared, body[at:]))
                    coming.add(shared)
                continue
            if kind == 66:  # Bind: portal, statement
                _, at = wire.split_name(body)
                name, _ = wire.split_name(body, at)
            elif kind == 68 and body[:1] == b"S":  # Describe statement
                name, _ = wire.split_name(body, 1)
            else:
                continue
            entry = statements.get(name) if name else None
            if entry is not None and entry[0] not in server.prepared and entry[0] not in coming:
                missing.append(entry)
                coming.add(entry[0])
        return missing

    def _map_names(self, server: PgServer, failed: bool = False) -> bytes:
        """The queue as the server must see it: client statement names replaced by shared
        ones; a named Parse (the shared statement now exists) turned into an unnamed Parse of
        the same text, so the client still gets its ParseComplete in order; Close of a
        statement kept on the server turned into a Close that closes nothing. After a
        `failed` preparation the server skips to the next Sync, and no name is taken."""
        statements, prepared = self.statements, server.prepared
        out: list[tuple[int, bytes]] = []
        for kind, body in self.queue:
            if kind == 80:
                name, at = wire.split_name(body)
                if name in statements:
                    # The name is taken: the server's own "already exists" error (42P05)
                    # answers, by parsing under the shared name the statement has there.
                    body = statements[name][0] + b"\0" + body[at:]
                elif name and failed:
                    body = b"\0" + body[at:]  # its preparation failed: the name stays free
                elif name:
                    rest = body[at:]
                    shared = self._proxy_name(rest)
                    statements[name] = (shared, rest)
                    self.shared_seen.add(shared)
                    if shared in prepared:  # (not after a failed prepare)
                        prepared.move_to_end(shared)
                    body = b"\0" + rest
            elif kind == 66:
                portal, at = wire.split_name(body)
                name, after = wire.split_name(body, at)
                entry = statements.get(name) if name else None
                if entry is not None:
                    if entry[0] in prepared:
                        prepared.move_to_end(entry[0])
                    body = portal + b"\0" + entry[0] + b"\0" + body[after:]
            elif kind == 68 and body[:1] == b"S":
                name, _ = wire.split_name(body, 1)
                entry = statements.get(name) if name else None
                if entry is not None:
                    body = b"S" + entry[0] + b"\0"
            elif kind == 67 and body[:1] == b"S":
                name, _ = wire.split_name(body, 1)
                if statements.pop(name, None) is not None:
                    body = b"S" + CLOSED_STATEMENT + b"\0"  # CloseComplete, nothing closed
            out.append((kind, body))
        return wire.encode(out)

    async def _prepare(self, server: PgServer, missing: list[tuple[bytes, bytes]]) -> None:
        failed = False
        try:
            await server.prepare(missing)
        except ServerError as error:
            if error.fields.get("V", error.fields.get("S")) in ("FATAL", "PANIC"):
                # The server is ending the connection (terminated, shutting down).
                if self.server is server:
                    self.server_lost(server)
                server.close()
                self._prepare_lost()
                return
            # The statement cannot be prepared (a dropped table, say): the client hears the
            # server's error, and the server skips the request up to its Sync.
            self.write(_error_from(error))
            failed = True
        except (ConnectionClosed, OSError):
            self._prepare_lost()
            return
        except asyncio.CancelledError:
            server.close()
            raise
        self.preparing = False
        if self.server is server:
            self._send_queue(failed)

    def _prepare_lost(self) -> None:
        """The server died during the proxy's own prepare (server_lost has run). The queue
        never reached it: outside a transaction it goes to another server connection;
        otherwise it is answered as the loss of the transaction."""
        self.preparing = False
        if self.is_closed:
            return
        if self.refusing or self.transaction_lost:
            syncs = self.queue_syncs
            self.queue = []
            self.queue_syncs = 0
            self._continue_refusal(syncs)
            self._stop_holding_for_wait()
        else:
            self._flush_pending()

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


def _error_from(error: ServerError) -> bytes:
    """An ErrorResponse carrying the server's own fields."""
    fields = error.fields or {"S": "ERROR", "C": error.code or "XX000", "M": str(error)}
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"
    return wire.message(b"E", body)
