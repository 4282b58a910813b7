"""The scanners the PostgreSQL relay runs on every chunk: they walk message headers in
relayed bytes without copying row data, and slice out only the few messages the proxy must
understand (ReadyForQuery, errors, ParameterStatus, the replies to statements it named).
No I/O, typed, free of asyncio like wire.py, so both can be compiled if profiles ask for it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from typing import Any

from dbmux.engines.postgres.wire import (
    COPY_TYPES,
    FLUSH,
    FRONTEND_LIMITS,
    IDLE,
    SYNCING_TYPES,
    ProtocolViolation,
    frontend_violation,
)

_unpack_u32 = struct.Struct("!I").unpack_from

# What BackendScanner does with each message type, looked up once per message (0: an answer
# skipped by length, the common case). Unasked messages (notices, parameter reports,
# notifications) leave `answer` alone.
_UNASKED = 1  # NoticeResponse: relayed as it comes
_READY = 2  # ReadyForQuery: read whole
_REPORT = 3  # ParameterStatus: read whole, unasked
_NOTIFY = 4  # NotificationResponse: read whole (its process id is mapped), unasked
_ERROR = 5  # ErrorResponse: read whole; a FATAL one answers nothing
_PLANNED = 6  # ParseComplete, CloseComplete: read whole while a ReplyPlan is on
_BACKEND_ROLES = tuple(
    {
        78: _UNASKED,
        90: _READY,
        83: _REPORT,
        65: _NOTIFY,
        69: _ERROR,
        49: _PLANNED,
        51: _PLANNED,
    }.get(kind, 0)
    for kind in range(256)
)

# What FrontendScanner does with each message type (0: Execute, the only other valid one).
_QUERY, _SYNC, _PARSE, _BIND, _NAMES, _TERMINATE, _FLUSH, _COPY = range(1, 9)
_FRONTEND_ROLES = tuple(
    {81: _QUERY, 80: _PARSE, 66: _BIND, 68: _NAMES, 67: _NAMES, 88: _TERMINATE, FLUSH: _FLUSH}.get(
        kind, _SYNC if kind in SYNCING_TYPES else _COPY if kind in COPY_TYPES else 0
    )
    for kind in range(256)
)
# One Sync group of a ReplyPlan: [parses, closes, failed], mutated in place.
_Group = list[Any]


def _is_fatal(payload: bytes) -> bool:
    """FATAL or PANIC, read from the untranslated V field (S is in the server's language)."""
    if b"\0VFATAL\0" in payload or b"\0VPANIC\0" in payload:
        return True
    return payload.startswith((b"SFATAL\0", b"SPANIC\0"))  # servers before 9.6 send no V


class _Held:
    """The start of a message kept back until `need` bytes of it are in. Chunks are kept in a
    list and joined once, so a message of n bytes arriving in k chunks costs O(n), not
    O(n * k): a 1 GiB Query sent a byte at a time must not stall the event loop."""

    __slots__ = ("have", "need", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.have = 0
        self.need = 0

    def hold(self, data: bytes, pos: int, need: int) -> None:
        self.parts.append(data[pos:])
        self.have = len(data) - pos
        self.need = need

    def add(self, data: bytes) -> bytes | None:
        """Keep `data`; once `need` bytes are in, return all of them joined (and empty)."""
        self.parts.append(data)
        self.have += len(data)
        if self.have < self.need:
            return None
        joined = b"".join(self.parts)
        self.parts.clear()
        self.have = self.need = 0
        return joined


# A client scanner's _Held until a message of its client arrives split (most never do): one
# for all, never holding anything.
_NOT_HOLDING = _Held()


class ReplyPlan:
    """What the server will answer to the Parse and Close messages in flight on one server
    connection, Sync by Sync: which answers belong to messages the proxy slipped in (the
    client never asked, so they are dropped), and which statements an error left uncreated
    or unclosed (the server skips everything after an error up to the next Sync).

    Each Sync group is [parses, closes, failed]; a parse is (statement, client name,
    creates, injected), a close (statement, injected). Statement names the proxy keeps in
    `prepared` (a server connection's statements) and `statements` (a client's names) are
    corrected as answers, errors and skips come in."""

    __slots__ = ("closes_seen", "groups", "parses_seen", "prepared", "statements")

    def __init__(
        self,
        prepared: OrderedDict[bytes, None],
        statements: dict[bytes, tuple[bytes, bytes]],
        *,
        groups_in_flight: int = 0,
        open_parses: int = 0,
        open_closes: int = 0,
    ) -> None:
        self.prepared = prepared
        self.statements = statements
        self.parses_seen = self.closes_seen = 0
        # Requests relayed before the plan began have no entries: their answers pass.
        self.groups: deque[_Group] = deque([[], [], False] for _ in range(groups_in_flight))
        unknown_parse: tuple[bytes, bytes, bool, bool] = (b"", b"", False, False)
        self.groups.append([[unknown_parse] * open_parses, [(b"", False)] * open_closes, False])

    # -- what the proxy sends

    def parse(self, statement: bytes, client_name: bytes, *, creates: bool, injected: bool) -> None:
        entry = (statement, client_name, creates, injected)
        group = self.groups[-1]
        if group[2]:  # the server skips it
            self._undo_parse(entry)
        else:
            group[0].append(entry)

    def close(self, statement: bytes, *, injected: bool) -> None:
        group = self.groups[-1]
        if group[2]:
            self._undo_close(statement)
        else:
            group[1].append((statement, injected))

    def sync(self) -> None:
        self.groups.append([[], [], False])

    # -- what the server answers; True: drop this answer

    def parse_complete(self) -> bool:
        parses, i = self.groups[0][0], self.parses_seen
        self.parses_seen = i + 1
        return i < len(parses) and parses[i][3]

    def close_complete(self) -> bool:
        closes, i = self.groups[0][1], self.closes_seen
        self.closes_seen = i + 1
        return i < len(closes) and closes[i][1]

    def error(self) -> None:
        """The rest of the front group is skipped by the server."""
        group = self.groups[0]
        self._skip_rest(group)
        group[2] = True

    def ready(self) -> None:
        self.groups.popleft()
        self.parses_seen = self.closes_seen = 0
        if not self.groups:
            self.groups.append([[], [], False])

    def lost(self) -> None:
        """The connection died: nothing unanswered happened."""
        for group in self.groups:
            self._skip_rest(group)
            self.parses_seen = self.closes_seen = 0

    def _skip_rest(self, group: _Group) -> None:
        for entry in group[0][self.parses_seen :]:
            self._undo_parse(entry)
        for statement, _ in group[1][self.closes_seen :]:
            self._undo_close(statement)
        self.parses_seen, self.closes_seen = len(group[0]), len(group[1])

    def _undo_parse(self, entry: tuple[bytes, bytes, bool, bool]) -> None:
        statement, client_name, creates, _ = entry
        if creates:
            self.prepared.pop(statement, None)
        if client_name:
            known = self.statements.get(client_name)
            if known is not None and known[0] == statement:
                del self.statements[client_name]

    def _undo_close(self, statement: bytes) -> None:
        if statement:  # still there: first in line to be closed again
            self.prepared[statement] = None
            self.prepared.move_to_end(statement, last=False)


class BackendScanner:
    """Walks server-to-client bytes and notes what the proxy must know: each ReadyForQuery
    (and its transaction status) and ParameterStatus reports. Row data is skipped by length
    without being copied. A FATAL ErrorResponse is kept back from the client: the proxy, not
    the dying server connection, decides what the client is told. With a `plan`, answers to
    the proxy's own Parse and Close messages are dropped too."""

    __slots__ = (
        "_held",
        "_skip",
        "answer",
        "errors",
        "fatal",
        "params",
        "pid_map",
        "plan",
        "ready",
        "status",
    )

    def __init__(self) -> None:
        self._skip = 0  # body bytes of the current message still to come, not needed
        self._held = _Held()  # an unfinished message start that must be read whole
        self.status = IDLE
        self.ready = 0  # ReadyForQuery messages in the last chunk
        self.params: list[bytes] = []
        self.fatal: bytes | None = None
        self.errors = 0  # ErrorResponses passed in all
        # Type of the last message that answers a request (not a notice, parameter report or
        # notification, which come unasked); the client's relay clears it as it sends.
        self.answer = 0
        # Server process id -> the id of the client that last used that process: clients
        # know sessions (their own and others') by the ids the proxy gave them, so a
        # NotificationResponse names the notifying session that way.
        self.pid_map: dict[bytes, bytes] | None = None
        self.plan: ReplyPlan | None = None

    @property
    def mid_message(self) -> bool:
        """True while part of a message has been relayed and the rest has not arrived."""
        return self._skip > 0

    def feed(self, data: bytes) -> bytes:
        """Scan one received chunk; return the bytes to relay now (usually `data` itself).
        An unfinished message the proxy must read whole is held back until it is complete."""
        self.ready = 0
        if self._held.parts:
            joined = self._held.add(data)
            if joined is None:
                return b""
            data, pos = joined, 0
        else:
            pos = self._skip
        n = len(data)
        if pos >= n:
            self._skip = pos - n
            return data
        plan = self.plan
        drops: list[int] | None = None  # start, end of each message kept from the client
        answer = self.answer  # (a local in the loop, stored at each exit)
        while True:
            if pos + 5 > n:
                self.answer = answer
                return self._hold(data, pos, 5, drops)
            kind = data[pos]
            length = _unpack_u32(data, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server sent a message with length {length}")
            end = pos + 1 + length
            role = _BACKEND_ROLES[kind]
            if not role or (role == _PLANNED and plan is None):  # skipped by length
                answer = kind
            elif role != _UNASKED:  # read whole
                if role in (_READY, _PLANNED):
                    answer = kind
                if end > n:
                    self.answer = answer
                    return self._hold(data, pos, end - pos, drops)
                drop = False
                if role == _READY:
                    self.ready += 1
                    self.status = data[pos + 5]
                    if plan is not None:
                        plan.ready()
                elif role == _REPORT:
                    self.params.append(data[pos + 5 : end])
                elif role == _NOTIFY:
                    if self.pid_map is not None:
                        client_pid = self.pid_map.get(data[pos + 5 : pos + 9])
                        if client_pid is not None:
                            data = data[: pos + 5] + client_pid + data[pos + 9 :]
                elif role == _PLANNED:
                    assert plan is not None
                    drop = plan.parse_complete() if kind == 49 else plan.close_complete()
                elif not _is_fatal(data[pos + 5 : end]):
                    self.errors += 1
                    answer = kind  # (a FATAL one answers nothing: the server is leaving)
                    if plan is not None:
                        plan.error()
                else:
                    self.fatal = data[pos + 5 : end]
                    drop = True
                if drop:
                    if drops is None:
                        drops = []
                    drops += (pos, end)
            if end >= n:
                self._skip = end - n
                self.answer = answer
                return data if drops is None else _without(data, drops, n)
            pos = end

    def _hold(self, data: bytes, pos: int, need: int, drops: list[int] | None) -> bytes:
        self._held.hold(data, pos, need)
        self._skip = 0
        return data[:pos] if drops is None else _without(data, drops, pos)


def _without(data: bytes, drops: list[int], upto: int) -> bytes:
    """data[:upto] without the (start, end) ranges in `drops`."""
    kept, at = [], 0
    for i in range(0, len(drops), 2):
        kept.append(data[at : drops[i]])
        at = drops[i + 1]
    kept.append(data[at:upto])
    return b"".join(kept)


class FrontendScanner:
    """Walks client-to-server bytes: validates each header, counts the messages that will be
    answered with ReadyForQuery, and slices out what session-state tracking must read
    (Query and Parse texts). The bytes of a message the proxy must read are held back until
    they are in, so everything relayed has been looked at.

    Stops at Terminate (`terminated`), and at the first message that names a prepared
    statement or a portal (`diverted` holds the input from there on): the proxy maps a
    client's statement names to its own, and no other name may reach a shared server."""

    __slots__ = (
        "_held",
        "_skip",
        "asked",
        "diverted",
        "last_kind",
        "mid_message",
        "open_closes",
        "open_parses",
        "statements",
        "syncs",
        "terminated",
    )

    def __init__(self) -> None:
        self._skip = 0
        self._held = _NOT_HOLDING  # (its own at the first split message)
        # Part of a message has been relayed or held and the rest has not arrived. (An
        # attribute each exit of feed sets, not a property: the relay reads it per request.)
        self.mid_message = False
        self.statements: list[tuple[int, bytes]] = []
        self.terminated = False
        self.diverted: bytes | None = None
        self.syncs = 0  # ReadyForQuery replies the bytes last returned ask for
        self.last_kind = 83  # type of the last message relayed; Sync before any
        self.asked = 83  # ...other than Flush
        # Parse and Close messages relayed since the last Sync: their answers are still due
        # when the proxy starts to map names (ReplyPlan).
        self.open_parses = self.open_closes = 0

    def feed(self, data: bytes) -> bytes:
        """Scan one chunk; return the bytes to relay now, asking for `syncs` ReadyForQuery
        replies."""
        if self._held.parts:
            joined = self._held.add(data)
            if joined is None:
                self.syncs = 0
                return b""
            data, pos = joined, 0
        else:
            pos = self._skip
        n = len(data)
        if pos >= n:
            self._skip = pos - n
            self.mid_message = pos > n
            self.syncs = 0
            return data
        syncs = 0
        parses, closes = self.open_parses, self.open_closes
        last, asked = self.last_kind, self.asked  # (locals in the loop, stored at each exit)
        # A break leaves the bytes from `pos` on out of what goes now (a held or diverted
        # rest follows); `need` > 0 holds the message at `pos` until that many bytes are in.
        need = 0
        while True:
            if pos + 5 > n:
                need = 5
                break
            kind = data[pos]
            length = _unpack_u32(data, pos + 1)[0]
            if length < 4 or length > FRONTEND_LIMITS[kind]:
                raise frontend_violation(kind, length)
            end = pos + 1 + length
            role = _FRONTEND_ROLES[kind]
            if role == _QUERY:  # its text decides session state
                if end > n:
                    need = end - pos
                    break
                self.statements.append((kind, data[pos + 5 : end]))
                syncs += 1
                last = asked = kind
                parses = closes = 0
            elif role == _SYNC:
                syncs += 1
                last = asked = kind
                parses = closes = 0
            elif role == _PARSE:  # a statement's name, then the text
                if end > n:
                    need = end - pos
                    break
                # (An empty Parse is malformed: relayed for the server to refuse.)
                if length > 4 and data[pos + 5]:  # a named statement
                    self.diverted = data[pos:]
                    break
                parses += 1
                self.statements.append((kind, data[pos + 5 : end]))
                last = asked = kind
            elif role == _BIND:  # a portal's name, then a statement's
                if length >= 6:  # (shorter: malformed, relayed for the server to refuse)
                    if pos + 7 > n:
                        need = 7
                        break
                    if data[pos + 5] or data[pos + 6]:
                        self.diverted = data[pos:]
                        break
                last = asked = kind
            elif role == _NAMES:  # Describe, Close: a statement's or a portal's name
                if length >= 6:
                    if pos + 7 > n:
                        need = 7
                        break
                    if data[pos + 5] == 83 and data[pos + 6]:
                        self.diverted = data[pos:]
                        break
                if kind == 67:
                    closes += 1
                last = asked = kind
            elif role == _TERMINATE:
                self.terminated = True
                break
            elif role == _FLUSH:
                last = kind
            elif role != _COPY:  # Execute
                last = asked = kind
            if end >= n:
                self._skip = end - n
                self.mid_message = end > n
                self.syncs = syncs
                self.open_parses, self.open_closes = parses, closes
                self.last_kind, self.asked = last, asked
                return data
            pos = end
        self.syncs = syncs
        self.open_parses, self.open_closes = parses, closes
        self.last_kind, self.asked = last, asked
        self._skip = 0
        self.mid_message = need > 0
        if need:
            held = self._held
            if held is _NOT_HOLDING:
                held = self._held = _Held()
            held.hold(data, pos, need)
        return data[:pos]
