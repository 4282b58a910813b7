"""Fuzz harness of the MySQL engine's parsers: packet reassembly, the client's handshake and
commands, the server's greeting and replies (the relay's response scanner), the SQL
classifier and the authentication plugins.

`one_input` must end normally or with a clean refusal (ProtocolViolation) for every input;
any other exception, a broken invariant (AssertionError), an error dbmux logged, or a hang
is a finding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from bench.fuzz.draw import Draw, run_one, sql_text
from bench.fuzz.logged import assert_nothing_logged
from dbmux.auth import mysql as auth
from dbmux.engines.mysql import handshake, pinning, scanners, wire

TEXT_CHARS = "abcxyz_-.@'\"`\\\u00e9 "
SQL_WORDS = (
    "SET", "SESSION", "GLOBAL", "LOCAL", "PERSIST", "@@session.", "@@", "@x", "@`y`", ":=",
    "autocommit", "sql_mode", "NAMES", "CHARACTER SET", "TRANSACTION", "ISOLATION LEVEL",
    "USE", "LOCK", "TABLES", "UNLOCK", "FLUSH", "BACKUP", "PREPARE", "EXECUTE", "DEALLOCATE",
    "DROP", "HANDLER", "XA", "CALL", "LOAD", "GET", "DIAGNOSTICS", "CREATE", "TEMPORARY",
    "TABLE", "IF", "NOT", "EXISTS", "WHILE", "LOOP", "REPEAT", "CASE", "DECLARE", "FOR",
    "BEGIN", "WORK", "END", "COMMIT", "SELECT", "INTO", "FROM", "DUAL", "GET_LOCK(",
    "RELEASE_LOCK(", "IS_USED_LOCK(", "LAST_INSERT_ID()", "FOUND_ROWS()", "ROW_COUNT()",
    "@@identity", "KILL", "QUERY", "CONNECTION", "USER", "ROLE", "label:", "/*!40101", "/*M!",
)  # fmt: skip
STATUSES = (0x0000, 0x0001, 0x0002, 0x0003, 0x4002)  # none ends a result early

UNREADABLE = pinning.Verdict(reason=pinning.UNCLASSIFIED)
RSA_KEY = auth.RsaKey.generate()


# ---------------------------------------------------------------------------------------------
# Packets


def packets(draw: Draw) -> None:
    """Framed payloads cut at random points come out of PacketReader whole, in order; a
    packet over the reader's limit is refused as soon as its header is in."""
    limit = draw.pick((64, 1024, wire.MAX_COMMAND))
    payloads = [draw.bytes(200) for _ in range(draw.below(8))]
    stream = b"".join(wire.packet(i, p) for i, p in enumerate(payloads))
    too_big = any(len(p) > limit for p in payloads)
    reader = wire.PacketReader(limit)
    buf = bytearray()
    taken = []
    try:
        for piece in draw.chunked(stream):
            buf += piece
            while (payload := reader.take(buf)) is not None:
                taken.append(payload)
    except wire.ProtocolViolation:
        assert too_big, "a packet within the limit was refused"
        return
    assert taken == payloads and not buf


def packet_bytes(draw: Draw) -> None:
    """Any bytes through PacketReader, cut two ways: the same payloads, or refused both ways."""
    limit = draw.pick((64, 1024, wire.MAX_COMMAND))
    pieces = draw.chunked(draw.rest())
    assert _take_packets([b"".join(pieces)], limit) == _take_packets(pieces, limit)


def _take_packets(pieces: list[bytes], limit: int) -> object:
    reader = wire.PacketReader(limit)
    buf = bytearray()
    taken = []
    try:
        for piece in pieces:
            buf += piece
            while (payload := reader.take(buf)) is not None:
                taken.append((reader.first_seq, payload))
    except wire.ProtocolViolation:
        return "refused"
    return taken


# ---------------------------------------------------------------------------------------------
# Server replies


class _Replies:
    """Builds a server's replies to a list of commands and what the scanner must conclude."""

    def __init__(self, draw: Draw, deprecate_eof: bool) -> None:
        self.draw = draw
        self.deprecate_eof = deprecate_eof
        self.payloads: list[bytes] = []
        self.status = wire.SERVER_STATUS_AUTOCOMMIT
        self.insert_id = 0
        self.failed = False

    def ok(self, *, more: bool = False, header: bytes = b"\0") -> None:
        self.status = self.draw.pick(STATUSES) | (wire.SERVER_MORE_RESULTS_EXISTS if more else 0)
        insert_id = self.draw.pick((0, 0, 7, 300, 70000, 1 << 40))
        self.insert_id = insert_id or self.insert_id
        ok = wire.ok_packet(affected=self.draw.below(1000), insert_id=insert_id, status=self.status)
        self.payloads.append(header + ok[1:])

    def eof(self, *, more: bool = False) -> None:
        self.status = self.draw.pick(STATUSES) | (wire.SERVER_MORE_RESULTS_EXISTS if more else 0)
        self.payloads.append(wire.eof_packet(self.status))

    def err(self) -> None:
        self.failed = True
        self.payloads.append(wire.err_packet((1064, "42000"), self.draw.text(TEXT_CHARS, 10)))

    def definitions(self, count: int) -> None:
        for _ in range(count):
            self.payloads.append(b"\x03def" + self.draw.bytes(30))

    def rows(self) -> None:
        for _ in range(self.draw.below(5)):
            self.payloads.append(b"".join(wire.lenenc_str(self.draw.bytes(12)) for _ in range(2)))

    def terminator(self, *, more: bool = False) -> None:
        """The end of rows: EOF, or an OK with the EOF header under CLIENT_DEPRECATE_EOF."""
        if self.deprecate_eof:
            self.ok(more=more, header=b"\xfe")
        else:
            self.eof(more=more)

    def result(self) -> None:
        """OK, ERR or a result set, and with the more-results flag another result after it."""
        self.failed = False
        choice = self.draw.below(4)
        more = self.draw.chance(4)
        if choice == 0:
            self.ok(more=more)
        elif choice == 1:
            self.err()
            return
        else:
            self.payloads.append(wire.lenenc_int(2))
            self.definitions(2)
            if not self.deprecate_eof:
                self.eof()
            self.rows()
            if self.draw.chance(6):
                self.err()
                return
            self.terminator(more=more)
        if more:
            self.result()

    def reply(self, kind: int) -> None:
        self.failed = False
        if kind == wire.RESPONSE_RESULT:
            self.result()
        elif kind == wire.RESPONSE_SIMPLE:
            self.draw.pick((self.ok, self.err, self.eof))()
        elif kind == wire.RESPONSE_FIELDS:
            self.definitions(self.draw.below(4))
            if self.draw.chance(4):
                self.err()
            else:
                self.payloads.append(wire.eof_packet(self.draw.pick(STATUSES)))
        elif kind == wire.RESPONSE_STRING:
            self.payloads.append(self.draw.text(TEXT_CHARS, 20).encode())
        elif kind == wire.RESPONSE_ROWS:
            self.rows()
            self.terminator()
        else:
            self.prepare()

    def prepare(self) -> None:
        if self.draw.chance(4):
            self.err()
            return
        columns, params = self.draw.below(3), self.draw.below(3)
        ok = b"\0" + self.draw.below(1 << 32).to_bytes(4, "little")
        counts = columns.to_bytes(2, "little") + params.to_bytes(2, "little")
        self.payloads.append(ok + counts + b"\0\0\0")
        for count in (params, columns):
            self.definitions(count)
            if count and not self.deprecate_eof:
                self.payloads.append(wire.eof_packet(self.draw.pick(STATUSES)))


# Responses whose end carries no status flags the scanner reads.
NO_STATUS = (wire.RESPONSE_FIELDS, wire.RESPONSE_STRING, wire.RESPONSE_PREPARE)
KINDS = (
    wire.RESPONSE_RESULT,
    wire.RESPONSE_SIMPLE,
    wire.RESPONSE_FIELDS,
    wire.RESPONSE_STRING,
    wire.RESPONSE_ROWS,
    wire.RESPONSE_PREPARE,
)


def response_stream(draw: Draw) -> None:
    """A server's valid replies to random commands, cut at random points: the scanner
    completes exactly one response per command and ends with the status, insert id and
    failure of the last ones."""
    replies = _Replies(draw, deprecate_eof=draw.below(2) == 1)
    kinds = [draw.pick(KINDS) for _ in range(draw.below(6))]
    scanner = scanners.ResponseScanner(replies.deprecate_eof)
    for kind in kinds:
        scanner.expect(kind)
        replies.reply(kind)
    stream = b"".join(wire.packet(i, p) for i, p in enumerate(replies.payloads))
    done = sum(scanner.feed(piece) for piece in draw.chunked(stream))
    assert done == len(kinds) and not scanner.busy, (done, kinds)
    assert scanner.failed == replies.failed
    if kinds and not replies.failed and kinds[-1] not in NO_STATUS:
        assert scanner.status == replies.status, (scanner.status, replies.status)
    assert scanner.insert_id == replies.insert_id


def response_bytes(draw: Draw) -> None:
    """Any bytes as the replies to random commands, cut two ways: the same conclusions, or
    refused both ways."""
    deprecate_eof = draw.below(2) == 1
    kinds = [draw.pick(KINDS) for _ in range(draw.below(4))]
    pieces = draw.chunked(draw.rest())
    whole = _scan_replies([b"".join(pieces)], kinds, deprecate_eof)
    assert whole == _scan_replies(pieces, kinds, deprecate_eof)


def _scan_replies(pieces: list[bytes], kinds: list[int], deprecate_eof: bool) -> object:
    scanner = scanners.ResponseScanner(deprecate_eof)
    for kind in kinds:
        scanner.expect(kind)
    try:
        done = sum(scanner.feed(piece) for piece in pieces)
    except wire.ProtocolViolation:
        return "refused"
    facts = (scanner.busy, scanner.status, scanner.insert_id, scanner.failed, scanner.unsolicited)
    return done, facts


# ---------------------------------------------------------------------------------------------
# Handshake and commands


def _flags(draw: Draw, always: int) -> int:
    caps = always
    for bit in range(36):
        if draw.below(2):
            caps |= 1 << bit
    return caps


def handshake_response(draw: Draw) -> None:
    """A client's handshake response as drivers build it is read back exactly; any other
    payload is read or refused with ProtocolViolation."""
    if draw.below(2):
        with contextlib.suppress(wire.ProtocolViolation):
            handshake.parse_handshake_response(draw.rest())
        return
    caps = _flags(
        draw, handshake.CLIENT_PROTOCOL_41 | handshake.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    )
    user, database = draw.text(TEXT_CHARS, 10), draw.text(TEXT_CHARS, 10)
    auth_response, plugin = draw.bytes(40), draw.text(TEXT_CHARS, 10)
    payload = handshake.build_handshake_response(
        capabilities=caps,
        charset=draw.byte(),
        user=user,
        auth_response=auth_response,
        database=database,
        plugin=plugin,
    )
    parsed = handshake.parse_handshake_response(payload)
    assert (parsed.user, parsed.auth_response) == (user, auth_response)
    assert parsed.database == (database if caps & handshake.CLIENT_CONNECT_WITH_DB else "")
    assert parsed.plugin == (plugin if caps & handshake.CLIENT_PLUGIN_AUTH else "")


def greeting(draw: Draw) -> None:
    """A server greeting as servers build it is read back exactly; any other payload is read
    or refused with ProtocolViolation."""
    if draw.below(2):
        with contextlib.suppress(wire.ProtocolViolation):
            handshake.parse_greeting(draw.rest())
        return
    caps = _flags(draw, handshake.CLIENT_SECURE_CONNECTION | handshake.CLIENT_PLUGIN_AUTH)
    if caps & handshake.CLIENT_LONG_PASSWORD:
        caps &= 0xFFFFFFFF  # MySQL: no extended capabilities
    sent = handshake.Greeting(
        version=draw.text(TEXT_CHARS, 12),
        thread_id=draw.below(1 << 32),
        nonce=auth.new_nonce(),
        capabilities=caps,
        charset=draw.byte(),
        status=draw.below(1 << 16),
        plugin=draw.pick(("mysql_native_password", "caching_sha2_password", "")),
    )
    assert handshake.parse_greeting(handshake.build_greeting(sent)) == sent


def commands(draw: Draw) -> None:
    """COM_CHANGE_USER and statement commands of any shape are read or refused cleanly."""
    payload = draw.rest()
    with contextlib.suppress(wire.ProtocolViolation):
        handshake.parse_change_user(payload, _flags(Draw(payload[:5]), 0))
    try:
        wire.statement_id(payload)
        wire.execute_types(payload, payload[0] if payload else 0)
    except wire.ProtocolViolation:
        pass


# What each command a hostile client sends is answered with (None: nothing).
COMMANDS = {
    wire.COM_QUERY: wire.RESPONSE_RESULT,
    wire.COM_STMT_PREPARE: wire.RESPONSE_PREPARE,
    wire.COM_STMT_EXECUTE: wire.RESPONSE_RESULT,
    wire.COM_STMT_SEND_LONG_DATA: None,
    wire.COM_STMT_CLOSE: None,
    wire.COM_STMT_RESET: wire.RESPONSE_SIMPLE,
    wire.COM_STMT_FETCH: wire.RESPONSE_ROWS,
    wire.COM_PING: wire.RESPONSE_SIMPLE,
    wire.COM_INIT_DB: wire.RESPONSE_SIMPLE,
    wire.COM_FIELD_LIST: wire.RESPONSE_FIELDS,
    wire.COM_SET_OPTION: wire.RESPONSE_SIMPLE,
    wire.COM_STATISTICS: wire.RESPONSE_STRING,
    wire.COM_RESET_CONNECTION: wire.RESPONSE_SIMPLE,
    wire.COM_PROCESS_KILL: wire.RESPONSE_SIMPLE,
}


def client_commands(data: bytes) -> list[tuple[bytes, int | None]]:
    """What a hostile client sends after login for one corpus input (bench.fuzz.live): up
    to 8 command payloads (SQL texts, statement commands with made-up ids and parameters)
    and the response each expects."""
    draw = Draw(data)
    draw.byte()
    commands = []
    for _ in range(draw.below(8)):
        command = draw.pick(sorted(COMMANDS))
        body = sql_text(draw, SQL_WORDS) if command in (3, 0x16) else draw.bytes(24)
        commands.append((bytes((command,)) + body, COMMANDS[command]))
    return commands


# ---------------------------------------------------------------------------------------------
# Query texts and passwords


def classify_sql(draw: Draw) -> None:
    """Any query text, in every classifier mode, gets a verdict without a logged error; a
    text the fast path lets through (might_matter False) leaves no state when fully read
    (or cannot be read: an unterminated quote, which the server refuses too)."""
    classifier = pinning.Classifier(
        exclude_variable_sets=draw.below(2) == 1, replay_settings=draw.below(2) == 1
    )
    sql = sql_text(draw, SQL_WORDS) if draw.below(4) else draw.rest()
    classifier.verdict(sql)
    assert_nothing_logged()
    if len(sql) <= pinning.MAX_STATEMENT_SIZE and not pinning.might_matter(sql):
        fast_path = pinning.might_matter
        pinning.might_matter = lambda _sql: True
        try:
            full = classifier.verdict(sql)
        finally:
            pinning.might_matter = fast_path
        assert full in (pinning.NO_STATE, UNREADABLE), (sql, full)
        assert_nothing_logged()


def passwords(draw: Draw) -> None:
    """Any scramble or RSA ciphertext a client sends is checked without an exception."""
    password = draw.text(TEXT_CHARS, 8)
    nonce = draw.bytes(auth.NONCE_LENGTH)
    response = draw.bytes(40)
    assert auth.verify_native(password, nonce, response) == (
        response == auth.native_scramble(password, nonce)
    )
    assert auth.verify_sha2(password, nonce, response) == (
        response == auth.sha2_scramble(password, nonce)
    )
    if draw.chance(4):
        sent = auth.encrypt_password(password, nonce or b"n", RSA_KEY.public_pem)
        assert RSA_KEY.decrypt_password(sent, nonce or b"n") == password
    else:
        assert RSA_KEY.decrypt_password(draw.rest(), nonce) is None


HARNESSES: tuple[Callable[[Draw], None], ...] = (
    packets,
    packet_bytes,
    response_stream,
    response_bytes,
    handshake_response,
    greeting,
    commands,
    classify_sql,
    passwords,
)


def one_input(data: bytes) -> None:
    """The fuzzer's entry point."""
    run_one(HARNESSES, data)
