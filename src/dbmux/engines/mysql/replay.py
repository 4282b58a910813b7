"""transaction_replay for MySQL clients: a transaction whose server connection died is run
again on the next writer, and the client goes on as if nothing happened.

Safe because of two rules, as MariaDB MaxScale's transaction_replay does it:

- only what cannot have committed is replayed: the commands of a transaction still open
  (no COMMIT among them: it would have ended the transaction, and the log with it), plus
  the command in flight when it is a plain read or write that commits nothing by itself
  (inside a transaction or with autocommit off; with autocommit on, only a SELECT that calls
  no function that could write). COMMIT, DDL (an implicit commit) or anything else in
  flight means an unknown outcome: the client gets the error, as without replay;
- the replayed transaction must have seen exactly what the client saw: every response during
  the replay is compared with a digest of the one the client received, and on the first
  difference the replay is abandoned (rolled back) and the client gets the error it would
  have had.

Only COM_QUERY, COM_STMT_EXECUTE and COM_STMT_RESET are replayed (statements are prepared
again where they are missing); a transaction that used another command is not.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from dbmux.engines.base import BorrowTimeout, ServerError
from dbmux.engines.mysql import wire
from dbmux.engines.mysql.settings import NOTHING_TOUCHED
from dbmux.relay import ConnectionClosed
from dbmux.session import ClientSession, Leftover

if TYPE_CHECKING:
    from dbmux.engines.mysql.backend import MyServer
    from dbmux.engines.mysql.engine import MyContext
    from dbmux.engines.mysql.statements import Request


_LEADING = rb"(?:\s+|/\*.*?\*/|(?:--\s|#)[^\n]*\n)*"
# What may run again inside a transaction (or with autocommit off): it commits nothing.
_REPEATABLE = re.compile(_LEADING + rb"(?:SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH)\b", re.I | re.S)
_READ = re.compile(_LEADING + rb"(?:SELECT|WITH)\b", re.I | re.S)
_TO_FILE = re.compile(rb"\bINTO\s+(?:OUTFILE|DUMPFILE)\b", re.I)  # not transactional
# A word followed by "(": a function call, or SQL syntax. With autocommit on, a SELECT that
# calls a stored function may have written and committed; only these are known not to.
_CALL = re.compile(rb"([A-Za-z_][A-Za-z0-9_$]*)\s*\(")
_WITHOUT_SIDE_EFFECTS = frozenset(
    b"""
    ALL AND ANY AS BY EXISTS FROM IN JOIN NOT ON OR OVER SELECT SOME USING VALUES WHERE WITH
    ABS AVG CASE CAST CEIL CEILING CHAR_LENGTH COALESCE CONCAT CONCAT_WS CONVERT COUNT CURDATE
    CURRENT_DATE CURRENT_TIMESTAMP CURTIME DATE DATE_ADD DATE_FORMAT DATE_SUB DAY FLOOR
    GREATEST GROUP_CONCAT HEX IF IFNULL JSON_ARRAY JSON_EXTRACT JSON_OBJECT LCASE LEAST LEFT
    LENGTH LOWER LTRIM MAX MD5 MIN MOD MONTH NOW NULLIF REPLACE RIGHT ROUND RTRIM SHA1 SHA2
    SLEEP SUBSTR SUBSTRING SUM TIME TIMESTAMPDIFF TRIM TRUNCATE UCASE UNIX_TIMESTAMP UPPER
    UTC_TIMESTAMP YEAR
    """.split()
)
_EMPTY = hashlib.blake2b(digest_size=16).digest()
REPLAYABLE_COMMANDS = frozenset({wire.COM_QUERY, wire.COM_STMT_EXECUTE, wire.COM_STMT_RESET})


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


class TransactionLog:
    """The commands of this client's open transaction, each with a digest of its response."""

    def __init__(self) -> None:
        self.entries: list[tuple[Request, bytes]] = []
        self.hasher = _digest()  # of the response now being relayed
        self.pending: Request | None = None  # the command that response answers
        self.replayable = True
        self.schema = ""  # the session as the transaction found it
        self.insert_id = 0

    def clear(self) -> None:
        self.entries = []
        self.replayable = True


class ReplayMixin(ClientSession):
    """MyClient's side of transaction_replay (see the module docstring)."""

    if not TYPE_CHECKING:  # the slots are MyClient's (mypy would look for them here)
        __slots__ = ()

    replay_log: TransactionLog | None
    replaying: bool
    _replay_queue: deque[tuple[Request, bytes]]
    _after_replay: tuple[Request | None, str, int]
    busy: bool
    ctx: MyContext
    insert_id: int
    retried: Request | None
    schema: str
    sent: Request | None
    server: MyServer | None
    touched: frozenset[str]
    transaction_lost: str
    queued: Request | None
    wanted: dict[str, str]

    if TYPE_CHECKING:  # provided by MyClient and the classes it mixes in

        def _end_command(self) -> None: ...
        def _holds(self, server: MyServer) -> bool: ...
        def _send(self, server: MyServer, request: Request) -> None: ...
        def _start(self, coro: Coroutine[Any, Any, None]) -> None: ...
        def reply_error(self, error: tuple[int, str], message: str, *, seq: int = 1) -> None: ...

    def _command_sent(self, request: Request) -> None:
        replay_log = self.replay_log
        assert replay_log is not None
        replay_log.hasher = _digest()
        replay_log.pending = request
        if not replay_log.entries and not self.replaying:
            replay_log.schema, replay_log.insert_id = self.schema, self.insert_id

    def _logged(self, server: MyServer) -> None:
        """A command's response is complete: keep it while its transaction is open."""
        replay_log = self.replay_log
        assert replay_log is not None
        request, replay_log.pending = replay_log.pending, None
        if not server.scanner.status & wire.SERVER_STATUS_IN_TRANS:
            replay_log.clear()
            return
        if request is None or request[0][0] not in REPLAYABLE_COMMANDS:
            replay_log.replayable = False
            return
        replay_log.entries.append((request, replay_log.hasher.digest()))

    def _replay_after_loss(self, server: MyServer, reason: str) -> bool:
        """The server died under this client: replay if that is safe; True if started."""
        replay_log = self.replay_log
        if replay_log is None or not replay_log.replayable or self.pin_reason is not None:
            return False
        status = server.scanner.status
        in_flight: Request | None = None
        if server.scanner.busy:
            in_flight = replay_log.pending
            if in_flight is None or replay_log.hasher.digest() != _EMPTY:
                return False  # not a command the log knows, or part of its answer was relayed
            if not may_run_again(in_flight, status):
                return False  # it may have committed
        elif not status & wire.SERVER_STATUS_IN_TRANS or not replay_log.entries:
            return False
        self.ctx.metrics.transaction_replays.value += 1
        self.busy = True
        self._after_replay = (in_flight, reason, server.scanner.seq + 1)
        self._start(self._replay())
        return True

    async def _replay(self) -> None:
        replay_log = self.replay_log
        assert replay_log is not None
        pool = self.pool
        assert pool is not None  # set at login, before anything can be replayed
        try:
            server = await pool.borrow()
        except (BorrowTimeout, ServerError) as error:
            self._replay_failed(f"no server connection for it: {error}")
            return
        try:
            await server.apply_state(self.wanted, replay_log.schema)
            if server.insert_id != replay_log.insert_id:
                await server.query(f"SELECT LAST_INSERT_ID({replay_log.insert_id:d})")
                server.insert_id = replay_log.insert_id
        except (ServerError, ConnectionClosed, OSError) as error:
            self.give_back(Leftover.UNKNOWN, server)
            self._replay_failed(f"could not prepare the session: {error}")
            return
        self.attach(server)
        self.replaying = True
        self._replay_queue = deque(replay_log.entries)
        replay_log.entries = []
        self._replay_next()

    def _replay_next(self) -> None:
        server = self.server
        assert server is not None  # attached for the replay
        if self._replay_queue:
            self._send(server, self._replay_queue[0][0])
            return
        self.replaying = False
        in_flight = self._after_replay[0]
        if in_flight is not None:
            self._send(server, in_flight)
        else:
            self._end_command()

    def _replayed(self) -> None:
        """One replayed command's response is complete: it must be what the client saw."""
        replay_log = self.replay_log
        assert replay_log is not None
        request, digest = self._replay_queue.popleft()
        if replay_log.hasher.digest() != digest:
            self._replay_failed("a replayed statement's result differs from the original's")
            return
        replay_log.entries.append((request, digest))
        self._replay_next()

    def _replay_failed(self, why: str) -> None:
        """Tell the client what it would have been told without replay."""
        replay_log = self.replay_log
        assert replay_log is not None
        self.ctx.metrics.transaction_replays_failed.value += 1
        self.replaying = False
        self._replay_queue = deque()
        replay_log.clear()
        self.give_back(Leftover.TRANSACTION)  # rolled back before anyone else uses it
        in_flight, reason, seq = self._after_replay
        why = f"{reason}; transaction_replay: {why}"
        if in_flight is not None:
            self.reply_error(
                wire.CR_SERVER_LOST,
                f"Lost connection to the server during query ({why}); the transaction was "
                "rolled back",
                seq=seq,
            )
            self.touched = NOTHING_TOUCHED
        else:
            self.transaction_lost = why
        self._end_command()

    # -- a write the writer refused as read-only

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
        self.give_back(server=server)
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
        self.queued, self.waiting = request, True
        server = pool.request(self)
        if server is not None:
            self.on_connection(server)


def may_run_again(request: Request, status: int) -> bool:
    """The command in flight commits nothing by itself, so it may run again."""
    payload, _, statement, _ = request
    if payload[0] == wire.COM_QUERY:
        text = payload[1:]
    elif payload[0] == wire.COM_STMT_EXECUTE and statement is not None:
        text = statement.text
    else:
        return False
    open_transaction = status & wire.SERVER_STATUS_IN_TRANS
    autocommit = status & wire.SERVER_STATUS_AUTOCOMMIT
    if _TO_FILE.search(text):
        return False
    if open_transaction or not autocommit:
        return _REPEATABLE.match(text) is not None
    return _READ.match(text) is not None and all(
        name.upper() in _WITHOUT_SIDE_EFFECTS for name in _CALL.findall(text)
    )
