"""Fuzz harness of the PostgreSQL engine's parsers: the client-facing scanners and login
parsers, the server-facing scanner, SCRAM both ways and the pinning classifier.

`one_input` must end normally or with a clean refusal (ProtocolViolation, ScramError,
LoginRefused) for every input; any other exception, a broken invariant (AssertionError) or a
hang is a finding.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable

from bench.fuzz.draw import Draw, run_one, sql_text
from dbmux.auth.scram import ScramAuthFailed, ScramClient, ScramError, ScramServer, ScramVerifier
from dbmux.engines.postgres import pinning, scanners, wire
from dbmux.engines.postgres.login import LoginRefused, parse_options
from dbmux.engines.postgres.pinning import Classifier

PASSWORD = "pencil"
# One iteration: the harness checks the message handling, not PBKDF2's cost.
VERIFIER = ScramVerifier.from_password(PASSWORD, iterations=1, salt=b"fuzz-salt")
NONCE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=!~"
TEXT_CHARS = "abcxyz_=-, .'\"\\\u00e9\u200b"

SQL_WORDS = (
    "SET", "RESET", "ALL", "SESSION", "LOCAL", "TO", "DEFAULT", "search_path", "TimeZone",
    "PREPARE", "EXECUTE", "DEALLOCATE", "DISCARD", "LISTEN", "UNLISTEN", "LOAD", "DO",
    "CREATE", "TEMP", "TEMPORARY", "TABLE", "FUNCTION", "VIEW", "SEQUENCE", "pg_temp", "AS",
    "SELECT", "INTO", "FROM", "DECLARE", "CURSOR", "WITH", "HOLD", "WITHOUT", "BEGIN",
    "COMMIT", "ROLLBACK", "set_config", "pg_advisory_lock", "pg_try_advisory_lock_shared",
    "currval", "lastval", "nextval", "pg_catalog", "now()", "true", "false", "ON", "OFF",
    "TRANSACTION", "ISOLATION", "LEVEL", "ROLE", "SESSION AUTHORIZATION", "x", "t",
)  # fmt: skip

# Client message types valid after login, with the payload each gets.
FRONTEND_KINDS = b"BdFPQfCcDEHSX"


# ---------------------------------------------------------------------------------------------
# Client to server


def _frontend_message(draw: Draw) -> bytes | None:
    """One client message; None for one the proxy must refuse."""
    if draw.chance(24):
        return None
    kind = draw.pick(FRONTEND_KINDS)
    if kind == 81:  # Q
        payload = sql_text(draw, SQL_WORDS) + b"\0"
    elif kind == 80:  # P: name, text, parameter types
        payload = _name(draw) + sql_text(draw, SQL_WORDS) + b"\0" + draw.bytes(8)
    elif kind == 66:  # B: portal, statement, the rest
        payload = _name(draw) + _name(draw) + draw.bytes(20)
    elif kind in b"DC":  # Describe, Close: a portal or a statement
        payload = draw.pick((b"S", b"P")) + _name(draw)
    elif kind == 88:  # X
        payload = b""
    else:
        payload = draw.bytes(40)
    return wire.message(bytes((kind,)), payload)


def _name(draw: Draw) -> bytes:
    """Mostly the unnamed statement or portal, sometimes a name."""
    return b"\0" if draw.below(3) else draw.text(NONCE_CHARS, 6).encode() + b"\0"


def _names_something(kind: int, payload: bytes) -> bool:
    """A Bind with a named portal or statement, a Describe or Close of a named statement:
    the client's names, which the proxy maps to its own (the scanner stops before them)."""
    if kind == 80:
        return payload[0] != 0
    if kind == 66:
        return payload[:2] != b"\0\0"
    return kind in b"DC" and payload[0] == 83 and payload[1] != 0


def _refused_header(draw: Draw) -> bytes:
    """A header the proxy must refuse: a type clients may not send, or a length out of range."""
    choice = draw.below(3)
    if choice == 0:
        kind = draw.pick([k for k in range(256) if wire.FRONTEND_LIMITS[k] == 0])
        length = 4 + draw.below(64)
    elif choice == 1:
        kind = draw.pick(FRONTEND_KINDS)
        length = draw.below(4)
    else:
        kind = draw.pick(b"CcDEHSX")
        length = wire.MAX_SMALL_MESSAGE + 1 + draw.below(1 << 20)
    return bytes((kind,)) + length.to_bytes(4, "big") + draw.bytes(8)


def _expected_frontend(stream: bytes, refused_at: int) -> tuple[object, ...]:
    """What the scanner must report for a stream of whole messages and, from `refused_at`
    on, a header to refuse: the same shape as _scan_frontend's result."""
    syncs = 0
    statements = []
    pos = 0
    while pos < len(stream):
        kind = stream[pos]
        end = pos + 1 + int.from_bytes(stream[pos + 1 : pos + 5], "big")
        payload = stream[pos + 5 : end]
        if pos == refused_at:
            return ("refused",)
        if kind == 88:
            return stream[:pos], syncs, statements, True, b""
        if _names_something(kind, payload):
            return stream[:pos], syncs, statements, False, stream[pos:]
        syncs += kind in b"QSF"
        if kind in b"QP":
            statements.append((kind, payload))
        pos = end
    return stream, syncs, statements, False, b""


def _client_messages(draw: Draw) -> tuple[bytes, int]:
    """Up to 12 client messages, the last one now and then refused; and where that one is
    (-1 for none)."""
    stream = b""
    for _ in range(draw.below(12)):
        raw = _frontend_message(draw)
        if raw is None:
            return stream + _refused_header(draw), len(stream)
        stream += raw
    return stream, -1


def client_stream(data: bytes) -> bytes:
    """What a hostile client sends after login for one corpus input (bench.fuzz.live)."""
    draw = Draw(data)
    draw.byte()
    return _client_messages(draw)[0]


def frontend_stream(draw: Draw) -> None:
    """A valid client stream (with, now and then, one message the proxy must refuse) cut at
    random points: everything up to Terminate or the first named statement or portal is
    relayed, every Query/Sync/FunctionCall counted and every Query and Parse text sliced out;
    from a name on the input is handed over whole; a refused header is refused when reached.
    take_messages returns every message and refuses the same header."""
    stream, refused_at = _client_messages(draw)
    pieces = draw.chunked(stream)
    expected = _expected_frontend(stream, refused_at)
    got = _scan_frontend(pieces)
    assert got == expected, (got, expected)
    _take_all(pieces, stream, refused_at >= 0)


def _scan_frontend(pieces: list[bytes]) -> tuple[object, ...]:
    """Relayed bytes, syncs, statements, terminated, and the input handed over from the
    first name on (the diverted bytes and every later piece), or ("refused",)."""
    scanner = scanners.FrontendScanner()
    relayed = b""
    syncs = 0
    try:
        for i, piece in enumerate(pieces):
            relayed += scanner.feed(piece)
            syncs += scanner.syncs
            if scanner.terminated:
                break
            if scanner.diverted is not None:
                rest = scanner.diverted + b"".join(pieces[i + 1 :])
                return relayed, syncs, scanner.statements, False, rest
    except wire.ProtocolViolation:
        return ("refused",)
    return relayed, syncs, scanner.statements, scanner.terminated, b""


def _take_all(pieces: list[bytes], stream: bytes, refused: bool) -> None:
    buf = bytearray()
    taken: list[tuple[int, bytes]] = []
    syncs = 0
    try:
        for piece in pieces:
            buf += piece
            more, count = wire.take_messages(buf)
            taken += more
            syncs += count
    except wire.ProtocolViolation:
        assert refused, "take_messages refused a valid client stream"
        return
    assert not refused, "take_messages let a refused header through"
    assert not buf, "take_messages left a complete stream in the buffer"
    assert wire.encode(taken) == stream
    assert syncs == sum(kind in b"QSF" for kind, _ in taken)
    for kind, payload in taken:
        _names(kind, payload)


def _names(kind: int, payload: bytes) -> None:
    """The statement and portal names a client message carries, read as the proxy maps
    them (statements.py): read or refused cleanly."""
    with contextlib.suppress(wire.ProtocolViolation):
        if kind in b"PB":
            _, at = wire.split_name(payload)
            if kind == 66:
                wire.split_name(payload, at)
        elif kind in b"CD" and payload[:1] == b"S":
            wire.split_name(payload, 1)


def frontend_bytes(draw: Draw) -> None:
    """Any bytes, cut two ways: the scanner's results do not depend on the cutting (it is
    refused both ways or neither); take_messages and the names in what it takes are read
    or refused cleanly."""
    pieces = draw.chunked(draw.rest())
    whole = _scan_frontend([b"".join(pieces)])
    cut = _scan_frontend(pieces)
    assert whole == cut, (whole, cut)
    buf = bytearray()
    with contextlib.suppress(wire.ProtocolViolation):
        for piece in pieces:
            buf += piece
            for kind, payload in wire.take_messages(buf)[0]:
                _names(kind, payload)


# ---------------------------------------------------------------------------------------------
# Login


def startup(draw: Draw) -> None:
    """Startup packets (SSLRequest, CancelRequest, StartupMessage with random parameters and
    options) or any bytes, cut at random: parsed back exactly, or refused cleanly."""
    expected: dict[str, str] | None = None
    if draw.below(2):
        stream = draw.rest()
    else:
        names = ("user", "database", "options", "application_name", "_pq_.x", "replication")
        params = {
            draw.pick(names) if draw.below(2) else draw.text(NONCE_CHARS, 6) or "x": draw.text(
                TEXT_CHARS, 12
            )
            for _ in range(draw.below(6))
        }
        if draw.below(2):
            params["options"] = " ".join(
                draw.pick(("-c", "-csearch_path=x", "--work-mem=4MB", "a=b", "\\ ", "-c"))
                for _ in range(draw.below(5))
            )
        stream = wire.startup_message(params)
        if len(stream) <= wire.MAX_STARTUP:
            expected = params
        if draw.below(2):
            stream = wire.cancel_request(draw.below(1 << 31), draw.below(1 << 31)) + stream
        if draw.below(2):
            stream = (8).to_bytes(4, "big") + wire.SSL_REQUEST.to_bytes(4, "big") + stream
    buf = bytearray()
    try:
        for piece in draw.chunked(stream):
            buf += piece
            while (packet := wire.split_startup(buf)) is not None:
                code, params = wire.parse_startup(packet)
                if code == wire.CANCEL_REQUEST:
                    wire.parse_cancel(packet)
                elif code == wire.PROTOCOL_3_0:
                    if expected is not None:
                        assert params == expected, (params, expected)
                        expected = None
                    _options(params.get("options", ""))
    except wire.ProtocolViolation:
        assert expected is None, "a valid startup packet was refused"
    assert expected is None or not stream, "a valid startup packet was not parsed"


def _options(options: str) -> None:
    with contextlib.suppress(LoginRefused):
        parse_options(options)


def scram_server(draw: Draw) -> None:
    """The proxy authenticating a client: a real SCRAM client's messages, with a random
    password, user and nonce, and now and then one byte changed, or raw bytes. A correct
    exchange succeeds, a wrong password fails, anything else is refused as malformed."""
    password = PASSWORD if draw.below(2) else draw.text(TEXT_CHARS, 8) or "x"
    client = ScramClient(
        password, username=draw.text(TEXT_CHARS, 8), nonce=draw.text(NONCE_CHARS, 24) or "n"
    )
    server = ScramServer(VERIFIER)
    original = client.client_first()
    first = _maybe_flip(draw, original)
    if draw.chance(8):
        first = draw.bytes(60)
    mutated = first != original
    message = wire.sasl_initial_response("SCRAM-SHA-256", first)
    if draw.chance(8):
        message = b"p" + draw.bytes(60)
        mutated = True
    try:
        _, data = wire.parse_sasl_initial(_read_password(draw, message))
        server_first = server.handle_client_first(data)
        final = client.handle_server_first(server_first)
        changed = _maybe_flip(draw, final)
        mutated = mutated or changed != final
        server_final = server.handle_client_final(
            _read_password(draw, wire.password_message(changed))
        )
        client.verify_server_final(server_final)
    except (wire.ProtocolViolation, ScramAuthFailed) as refusal:
        assert mutated or (isinstance(refusal, ScramAuthFailed) and password != PASSWORD)
        return
    except ScramError:
        assert mutated, "a well-formed exchange was refused as malformed"
        return
    assert server.authenticated
    assert password == PASSWORD or mutated, "a wrong password was accepted"


def _read_password(draw: Draw, message: bytes) -> bytes:
    """An authentication message as login reads it, in random chunks; one that never
    completes is refused as the login deadline would."""
    buf = bytearray()
    for piece in draw.chunked(message):
        buf += piece
        payload = wire.split_password_message(buf)
        if payload is not None:
            return payload
    raise wire.ProtocolViolation("incomplete authentication message")


def scram_client(draw: Draw) -> None:
    """The proxy logging in to a server that answers with random server-first and
    server-final messages: each is taken or refused with ScramError."""
    client = ScramClient(PASSWORD, nonce="clientnonce")
    client.client_first()
    if draw.below(2):
        salt = base64.b64encode(draw.bytes(12)).decode()
        iterations = str(draw.below(4096)) if draw.below(8) else draw.text("0123456789", 12)
        text = f"r=clientnonce{draw.text(NONCE_CHARS, 8)},s={salt},i={iterations}"
        server_first = _maybe_flip(draw, text.encode())
    else:
        server_first = draw.bytes(80)
    try:
        client.handle_server_first(server_first)
        client.verify_server_final(draw.rest())
    except ScramError:
        return
    raise AssertionError("a random server signature was accepted")


def _maybe_flip(draw: Draw, data: bytes) -> bytes:
    if not data or draw.below(4):
        return data
    at = draw.below(len(data))
    return data[:at] + bytes((draw.byte(),)) + data[at + 1 :]


# ---------------------------------------------------------------------------------------------
# Server to client


def _backend_message(draw: Draw) -> bytes:
    choice = draw.below(12)
    if choice == 0:
        return wire.ready_for_query(draw.pick((b"I", b"T", b"E")))
    if choice == 1:
        name, value = draw.text(TEXT_CHARS, 8), draw.text(TEXT_CHARS, 8)
        return wire.parameter_status(name.replace("\0", ""), value)
    if choice == 2:
        severity = draw.pick(("ERROR", "FATAL", "PANIC", "WARNING"))
        return wire.error_response("XX000", draw.text(TEXT_CHARS, 12), severity=severity)
    if choice == 3:  # a server before 9.6: no V field
        return wire.message(b"E", b"S" + draw.pick((b"FATAL", b"ERROR")) + b"\0Mx\0\0")
    if choice == 4:  # NotificationResponse: process id, channel, payload
        return wire.message(b"A", draw.pick(PIDS) + b"chan\0" + draw.bytes(8) + b"\0")
    if choice == 5:
        return wire.message(b"N", b"SNOTICE\0VNOTICE\0Mhi\0\0")
    kind = draw.pick(b"DCT123nsItGHWdcK")
    return wire.message(bytes((kind,)), draw.bytes(50 if kind == 68 else 12))


PIDS = (b"\0\0\0\x01", b"\0\0\0\x02", b"\x7f\xff\xff\xff")
PID_MAP = {b"\0\0\0\x01": b"\0\0\x10\x01", b"\x7f\xff\xff\xff": b"\0\0\x10\x02"}


def backend_stream(draw: Draw) -> None:
    """Valid server messages cut at random points: the client gets every byte but the FATAL
    errors (kept back, the last one noted), with notifications' process ids translated; every
    ReadyForQuery and its status, ParameterStatus and non-fatal error is reported."""
    pid_map = PID_MAP if draw.below(2) else None
    raw = [_backend_message(draw) for _ in range(draw.below(16))]
    scanner = scanners.BackendScanner()
    scanner.pid_map = pid_map
    relayed = b""
    ready = 0
    for piece in draw.chunked(b"".join(raw)):
        relayed += scanner.feed(piece)
        ready += scanner.ready
    expected = b""
    fatal = None
    statuses = [wire.IDLE]
    params = []
    errors = 0
    for message in raw:
        kind, payload = message[0], message[5:]
        fatal_marks = b"\0VFATAL\0" in payload or payload.startswith((b"SFATAL\0", b"SPANIC"))
        if kind == 69 and fatal_marks:
            fatal = payload
            continue
        if kind == 65 and pid_map is not None and payload[:4] in pid_map:
            message = message[:5] + pid_map[payload[:4]] + message[9:]
        errors += kind == 69
        if kind == 90:
            statuses.append(payload[0])
        elif kind == 83:
            params.append(payload)
        expected += message
    assert relayed == expected, (relayed, expected)
    assert ready == len(statuses) - 1 and scanner.status == statuses[-1]
    assert scanner.params == params and scanner.errors == errors and scanner.fatal == fatal


def backend_bytes(draw: Draw) -> None:
    """Any bytes from the server, cut two ways: the same bytes relayed and the same facts
    reported (or refused both ways)."""
    pid_map = PID_MAP if draw.below(2) else None
    pieces = draw.chunked(draw.rest())
    whole = _scan_backend([b"".join(pieces)], pid_map)
    cut = _scan_backend(pieces, pid_map)
    assert whole == cut, (whole, cut)


def _scan_backend(pieces: list[bytes], pid_map: dict[bytes, bytes] | None) -> tuple[object, ...]:
    scanner = scanners.BackendScanner()
    scanner.pid_map = pid_map
    relayed = b""
    ready = 0
    try:
        for piece in pieces:
            relayed += scanner.feed(piece)
            ready += scanner.ready
    except wire.ProtocolViolation:
        return ("refused",)
    return relayed, ready, scanner.status, scanner.params, scanner.errors, scanner.fatal


def error_fields(draw: Draw) -> None:
    """ErrorResponse/NoticeResponse fields of any payload parse without an exception."""
    fields = wire.parse_fields(draw.rest())
    assert all(len(code) == 1 for code in fields)


# ---------------------------------------------------------------------------------------------
# Query texts


def classify(draw: Draw) -> None:
    """Any query text, in every classifier mode, gets a verdict (never an exception); a text
    of statements the server could run that the fast path lets through (might_pin False)
    needs no pin when fully read."""
    classifier = Classifier(
        exclude_variable_sets=draw.below(2) == 1, replay_settings=draw.below(2) == 1
    )
    sql = sql_text(draw, SQL_WORDS) if draw.below(4) else draw.rest()
    classifier.verdict(sql)
    if not pinning.might_pin(sql) and _runnable(sql):
        fast_path = pinning.might_pin
        pinning.might_pin = lambda _sql: True
        try:
            full = classifier.verdict(sql)
        finally:
            pinning.might_pin = fast_path
        assert full.reason is None, (sql, full)


def _runnable(sql: bytes) -> bool:
    """Every statement of the text starts with a word, as one the server runs must (the
    classifier reads "*/SET" as a SET; the server refuses it), and its only blanks are
    PostgreSQL's (to the classifier's lexer a no-break space is one; to the server it is
    part of a name)."""
    try:
        text = sql.decode()
        statements = list(pinning.split_statements(text))
    except (UnicodeDecodeError, pinning.Unclassifiable):
        return False
    if any(ch.isspace() and ch not in " \t\n\r\f\v" for ch in text):
        return False
    return all(statement[0].kind == "word" for statement in statements)


HARNESSES: tuple[Callable[[Draw], None], ...] = (
    frontend_stream,
    frontend_bytes,
    startup,
    scram_server,
    scram_client,
    backend_stream,
    backend_bytes,
    error_fields,
    classify,
)


def one_input(data: bytes) -> None:
    """The fuzzer's entry point."""
    run_one(HARNESSES, data)
