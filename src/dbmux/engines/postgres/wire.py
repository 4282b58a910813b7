"""PostgreSQL protocol 3.0 framing and codecs: bytes in, frames and facts out, no I/O.

Kept free of asyncio and of the rest of dbmux so it can be compiled (mypyc, Cython) on its own
if profiles ask for it. The scanners walk message headers in relayed bytes without copying
row data: only the few messages the proxy must understand are sliced out.
"""

from __future__ import annotations

import struct

MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit for a single message
MAX_STARTUP = 10_000  # the server refuses longer startup packets too

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
TLS_HANDSHAKE = 0x16  # the content type of a TLS record carrying a ClientHello
ALPN = "postgresql"  # the ALPN protocol name of direct TLS, which PostgreSQL 17 requires

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")
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


SSL_REQUEST_MESSAGE = _I32.pack(8) + _I32.pack(SSL_REQUEST)


def split_byte(buf: bytearray) -> bytes | None:
    """One byte (the server's answer to SSLRequest)."""
    if not buf:
        return None
    answer = bytes(buf[:1])
    del buf[:1]
    return answer


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


def starts_tls(buf: bytearray) -> bool | None:
    """Whether a connection's first bytes are a TLS handshake record (direct TLS, PostgreSQL
    17's sslnegotiation=direct) rather than a startup packet, whose first byte (of a length
    up to MAX_STARTUP) is 0; None until the first byte is in. Takes nothing off the buffer."""
    return buf[0] == TLS_HANDSHAKE if buf else None


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
