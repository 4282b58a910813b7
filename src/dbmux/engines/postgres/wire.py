"""PostgreSQL protocol 3.0 framing and codecs: bytes in, frames and facts out, no I/O.

Kept free of asyncio and of the rest of dbmux so it can be compiled (mypyc, Cython) on its own
if profiles ask for it. The scanners walk message headers in relayed bytes without copying
row data: only the few messages the proxy must understand are sliced out.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from typing import Any

MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit for a single message
MAX_STARTUP = 10_000  # the server refuses longer startup packets too

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")
# One Sync group of a ReplyPlan: [parses, closes, failed], mutated in place.
_Group = list[Any]
_unpack_u32 = _U32.unpack_from

MAX_SMALL_MESSAGE = 10_000  # PostgreSQL's limit for messages that carry no user data
MAX_AUTH_MESSAGE = 65_535  # PostgreSQL's limit for authentication messages

# The longest message of each type a client may send after startup; 0 for types it may not
# send at all. Anything else is refused at the proxy, because the server would answer it with
# a FATAL (or just hang up) and take a pooled connection down with it.
FRONTEND_LIMITS = tuple(
    MAX_MESSAGE if chr(kind) in "BdFPQf" else MAX_SMALL_MESSAGE if chr(kind) in "CcDEHSX" else 0
    for kind in range(256)
)
IDLE = 73  # ReadyForQuery status b"I": no transaction open

# Frontend messages after which the server sends ReadyForQuery (Query, Sync, FunctionCall):
# a client whose last message (COPY data aside) is one of these has nothing waiting at the
# server beyond what ReadyForQuery answers.
SYNCING_TYPES = frozenset(b"QSF")
# CopyData, CopyDone and CopyFail belong to the COPY that the message before them started
# (a Query, or an Execute still waiting for its Sync), so they leave `last_kind` alone: an
# Execute followed by a stray CopyFail still owes the server a Sync.
COPY_TYPES = frozenset(b"dcf")
FLUSH = 72
# The reply that completes the answer to each request a Flush can end a batch with: Parse,
# Bind, Close, Describe (after ParameterDescription), Execute. ErrorResponse completes any,
# since the server then skips the rest up to Sync.
LAST_REPLY = {80: b"1E", 66: b"2E", 67: b"3E", 68: b"TnE", 69: b"CIsE"}


class ProtocolViolation(Exception):
    """Input that breaks the protocol; the peer gets FATAL 08P01 and is disconnected."""


def frontend_violation(kind: int, length: int) -> ProtocolViolation:
    """Why a client message header is refused (its type has limit 0, or its length is off)."""
    if FRONTEND_LIMITS[kind] == 0:
        return ProtocolViolation(f"unexpected message type {chr(kind)!r} (0x{kind:02x})")
    return ProtocolViolation(f"invalid length {length} for message type {chr(kind)!r}")


# ---------------------------------------------------------------------------------------------
# Building messages


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + _I32.pack(len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def error_response(
    code: str, text: str, *, severity: str = "ERROR", detail: str = "", hint: str = ""
) -> bytes:
    """ErrorResponse ('E'); severity FATAL tells the client the connection is ending."""
    fields = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(code), b"M", cstr(text)]
    if detail:
        fields += [b"D", cstr(detail)]
    if hint:
        fields += [b"H", cstr(hint)]
    return message(b"E", b"".join(fields) + b"\0")


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", _I32.pack(process_id) + _I32.pack(secret_key))


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _I32.pack(process_id) + _I32.pack(secret_key)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(payload: bytes) -> bytes:
    return message(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    names = b"".join(cstr(n) for n in unsupported)
    return message(b"v", _I32.pack(newest_minor) + _I32.pack(len(unsupported)) + names)


TERMINATE = message(b"X")


# ---------------------------------------------------------------------------------------------
# Parsing whole messages (handshakes, resets: not the relay hot path)


def split_startup(buf: bytearray) -> bytes | None:
    """Take one startup-phase packet (length-prefixed, no type byte) off the buffer."""
    if len(buf) < 4:
        return None
    length = _I32.unpack_from(buf)[0]
    if length < 8 or length > MAX_STARTUP:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    packet = bytes(buf[4:length])
    del buf[:length]
    return packet


def split_message(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one typed message (type, payload) off the buffer."""
    return _split(buf, MAX_MESSAGE)


def split_password_message(buf: bytearray) -> bytes | None:
    """Take one authentication message ('p') off the buffer, refusing anything else as soon
    as its first byte is in, as the server does."""
    if buf and buf[0] != 112:
        raise ProtocolViolation(f"expected an authentication message, got type 0x{buf[0]:02x}")
    message = _split(buf, MAX_AUTH_MESSAGE)
    return None if message is None else message[1]


def _split(buf: bytearray, max_length: int) -> tuple[int, bytes] | None:
    if len(buf) < 5:
        return None
    length = _unpack_u32(buf, 1)[0]
    if length < 4 or length > max_length:
        raise ProtocolViolation(f"invalid message length {length}")
    end = length + 1
    if len(buf) < end:
        return None
    kind, payload = buf[0], bytes(buf[5:end])
    del buf[:end]
    return kind, payload


def parse_startup(packet: bytes) -> tuple[int, dict[str, str]]:
    """(protocol code, parameters) of a startup packet without its length word."""
    code = _I32.unpack_from(packet)[0]
    if code != PROTOCOL_3_0 and code >> 16 != 3:
        return code, {}
    parts = packet[4:].split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolViolation("startup packet is not a NUL-terminated list of name/value pairs")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolViolation("startup packet has a parameter name without a value")
    try:
        return code, {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}
    except UnicodeDecodeError:
        raise ProtocolViolation("startup parameters are not valid UTF-8") from None


def parse_cancel(packet: bytes) -> tuple[int, int]:
    if len(packet) != 12:
        raise ProtocolViolation("malformed CancelRequest")
    return _I32.unpack_from(packet, 4)[0], _I32.unpack_from(packet, 8)[0]


def parse_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter codes."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, value, _ = payload.split(b"\0", 2)
    return name.decode(errors="replace"), value.decode(errors="replace")


def parse_data_row(payload: bytes) -> list[str | None]:
    count = struct.unpack_from("!h", payload)[0]
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        size = _I32.unpack_from(payload, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos : pos + size].decode(errors="replace"))
            pos += size
    return values


def parse_auth(payload: bytes) -> tuple[int, bytes]:
    return _I32.unpack_from(payload)[0], payload[4:]


def parse_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    end = payload.find(b"\0")
    if end < 0 or len(payload) < end + 5:
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = payload[:end].decode(errors="replace")
    size = _I32.unpack_from(payload, end + 1)[0]
    data = payload[end + 5 :]
    if size != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return mechanism, data


# ---------------------------------------------------------------------------------------------
# Scanning relayed bytes (the hot path)


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
        while True:
            if pos + 5 > n:
                return self._hold(data, pos, 5, drops)
            kind = data[pos]
            length = _unpack_u32(data, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server sent a message with length {length}")
            end = pos + 1 + length
            if kind != 78 and kind != 83 and kind != 65 and kind != 69:  # N, S, A: unasked
                self.answer = kind
            if (
                kind == 90
                or kind == 83
                or kind == 69
                or kind == 65
                or (plan is not None and (kind == 49 or kind == 51))
            ):  # Z, S, E, A (and 1, 3 with a plan): read whole
                if end > n:
                    return self._hold(data, pos, end - pos, drops)
                drop = False
                if kind == 90:
                    self.ready += 1
                    self.status = data[pos + 5]
                    if plan is not None:
                        plan.ready()
                elif kind == 83:
                    self.params.append(data[pos + 5 : end])
                elif kind == 65:
                    if self.pid_map is not None:
                        client_pid = self.pid_map.get(data[pos + 5 : pos + 9])
                        if client_pid is not None:
                            data = data[: pos + 5] + client_pid + data[pos + 9 :]
                elif kind == 49 and plan is not None:
                    drop = plan.parse_complete()
                elif kind == 51 and plan is not None:
                    drop = plan.close_complete()
                elif not _is_fatal(data[pos + 5 : end]):
                    self.errors += 1
                    self.answer = kind  # (a FATAL one answers nothing: the server is leaving)
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
        "open_closes",
        "open_parses",
        "statements",
        "syncs",
        "terminated",
    )

    def __init__(self) -> None:
        self._skip = 0
        self._held = _Held()
        self.statements: list[tuple[int, bytes]] = []
        self.terminated = False
        self.diverted: bytes | None = None
        self.syncs = 0  # ReadyForQuery replies the bytes last returned ask for
        self.last_kind = 83  # type of the last message relayed; Sync before any
        self.asked = 83  # ...other than Flush
        # Parse and Close messages relayed since the last Sync: their answers are still due
        # when the proxy starts to map names (ReplyPlan).
        self.open_parses = self.open_closes = 0

    @property
    def mid_message(self) -> bool:
        """True while part of a message has been relayed or held and the rest has not
        arrived."""
        return bool(self._skip or self._held.parts)

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
            self.syncs = 0
            return data
        syncs = 0
        parses, closes = self.open_parses, self.open_closes
        # Each exit sets `relayed`: up to where the bytes go now (a held or diverted rest
        # follows); `need` > 0 holds the message at `pos` until that many bytes are in.
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
            if kind == 81 or kind == 80:  # Q, P: their text decides session state
                if end > n:
                    need = end - pos
                    break
                if kind == 80:
                    if data[pos + 5]:  # a named statement
                        self.diverted = data[pos:]
                        break
                    parses += 1
                self.statements.append((kind, data[pos + 5 : end]))
            elif kind == 66:  # Bind: a named portal or statement
                if length >= 6:  # (shorter: malformed, relayed for the server to refuse)
                    if pos + 7 > n:
                        need = 7
                        break
                    if data[pos + 5 : pos + 7] != b"\0\0":
                        self.diverted = data[pos:]
                        break
            elif kind == 68 or kind == 67:  # Describe, Close: a statement's name
                if length >= 6:
                    if pos + 7 > n:
                        need = 7
                        break
                    if data[pos + 5] == 83 and data[pos + 6]:
                        self.diverted = data[pos:]
                        break
                if kind == 67:
                    closes += 1
            elif kind == 88:  # X
                self.terminated = True
                break
            if kind in SYNCING_TYPES:
                syncs += 1
                self.last_kind = self.asked = kind
                parses = closes = 0
            elif kind not in COPY_TYPES:
                self.last_kind = kind
                if kind != FLUSH:
                    self.asked = kind
            if end >= n:
                self._skip = end - n
                self.syncs = syncs
                self.open_parses, self.open_closes = parses, closes
                return data
            pos = end
        self.syncs = syncs
        self.open_parses, self.open_closes = parses, closes
        self._skip = 0
        if need:
            self._held.hold(data, pos, need)
        return data[:pos]


# ---------------------------------------------------------------------------------------------
# Whole client messages, for sessions whose statement names the proxy rewrites


def take_messages(buf: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Take every complete client message off the buffer, validated as the scanner does;
    return them and how many ReadyForQuery replies they ask for."""
    messages: list[tuple[int, bytes]] = []
    syncs = pos = 0
    n = len(buf)
    while pos + 5 <= n:
        kind = buf[pos]
        length = _unpack_u32(buf, pos + 1)[0]
        if length < 4 or length > FRONTEND_LIMITS[kind]:
            raise frontend_violation(kind, length)
        end = pos + 1 + length
        if end > n:
            break
        messages.append((kind, bytes(buf[pos + 5 : end])))
        if kind in SYNCING_TYPES:
            syncs += 1
        pos = end
    del buf[:pos]
    return messages, syncs


def frame(kind: int, body: bytes) -> bytes:
    return _TYPE_BYTES[kind] + _I32.pack(len(body) + 4) + body


_TYPE_BYTES = [bytes((kind,)) for kind in range(256)]


def encode(messages: list[tuple[int, bytes]]) -> bytes:
    return b"".join(frame(kind, body) for kind, body in messages)


def split_name(payload: bytes, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name at `start` and the offset after it."""
    end = payload.find(b"\0", start)
    if end < 0:
        raise ProtocolViolation("a name in the message is not NUL-terminated")
    return payload[start:end], end + 1


def bound_statement(body: bytes) -> bytes | None:
    """The statement a Bind names (None: malformed, for the server to refuse)."""
    portal_end = body.find(b"\0")
    end = body.find(b"\0", portal_end + 1) if portal_end >= 0 else -1
    return body[portal_end + 1 : end] if end >= 0 else None


def parse_message(name: bytes, rest: bytes) -> bytes:
    """A Parse message; `rest` is the query, its NUL and the parameter types."""
    return message(b"P", name + b"\0" + rest)


PARSE_COMPLETE, CLOSE_COMPLETE = 49, 51
