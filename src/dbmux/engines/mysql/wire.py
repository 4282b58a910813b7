"""MySQL/MariaDB client/server protocol framing and codecs: bytes in, packets and facts out,
no I/O.

A packet is a 3-byte little-endian length, a sequence id and a payload; a payload of 16 MiB - 1
continues in the next packet. The relay never decodes rows: `ResponseScanner` walks packet
headers and looks only at the first bytes of the packets that end a response (OK, EOF, ERR),
which carry the server's status flags (in transaction, more results).
"""

from __future__ import annotations

import struct
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
ER_SECURE_TRANSPORT_REQUIRED = (3159, "HY000")
ER_NO_SUCH_THREAD = (1094, "HY000")
ER_KILL_DENIED = (1095, "HY000")
ER_NET_PACKET_TOO_LARGE = (1153, "08S01")
ER_NET_PACKETS_OUT_OF_ORDER = (1156, "08S01")
ER_NET_READ_ERROR = (1158, "08S01")
ER_NOT_SUPPORTED_AUTH_MODE = (1251, "08004")
ER_UNKNOWN_STMT_HANDLER = (1243, "HY000")
ER_MAX_PREPARED_STMT_COUNT_REACHED = (1461, "42000")
ER_CLIENT_INTERACTION_TIMEOUT = (4031, "HY000")
ER_SERVER_SHUTDOWN = (1053, "08S01")
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
    if len(payload) < MAX_PAYLOAD:  # the header is the length and the id as one u32
        return _U32.pack(len(payload) | (seq & 0xFF) << 24) + payload
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
        self.parts: list[bytes] = []  # physical packets of a logical one not yet whole
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


_STATEMENT_HEAD = struct.Struct("<IBI")  # packet header (sequence id 0), command, statement id


def statement_packet(payload: bytes, statement_id: int) -> bytes:
    """A statement command's packet (sequence id 0) with its statement id replaced, framed
    in one piece."""
    if len(payload) < 5 or len(payload) >= MAX_PAYLOAD:
        return packet(0, with_statement_id(payload, statement_id))
    return _STATEMENT_HEAD.pack(len(payload), payload[0], statement_id) + payload[5:]


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
