"""The MySQL/MariaDB connection handshake on bytes, no I/O: capability flags, the server's
greeting, the client's handshake response (and SSL request), the auth switch request and
COM_CHANGE_USER. Framing is wire.py's."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dbmux.engines.mysql.wire import (
    MAX_COMMAND,
    ProtocolViolation,
    lenenc_str,
    parse_err,
    read_lenenc_str,
    read_nul_str,
)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

# Capability flags (the low 32 bits are MySQL's; MariaDB's extensions follow at bit 32).
CLIENT_LONG_PASSWORD = 1  # MariaDB: unset by servers and clients that use the extensions
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_REMEMBER_OPTIONS = 1 << 31
MARIADB_CLIENT_PROGRESS = 1 << 32
MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 34
MARIADB_CLIENT_EXTENDED_METADATA = 1 << 35

# What dbmux offers clients (intersected with what the server offers). Left out on purpose:
# SSL and compression (not available), query attributes and optional metadata (they change
# packet formats the proxy reads), MariaDB progress reports and metadata caching (likewise).
PROXY_CAPABILITIES = (
    CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_NO_SCHEMA
    | CLIENT_ODBC
    | CLIENT_LOCAL_FILES
    | CLIENT_IGNORE_SPACE
    | CLIENT_PROTOCOL_41
    | CLIENT_INTERACTIVE
    | CLIENT_IGNORE_SIGPIPE
    | CLIENT_TRANSACTIONS
    | CLIENT_RESERVED
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PS_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
    | CLIENT_SESSION_TRACK
    | CLIENT_DEPRECATE_EOF
    | CLIENT_REMEMBER_OPTIONS
    | MARIADB_CLIENT_STMT_BULK_OPERATIONS
    | MARIADB_CLIENT_EXTENDED_METADATA
)
# Client capabilities that change what the server sends or accepts: a server connection is
# opened with the client's own choice of these, and only clients that made the same choice
# share it (they are part of the pool key). A server connection opened with LOCAL_FILES
# is never lent to a client that did not offer it, which gets the server's own refusal of
# LOAD DATA LOCAL, as directly.
SESSION_CAPABILITIES = (
    CLIENT_FOUND_ROWS
    | CLIENT_LOCAL_FILES
    | CLIENT_LONG_FLAG
    | CLIENT_NO_SCHEMA
    | CLIENT_ODBC
    | CLIENT_IGNORE_SPACE
    | CLIENT_INTERACTIVE
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PS_MULTI_RESULTS
    | CLIENT_SESSION_TRACK
    | CLIENT_DEPRECATE_EOF
    | MARIADB_CLIENT_STMT_BULK_OPERATIONS
    | MARIADB_CLIENT_EXTENDED_METADATA
)
# What dbmux itself needs of every server connection.
SERVER_BASE_CAPABILITIES = (
    CLIENT_PROTOCOL_41
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_TRANSACTIONS
    | CLIENT_LONG_PASSWORD
)


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's Initial Handshake Packet (protocol 10)."""

    version: str
    thread_id: int
    nonce: bytes
    capabilities: int
    charset: int
    status: int
    plugin: str


def parse_greeting(payload: bytes) -> Greeting:
    if not payload or payload[0] != 10:
        if payload[:1] == b"\xff":
            raise ProtocolViolation(f"the server refused: {parse_err(payload).message}")
        raise ProtocolViolation("not a protocol 10 greeting")
    try:
        version, pos = read_nul_str(payload, 1)
        thread_id = _U32.unpack_from(payload, pos)[0]
        nonce = payload[pos + 4 : pos + 12]
        pos += 13
        capabilities = _U16.unpack_from(payload, pos)[0]
        charset = payload[pos + 2]
        status = _U16.unpack_from(payload, pos + 3)[0]
        capabilities |= _U16.unpack_from(payload, pos + 5)[0] << 16
        auth_length = payload[pos + 7]
        if not capabilities & CLIENT_LONG_PASSWORD:  # MariaDB's extended capabilities
            capabilities |= _U32.unpack_from(payload, pos + 14)[0] << 32
        pos += 18
        if capabilities & CLIENT_SECURE_CONNECTION:
            rest = max(13, auth_length - 8)
            nonce += payload[pos : pos + rest].rstrip(b"\0")
            pos += rest
        plugin = b""
        if capabilities & CLIENT_PLUGIN_AUTH:
            plugin = payload[pos:].split(b"\0", 1)[0]
    except (IndexError, struct.error):
        raise ProtocolViolation("truncated greeting") from None
    return Greeting(
        version.decode(errors="replace"),
        thread_id,
        nonce,
        capabilities,
        charset,
        status,
        plugin.decode(errors="replace"),
    )


def build_greeting(greeting: Greeting) -> bytes:
    caps = greeting.capabilities
    nonce = greeting.nonce
    return b"".join(
        (
            b"\x0a",
            greeting.version.encode() + b"\0",
            _U32.pack(greeting.thread_id),
            nonce[:8],
            b"\0",
            _U16.pack(caps & 0xFFFF),
            bytes((greeting.charset,)),
            _U16.pack(greeting.status),
            _U16.pack((caps >> 16) & 0xFFFF),
            bytes((len(nonce) + 1,)),
            b"\0" * 6,
            _U32.pack((caps >> 32) & 0xFFFFFFFF if not caps & CLIENT_LONG_PASSWORD else 0),
            nonce[8:] + b"\0",
            greeting.plugin.encode() + b"\0",
        )
    )


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """The client's Handshake Response 41 (or, when `ssl_request`, the SSL request before it)."""

    capabilities: int
    max_packet: int
    charset: int
    user: str
    auth_response: bytes
    database: str
    plugin: str
    attributes: bytes
    ssl_request: bool = False


def parse_handshake_response(payload: bytes) -> HandshakeResponse:
    if len(payload) < 32:
        raise ProtocolViolation("handshake response too short")
    caps = _U32.unpack_from(payload, 0)[0]
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolViolation("clients older than protocol 4.1 are not supported")
    max_packet = _U32.unpack_from(payload, 4)[0]
    charset = payload[8]
    if not caps & CLIENT_LONG_PASSWORD:
        caps |= _U32.unpack_from(payload, 28)[0] << 32
    if len(payload) == 32:
        return HandshakeResponse(caps, max_packet, charset, "", b"", "", "", b"", True)
    try:
        user, pos = read_nul_str(payload, 32)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth, pos = read_lenenc_str(payload, pos)
        elif caps & CLIENT_SECURE_CONNECTION:
            size = payload[pos]
            auth, pos = payload[pos + 1 : pos + 1 + size], pos + 1 + size
        else:
            auth, pos = read_nul_str(payload, pos)
        database = b""
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
            database, pos = read_nul_str(payload, pos)
        plugin = b""
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            plugin, pos = read_nul_str(payload, pos)
        attributes = payload[pos:] if caps & CLIENT_CONNECT_ATTRS else b""
    except (IndexError, ValueError):
        raise ProtocolViolation("malformed handshake response") from None
    return HandshakeResponse(
        caps,
        max_packet,
        charset,
        user.decode(errors="replace"),
        auth or b"",
        database.decode(errors="replace"),
        plugin.decode(errors="replace"),
        attributes,
    )


def build_ssl_request(capabilities: int, charset: int) -> bytes:
    """The SSL request: the handshake response's fixed part, which CLIENT_SSL in
    `capabilities` tells the server to follow with a TLS handshake."""
    extended = 0 if capabilities & CLIENT_LONG_PASSWORD else (capabilities >> 32) & 0xFFFFFFFF
    return b"".join(
        (
            _U32.pack(capabilities & 0xFFFFFFFF),
            _U32.pack(MAX_COMMAND),
            bytes((charset,)),
            b"\0" * 19,
            _U32.pack(extended),
        )
    )


def build_handshake_response(
    *, capabilities: int, charset: int, user: str, auth_response: bytes, database: str, plugin: str
) -> bytes:
    caps = capabilities if database else capabilities & ~CLIENT_CONNECT_WITH_DB
    parts = [
        build_ssl_request(caps, charset),
        user.encode() + b"\0",
        lenenc_str(auth_response),
    ]
    if caps & CLIENT_CONNECT_WITH_DB:
        parts.append(database.encode() + b"\0")
    parts.append(plugin.encode() + b"\0")
    return b"".join(parts)


def auth_switch_request(plugin: str, nonce: bytes) -> bytes:
    return b"\xfe" + plugin.encode() + b"\0" + nonce + b"\0"


@dataclass(frozen=True, slots=True)
class ChangeUser:
    user: str
    auth_response: bytes
    database: str
    charset: int | None
    plugin: str


def parse_change_user(payload: bytes, capabilities: int) -> ChangeUser:
    try:
        user, pos = read_nul_str(payload, 1)
        if capabilities & CLIENT_SECURE_CONNECTION:
            size = payload[pos]
            auth, pos = payload[pos + 1 : pos + 1 + size], pos + 1 + size
        else:
            auth, pos = read_nul_str(payload, pos)
        database, pos = read_nul_str(payload, pos)
        charset = None
        if pos + 2 <= len(payload):
            charset = _U16.unpack_from(payload, pos)[0] & 0xFF
            pos += 2
        plugin = b""
        if capabilities & CLIENT_PLUGIN_AUTH and pos < len(payload):
            plugin = payload[pos:].split(b"\0", 1)[0]
    except (IndexError, struct.error):
        raise ProtocolViolation("malformed COM_CHANGE_USER") from None
    return ChangeUser(
        user.decode(errors="replace"),
        auth,
        database.decode(errors="replace"),
        charset,
        plugin.decode(errors="replace"),
    )
