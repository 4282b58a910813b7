"""MySQL/MariaDB client/server protocol framing and codecs: bytes in, packets and facts out,
no I/O.

A packet is a 3-byte little-endian length, a sequence id and a payload; a payload of 16 MiB - 1
continues in the next packet. The relay never decodes rows: `ResponseScanner` walks packet
headers and looks only at the first bytes of the packets that end a response (OK, EOF, ERR),
which carry the server's status flags (in transaction, more results).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

MAX_PAYLOAD = 0xFFFFFF
MAX_COMMAND = 1 << 30  # the server's own ceiling for max_allowed_packet
# A HandshakeResponse41 is a few hundred bytes (a user, a 20-byte scramble or a 256-byte RSA
# ciphertext, a database, a plugin name), connection attributes a few hundred more; as
# PostgreSQL caps its startup packet, a packet before login is capped at this.
MAX_LOGIN_PACKET = 8192

# Server status flags.
SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080

# Commands (first byte of a client command packet).
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STATISTICS = 0x09
COM_PROCESS_KILL = 0x0C
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA

# The shapes of server responses the scanner follows.
RESPONSE_RESULT = 1  # OK, ERR, or result sets (COM_QUERY, COM_STMT_EXECUTE, bulk execute)
RESPONSE_SIMPLE = 2  # one OK, ERR or EOF packet
RESPONSE_FIELDS = 3  # column definitions until EOF (COM_FIELD_LIST)
RESPONSE_STRING = 4  # one packet of text (COM_STATISTICS)
RESPONSE_ROWS = 5  # binary rows until EOF (COM_STMT_FETCH)
RESPONSE_PREPARE = 6  # COM_STMT_PREPARE: statement OK, parameter and column definitions

# Error numbers and SQLSTATEs the proxy sends itself.
ER_CON_COUNT_ERROR = (1040, "08004")
ER_ACCESS_DENIED_ERROR = (1045, "28000")
ER_UNKNOWN_COM_ERROR = (1047, "08S01")
ER_NO_SUCH_THREAD = (1094, "HY000")
ER_KILL_DENIED = (1095, "HY000")
ER_NET_PACKET_TOO_LARGE = (1153, "08S01")
ER_NET_PACKETS_OUT_OF_ORDER = (1156, "08S01")
ER_NET_READ_ERROR = (1158, "08S01")
ER_NOT_SUPPORTED_AUTH_MODE = (1251, "08004")
ER_UNKNOWN_STMT_HANDLER = (1243, "HY000")
ER_MAX_PREPARED_STMT_COUNT_REACHED = (1461, "42000")
ER_CLIENT_INTERACTION_TIMEOUT = (4031, "HY000")
ER_CONNECTION_KILLED = (1927, "70100")
# A server in read-only mode (--read-only; MariaDB's read-only storage) refused a write
# before running it.
READ_ONLY_REFUSALS = frozenset({1290, 1836})


def is_read_only_refusal(data: bytes) -> bool:
    """`data` is exactly one ERR packet saying the server is read-only."""
    return (
        len(data) >= 7
        and data[4] == 0xFF
        and data[0] | data[1] << 8 | data[2] << 16 == len(data) - 4
        and data[5] | data[6] << 8 in READ_ONLY_REFUSALS
    )


CR_SERVER_LOST = (2013, "HY000")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ProtocolViolation(Exception):
    """Input that breaks the protocol; the peer is told (when it is a client) and dropped."""


# ---------------------------------------------------------------------------------------------
# Packets and length-encoded values


def packet(seq: int, payload: bytes) -> bytes:
    """Frame a payload, splitting it into 16 MiB - 1 pieces (and an empty last piece when it
    is an exact multiple), as the protocol requires."""
    if len(payload) < MAX_PAYLOAD:
        return len(payload).to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload
    parts = []
    pos = 0
    while True:
        piece = payload[pos : pos + MAX_PAYLOAD]
        parts.append(len(piece).to_bytes(3, "little") + bytes((seq & 0xFF,)) + piece)
        seq += 1
        pos += MAX_PAYLOAD
        if len(piece) < MAX_PAYLOAD:
            return b"".join(parts)


def split_packet(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one physical packet (sequence id, payload) off the buffer, or None if incomplete."""
    if len(buf) < 4:
        return None
    length = buf[0] | buf[1] << 8 | buf[2] << 16
    if len(buf) < 4 + length:
        return None
    seq = buf[3]
    payload = bytes(buf[4 : 4 + length])
    del buf[: 4 + length]
    return seq, payload


def split_login_packet(buf: bytearray) -> tuple[int, bytes] | None:
    """split_packet for a client that has not logged in: refused as soon as the header
    says more than a login sends, so such a client never makes the proxy buffer 16 MiB."""
    if len(buf) >= 3:
        length = buf[0] | buf[1] << 8 | buf[2] << 16
        if length > MAX_LOGIN_PACKET:
            raise ProtocolViolation(
                f"login packet of {length} bytes; a login sends at most {MAX_LOGIN_PACKET}"
            )
    return split_packet(buf)


def split_raw(buf: bytearray) -> bytes | None:
    """One physical packet, header included."""
    if len(buf) < 4:
        return None
    end = 4 + (buf[0] | buf[1] << 8 | buf[2] << 16)
    if len(buf) < end:
        return None
    raw = bytes(buf[:end])
    del buf[:end]
    return raw


class PacketReader:
    """Reassembles logical packets (payloads of 16 MiB and more) from physical ones."""

    def __init__(self, limit: int = MAX_COMMAND) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.first_seq = 0
        self.last_seq = 0

    def take(self, buf: bytearray) -> bytes | None:
        """The next whole logical payload, or None until it is complete. Raises
        ProtocolViolation past `limit` bytes; the caller checks sequence ids."""
        while True:
            if len(buf) >= 3:
                length = buf[0] | buf[1] << 8 | buf[2] << 16
                if self.size + length > self.limit:
                    raise ProtocolViolation(
                        f"packet of more than {self.limit} bytes (max_allowed_packet)"
                    )
            item = split_packet(buf)
            if item is None:
                return None
            seq, payload = item
            if not self.parts:
                self.first_seq = seq
            self.last_seq = seq
            self.parts.append(payload)
            self.size += len(payload)
            if len(payload) < MAX_PAYLOAD:
                whole = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
                self.parts = []
                self.size = 0
                return whole

    @property
    def partial(self) -> bool:
        return bool(self.parts)


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def lenenc_str(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def read_lenenc(data: bytes, pos: int) -> tuple[int | None, int]:
    """A length-encoded integer at `pos` and the position after it; None for NULL (0xFB).
    Raises IndexError when `data` ends inside it."""
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    if first == 0xFC:
        end = pos + 3
    elif first == 0xFD:
        end = pos + 4
    elif first == 0xFE:
        end = pos + 9
    else:
        raise ValueError("0xff is not a length-encoded integer")
    if end > len(data):
        raise IndexError("length-encoded integer runs past the end")
    return int.from_bytes(data[pos + 1 : end], "little"), end


def read_lenenc_str(data: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = read_lenenc(data, pos)
    if length is None:
        return None, pos
    if pos + length > len(data):
        raise IndexError("length-encoded string runs past the end")
    return data[pos : pos + length], pos + length


def read_nul_str(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise IndexError("missing NUL terminator")
    return data[pos:end], end + 1


# ---------------------------------------------------------------------------------------------
# Generic responses


def ok_packet(
    *, affected: int = 0, insert_id: int = 0, status: int = SERVER_STATUS_AUTOCOMMIT
) -> bytes:
    return b"\0" + lenenc_int(affected) + lenenc_int(insert_id) + _U16.pack(status) + b"\0\0"


def err_packet(error: tuple[int, str], message: str) -> bytes:
    code, state = error
    return b"\xff" + _U16.pack(code) + b"#" + state.encode() + message.encode()


def eof_packet(status: int = SERVER_STATUS_AUTOCOMMIT) -> bytes:
    return b"\xfe\0\0" + _U16.pack(status)


@dataclass(frozen=True, slots=True)
class Ok:
    affected: int
    insert_id: int
    status: int


def parse_ok(payload: bytes) -> Ok:
    """OK packet (0x00, or 0xFE when it replaces EOF): affected rows, insert id, status."""
    affected, pos = read_lenenc(payload, 1)
    insert_id, pos = read_lenenc(payload, pos)
    status = _U16.unpack_from(payload, pos)[0] if pos + 2 <= len(payload) else 0
    return Ok(affected or 0, insert_id or 0, status)


@dataclass(frozen=True, slots=True)
class Err:
    code: int
    state: str
    message: str


def parse_err(payload: bytes) -> Err:
    code = _U16.unpack_from(payload, 1)[0] if len(payload) >= 3 else 0
    if payload[3:4] == b"#":
        state, message = payload[4:9].decode(errors="replace"), payload[9:]
    else:
        state, message = "HY000", payload[3:]
    return Err(code, state, message.decode(errors="replace"))


# ---------------------------------------------------------------------------------------------
# Prepared statements


@dataclass(frozen=True, slots=True)
class PrepareOk:
    statement_id: int
    columns: int
    params: int


def parse_prepare_ok(payload: bytes) -> PrepareOk:
    statement_id = _U32.unpack_from(payload, 1)[0]
    columns, params = _U16.unpack_from(payload, 5)[0], _U16.unpack_from(payload, 7)[0]
    return PrepareOk(statement_id, columns, params)


def with_statement_id(payload: bytes, statement_id: int) -> bytes:
    """A statement command or prepare OK with its 4-byte statement id (at offset 1) replaced."""
    return payload[:1] + _U32.pack(statement_id) + payload[5:]


def statement_id(payload: bytes) -> int:
    if len(payload) < 5:
        raise ProtocolViolation("statement command without a statement id")
    value: int = _U32.unpack_from(payload, 1)[0]
    return value


def execute_types(payload: bytes, params: int) -> tuple[int, bytes | None]:
    """Where COM_STMT_EXECUTE's new-params-bound flag sits, and the parameter types it sends
    (None when the flag is 0: the server is to reuse the types of the previous execute)."""
    flag_at = 10 + (params + 7) // 8
    if len(payload) <= flag_at:
        raise ProtocolViolation("COM_STMT_EXECUTE too short for its parameters")
    if payload[flag_at] != 1:
        return flag_at, None
    types = payload[flag_at + 1 : flag_at + 1 + 2 * params]
    if len(types) != 2 * params:
        raise ProtocolViolation("COM_STMT_EXECUTE too short for its parameter types")
    return flag_at, types


def with_execute_types(payload: bytes, flag_at: int, types: bytes) -> bytes:
    """COM_STMT_EXECUTE that reused the server's types, rewritten to send them explicitly:
    what a statement prepared anew on another server connection needs."""
    return payload[:flag_at] + b"\x01" + types + payload[flag_at + 1 :]


# ---------------------------------------------------------------------------------------------
# Following a server's responses


_INSPECT = 32  # enough of a packet to read OK/EOF status flags and column counts

# Scanner states.
_IDLE = 0
_FIRST = 1  # first packet of a result: OK, ERR or the column count
_COLUMNS = 2  # column definitions of a result set
_META_EOF = 3  # the EOF after them (without CLIENT_DEPRECATE_EOF)
_ROWS = 4  # rows until EOF / OK / ERR
_SINGLE = 5  # one packet: OK, ERR or EOF
_STRING = 6  # one packet of text
_FIELDS = 7  # definitions until EOF or ERR
_PREPARE = 8  # statement OK or ERR
_SKIP = 9  # a known number of packets (prepare's definitions)
_UPLOAD = 10  # LOAD DATA LOCAL: the client sends the file; the server's OK or ERR follows

_ERR_MAY_FOLLOW = frozenset({_IDLE, _FIRST, _META_EOF, _ROWS, _SINGLE, _FIELDS, _PREPARE})

_START = {
    RESPONSE_RESULT: _FIRST,
    RESPONSE_SIMPLE: _SINGLE,
    RESPONSE_FIELDS: _FIELDS,
    RESPONSE_STRING: _STRING,
    RESPONSE_ROWS: _ROWS,
    RESPONSE_PREPARE: _PREPARE,
}


class ResponseScanner:
    """Walks server-to-client bytes and says when each expected response is complete.

    `expect()` queues the shape of the response to a command sent; `feed()` returns how many
    responses the chunk completed. `status` is the status flags of the last OK or EOF,
    `insert_id` the last nonzero insert id an OK reported, `failed` whether the last
    completed response was an ERR. Unsolicited packets (a server's last words before it
    hangs up) are kept in `unsolicited`. With `local_files`, a LOAD DATA LOCAL request sets
    `file_requested` and the response waits, without end, until `upload_done()`."""

    __slots__ = (
        "_carry",
        "_continued",
        "_skip",
        "columns",
        "deprecate_eof",
        "expected",
        "failed",
        "file_requested",
        "insert_id",
        "local_files",
        "seq",
        "state",
        "status",
        "unsolicited",
    )

    def __init__(self, deprecate_eof: bool, local_files: bool = False) -> None:
        self.deprecate_eof = deprecate_eof
        self.local_files = local_files
        self.file_requested = False
        self.expected: deque[int] = deque()
        self.state = _IDLE
        self.columns = 0
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.insert_id = 0
        self.failed = False
        self.seq = 0  # sequence id of the last packet seen
        self.unsolicited: bytes | None = None
        self._carry = b""
        self._skip = 0
        self._continued = False

    @property
    def busy(self) -> bool:
        return self.state != _IDLE

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes fed so far end between two packets, at a point where an ERR
        may come next (ending the response, or with nothing asked, as a goodbye): where
        the proxy can put an ERR of its own into the relayed stream without corrupting it.
        Not inside a packet, a 16 MiB continuation, column definitions or prepare metadata."""
        return not (self._carry or self._skip or self._continued) and self.state in _ERR_MAY_FOLLOW

    def expect(self, kind: int) -> None:
        if self.state == _IDLE:
            self.state = _START[kind]
            self.seq = 0
        else:
            self.expected.append(kind)

    def feed(self, data: bytes) -> int:
        if self._carry:
            data = self._carry + data
            self._carry = b""
            pos = 0
        else:
            pos = self._skip
        n = len(data)
        if pos >= n:
            self._skip = pos - n
            return 0
        done = 0
        while True:
            if pos + 4 > n:
                self._carry = data[pos:]
                self._skip = 0
                return done
            length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            self.seq = data[pos + 3]
            start = pos + 4
            end = start + length
            if self._continued:
                self._continued = length == MAX_PAYLOAD
            else:
                if start + min(length, _INSPECT) > n:
                    self._carry = data[pos:]
                    self._skip = 0
                    return done
                self._continued = length == MAX_PAYLOAD
                done += self._packet(data, start, length)
            if end >= n:
                self._skip = end - n
                return done
            pos = end

    def _packet(self, data: bytes, at: int, length: int) -> int:
        """Advance the state machine by one logical packet; 1 if it completed a response."""
        state = self.state
        first = data[at] if length else -1
        if state == _ROWS:
            if first == 0xFE and length < (MAX_PAYLOAD if self.deprecate_eof else 9):
                return self._end(self._terminator_status(data, at))
            if first == 0xFF:
                return self._error()
            return 0
        if state == _FIRST:
            if first == 0:
                return self._end(self._ok_status(data, at))
            if first == 0xFF:
                return self._error()
            if first == 0xFB:
                if not self.local_files:  # a server asking a client that did not allow it
                    raise ProtocolViolation("LOAD DATA LOCAL request the client did not allow")
                self.state = _UPLOAD
                self.file_requested = True
                return 0
            try:
                count, _ = read_lenenc(data, at)
            except (IndexError, ValueError):
                raise ProtocolViolation("malformed column count") from None
            if not count:
                raise ProtocolViolation("result set with no columns")
            self.columns = count
            self.state = _COLUMNS
            return 0
        if state == _COLUMNS:
            self.columns -= 1
            if self.columns == 0:
                self.state = _ROWS if self.deprecate_eof else _META_EOF
            return 0
        if state == _META_EOF:
            if first == 0xFF:
                return self._error()
            status = self._terminator_status(data, at)
            if status & SERVER_STATUS_CURSOR_EXISTS:
                return self._end(status)  # the rows come with COM_STMT_FETCH
            self.status = status
            self.state = _ROWS
            return 0
        if state == _SINGLE:
            if first == 0xFF:
                return self._error()
            if first == 0:
                return self._end(self._ok_status(data, at))
            if first == 0xFE:
                return self._end(self._terminator_status(data, at))
            raise ProtocolViolation(f"unexpected reply 0x{first & 0xFF:02x} to a command")
        if state == _STRING:
            return self._complete()
        if state == _FIELDS:
            if first == 0xFE and length < MAX_PAYLOAD:
                return self._complete()
            if first == 0xFF:
                return self._error()
            return 0
        if state == _PREPARE:
            if first == 0xFF:
                return self._error()
            if first != 0 or length < 9:
                raise ProtocolViolation("malformed COM_STMT_PREPARE reply")
            ok = parse_prepare_ok(data[at : at + 12])
            eofs = 0 if self.deprecate_eof else (ok.columns > 0) + (ok.params > 0)
            self.columns = ok.params + ok.columns + eofs
            if self.columns == 0:
                return self._complete()
            self.state = _SKIP
            return 0
        if state == _SKIP:
            self.columns -= 1
            return self._complete() if self.columns == 0 else 0
        if state == _UPLOAD:  # the server speaks only once it has the whole file
            raise ProtocolViolation("the server sent a packet during a LOAD DATA LOCAL upload")
        # Nothing was asked: a server's goodbye (an ERR before it closes), or a broken server.
        if first == 0xFF:
            self.unsolicited = bytes(data[at : at + length])
            return 0
        raise ProtocolViolation("the server sent a packet nobody asked for")

    def upload_done(self) -> None:
        """The client sent the whole file: the server's OK or ERR comes next."""
        self.state = _FIRST

    def _ok_status(self, data: bytes, at: int) -> int:
        try:
            ok = parse_ok(data[at : at + _INSPECT])
        except (IndexError, ValueError):
            raise ProtocolViolation("malformed OK packet") from None
        if ok.insert_id:
            self.insert_id = ok.insert_id
        return ok.status

    def _terminator_status(self, data: bytes, at: int) -> int:
        if self.deprecate_eof:
            return self._ok_status(data, at)
        return data[at + 3] | data[at + 4] << 8 if at + 5 <= len(data) else self.status

    def _end(self, status: int) -> int:
        """A result ended with these status flags; another may follow."""
        self.status = status
        if status & SERVER_MORE_RESULTS_EXISTS:
            self.state = _FIRST
            return 0
        self.failed = False
        return self._next()

    def _error(self) -> int:
        self.failed = True
        return self._next()

    def _complete(self) -> int:
        self.failed = False
        return self._next()

    def _next(self) -> int:
        self.state = _START[self.expected.popleft()] if self.expected else _IDLE
        return 1


class UploadScanner:
    """Walks the client-to-server bytes of a LOAD DATA LOCAL upload, relayed as they come:
    the file goes in packets and ends with an empty one (an empty packet right after one of
    16 MiB - 1 bytes only continues that one)."""

    __slots__ = ("_continued", "_header", "_skip")

    def __init__(self) -> None:
        self._header = b""  # a packet header split between chunks
        self._skip = 0  # bytes of the current packet still to come
        self._continued = False

    def feed(self, data: bytes) -> int:
        """Where in `data` the upload ends (just after its empty packet), or -1."""
        n = len(data)
        pos = min(self._skip, n)
        self._skip -= pos
        while pos < n:
            take = 4 - len(self._header)
            header = self._header + data[pos : pos + take]
            pos += take
            if len(header) < 4:
                self._header = header
                return -1
            self._header = b""
            length = header[0] | header[1] << 8 | header[2] << 16
            if length == 0 and not self._continued:
                return pos
            self._continued = length == MAX_PAYLOAD
            self._skip = max(pos + length - n, 0)
            pos += length
        return -1


# ---------------------------------------------------------------------------------------------
# Result sets of the proxy's own queries (small; read whole)

# Column types whose text form is a numeric literal.
INTEGER_TYPES = frozenset({1, 2, 3, 8, 9, 13})  # TINY SHORT LONG LONGLONG INT24 YEAR
DECIMAL_TYPES = frozenset({0, 246})  # DECIMAL NEWDECIMAL
FLOAT_TYPES = frozenset({4, 5})  # FLOAT DOUBLE


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: int
    charset: int


def parse_column(payload: bytes) -> Column:
    pos = 0
    name = b""
    for i in range(6):  # catalog, schema, table, org_table, name, org_name
        value, pos = read_lenenc_str(payload, pos)
        if i == 4:
            name = value or b""
    _, pos = read_lenenc(payload, pos)  # length of the fixed fields
    charset = _U16.unpack_from(payload, pos)[0]
    return Column(name.decode(errors="replace"), payload[pos + 6], charset)


def parse_text_result(
    payloads: list[bytes], deprecate_eof: bool
) -> tuple[list[Column], list[list[bytes | None]]]:
    """The last result set in a text-protocol response, as columns and raw values."""
    columns: list[Column] = []
    rows: list[list[bytes | None]] = []
    i = 0
    while i < len(payloads):
        first = payloads[i][:1]
        if first in (b"\0", b"\xff"):
            i += 1
            continue
        count, _ = read_lenenc(payloads[i], 0)
        columns = [parse_column(p) for p in payloads[i + 1 : i + 1 + (count or 0)]]
        i += 1 + len(columns) + (0 if deprecate_eof else 1)
        rows = []
        while i < len(payloads):
            row = payloads[i]
            i += 1
            if row[:1] == b"\xfe" and len(row) < (MAX_PAYLOAD if deprecate_eof else 9):
                break
            values: list[bytes | None] = []
            pos = 0
            for _ in columns:
                value, pos = read_lenenc_str(row, pos)
                values.append(value)
            rows.append(values)
    return columns, rows
