"""Prepared statements of a MySQL client: each statement the client prepares gets an id of the
proxy's; on a server connection it runs as a statement prepared there by its text (shared by
the clients that borrow that connection), prepared again wherever it is missing."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbmux.engines.base import ServerError
from dbmux.engines.mysql import wire
from dbmux.engines.mysql.kill import ER_NOT_SUPPORTED_YET, find_kill
from dbmux.engines.mysql.login import error_of
from dbmux.engines.mysql.pinning import NO_STATE, Verdict
from dbmux.relay import ConnectionClosed
from dbmux.session import ClientSession

if TYPE_CHECKING:
    from dbmux.engines.mysql.backend import MyServer

CURSOR = "cursor"  # COM_STMT_EXECUTE that opens a server-side cursor
MAX_CLIENT_STATEMENTS = 10_000  # prepared statements one client may hold at once
MAX_CLIENT_STATEMENT_BYTES = 64 << 20  # ...and the bytes of their texts


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
    verdict: Verdict
    types: bytes | None = None  # the parameter types its last execute sent


# A command on its way to a server: payload, reply shape, statement, packet as sent.
Request = tuple[bytes, "int | None", "ClientStatement | None", "bytes | None"]


class StatementsMixin(ClientSession):
    """MyClient's prepared statements (COM_STMT_*)."""

    if not TYPE_CHECKING:  # the slots are MyClient's (mypy would look for them here)
        __slots__ = ()

    _verdict: Callable[[bytes], Verdict]
    busy: bool
    last_prepared: int
    long_data: frozenset[bytes]
    next_statement_id: int
    server: MyServer | None
    statement_bytes: int
    statements: dict[int, ClientStatement]
    touched: frozenset[str]

    if TYPE_CHECKING:  # provided by MyClient and the classes it mixes in

        async def _borrow(self) -> MyServer: ...
        def _end_command(self) -> None: ...
        def _forward(
            self,
            payload: bytes,
            kind: int | None,
            statement: ClientStatement | None = None,
            frame: bytes | None = None,
        ) -> None: ...
        def _holds(self, server: MyServer) -> bool: ...
        def _note(self, verdict: Verdict, text: bytes | None) -> None: ...
        def _release_if_idle(self, server: MyServer) -> None: ...
        def _send(self, server: MyServer, request: Request) -> None: ...
        def _start(self, coro: Coroutine[Any, Any, None]) -> None: ...
        def ok(self) -> None: ...
        def reply(self, *payloads: bytes, seq: int = 1) -> None: ...
        def reply_error(self, error: tuple[int, str], message: str, *, seq: int = 1) -> None: ...

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
            self.give_back(server=server)

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
        if statement.verdict is not NO_STATE:
            self._note(statement.verdict, None)
        opens_cursor = payload[0] == wire.COM_STMT_EXECUTE and len(payload) > 5 and payload[5] != 0
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
        text = statement.text
        ours = server.prepared[text]
        server.prepared.move_to_end(text)
        command = payload[0]
        if statement.params and command == wire.COM_STMT_EXECUTE:
            flag_at, types = wire.execute_types(payload, statement.params)
            if types is not None:
                statement.types = ours.types = types
            elif statement.types is not None and ours.types != statement.types:
                payload = wire.with_execute_types(payload, flag_at, statement.types)
                ours.types = statement.types
        elif statement.params and command == wire.COM_STMT_BULK_EXECUTE and len(payload) >= 7:
            flags = payload[5] | payload[6] << 8
            if flags & 128:  # SEND_TYPES_TO_SERVER
                statement.types = ours.types = payload[7 : 7 + 2 * statement.params]
            elif statement.types is not None and ours.types != statement.types:
                flags |= 128
                payload = (
                    payload[:5] + bytes((flags & 0xFF, flags >> 8)) + statement.types + payload[7:]
                )
                ours.types = statement.types
        if (
            self.long_data
            and text in self.long_data
            and command
            in (
                wire.COM_STMT_EXECUTE,
                wire.COM_STMT_BULK_EXECUTE,
                wire.COM_STMT_RESET,
            )
        ):
            # Only this statement's long data is used up: another's still sits on its own
            # server statement, which other clients share once the connection goes back.
            self.long_data -= {text}
        if kind is not None:
            server.scanner.expect(kind)
        server.transport.write(wire.statement_packet(payload, ours.statement_id))
        if kind is None:
            self._end_command()

    def _send_long_data(self, payload: bytes) -> None:
        """Long data stays on the server statement until that statement's execute (or reset):
        the session keeps its server connection until then. No reply."""
        try:
            statement = self._statement(payload)
        except CommandFailed:
            return  # the server would ignore it too; the execute reports the error
        self.long_data |= {statement.text}
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
        self.long_data -= {statement.text}
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
