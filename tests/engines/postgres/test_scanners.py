"""PostgreSQL relay scanners on byte fixtures: BackendScanner and FrontendScanner must report
the same facts however TCP happens to cut the stream, and refuse malformed streams with
ProtocolViolation rather than crash or guess."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.engines.postgres.scanners import BackendScanner, FrontendScanner
from dbmux.engines.postgres.wire import (
    MAX_MESSAGE,
    MAX_SMALL_MESSAGE,
    ProtocolViolation,
    cstr,
    error_response,
    message,
    parameter_status,
    parse_fields,
    query,
    ready_for_query,
)
from tests.engines.postgres.test_wire import data_row, i16, i32, raw

SPLITS = settings(max_examples=150, deadline=None)

# ---------------------------------------------------------------------------------------------
# Message fixtures, built field by field as the protocol documentation lays them out (on top
# of i16, i32, raw and data_row from test_wire)


def row_description(*names: str) -> bytes:
    fields = b"".join(
        cstr(name) + i32(16384) + i16(i + 1) + i32(25) + i16(-1) + i32(-1) + i16(0)
        for i, name in enumerate(names)
    )
    return raw(b"T", i16(len(names)) + fields)


def command_complete(tag: str) -> bytes:
    return raw(b"C", cstr(tag))


def notice(text: str) -> bytes:
    return raw(b"N", b"SNOTICE\0VNOTICE\0C00000\0M" + cstr(text) + b"\0")


def parse(name: str, sql: str, *oids: int) -> bytes:
    return raw(b"P", cstr(name) + cstr(sql) + i16(len(oids)) + b"".join(i32(o) for o in oids))


def bind(portal: str, statement: str, *params: bytes | None) -> bytes:
    values = b"".join(i32(-1) if p is None else i32(len(p)) + p for p in params)
    return raw(b"B", cstr(portal) + cstr(statement) + i16(0) + i16(len(params)) + values + i16(0))


def describe(what: bytes, name: str) -> bytes:
    return raw(b"D", what + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return raw(b"E", cstr(portal) + i32(max_rows))


def function_call(oid: int, *args: bytes) -> bytes:
    values = b"".join(i32(len(a)) + a for a in args)
    return raw(b"F", i32(oid) + i16(0) + i16(len(args)) + values + i16(0))


SYNC = raw(b"S", b"")
FLUSH = raw(b"H", b"")
COPY_DONE = raw(b"c", b"")
X = raw(b"X", b"")


def copy_data(data: bytes) -> bytes:
    return raw(b"d", data)


# ---------------------------------------------------------------------------------------------
# Feeding a stream in chunks and collecting what the scanners report


def cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    """Split `data` at the given offsets (duplicates give empty chunks)."""
    chunks, start = [], 0
    for point in sorted(points):
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


@dataclass
class BackendFacts:
    ready: int
    status: int
    params: list[bytes]
    relayed: bytes
    fatal: bytes | None


def scan_backend(chunks: Iterable[bytes]) -> BackendFacts:
    scanner = BackendScanner()
    ready, params, relayed = 0, [], []
    for chunk in chunks:
        relayed.append(scanner.feed(chunk))
        ready += scanner.ready
        params += scanner.params
        scanner.params.clear()  # as the backend does after applying them
    return BackendFacts(ready, scanner.status, params, b"".join(relayed), scanner.fatal)


@dataclass
class FrontendFacts:
    syncs: int
    statements: list[tuple[int, bytes]]
    relayed: bytes  # what the scanner let through
    stop: str | None = None  # "terminate", or "divert": a message naming a statement
    rest: bytes = b""  # with "divert": the input from that message on


def scan_frontend(chunks: Iterable[bytes]) -> FrontendFacts:
    """Feed chunks as the relay does: every byte relayed was scanned; the scanner stops at
    Terminate, or hands the rest of the input over at a message naming a statement."""
    scanner = FrontendScanner()
    syncs, relayed = 0, []
    chunks = iter(chunks)
    for chunk in chunks:
        relayed.append(scanner.feed(chunk))
        syncs += scanner.syncs
        if scanner.terminated:
            return FrontendFacts(syncs, scanner.statements, b"".join(relayed), "terminate")
        if scanner.diverted is not None:
            rest = scanner.diverted + b"".join(chunks)
            return FrontendFacts(syncs, scanner.statements, b"".join(relayed), "divert", rest)
    return FrontendFacts(syncs, scanner.statements, b"".join(relayed))


# ---------------------------------------------------------------------------------------------
# Fixture streams

# A server's answer to a mixed workload: a small result set with NULLs and empty values,
# a notice, a failed statement inside a transaction, parameter changes, and a closing FATAL.
BACKEND_SMALL = [
    row_description("id", "note"),
    data_row(b"1", b"first"),
    data_row(b"2", None),
    data_row(b"", b"x" * 300),
    command_complete("SELECT 3"),
    ready_for_query(b"I"),
    raw(b"1", b""),  # ParseComplete
    raw(b"2", b""),  # BindComplete
    notice("there is no transaction in progress"),
    parameter_status("application_name", "worker"),
    command_complete("SET"),
    ready_for_query(b"T"),
    error_response("22012", "division by zero"),
    ready_for_query(b"E"),
    parameter_status("TimeZone", "Europe/Berlin"),
    raw(b"I", b""),  # EmptyQueryResponse
    ready_for_query(b"I"),
    error_response(
        "57P01", "terminating connection due to administrator command", severity="FATAL"
    ),
]
BACKEND_SMALL_STREAM = b"".join(BACKEND_SMALL)
BACKEND_SMALL_FACTS = BackendFacts(
    ready=4,
    status=ord("I"),
    params=[b"application_name\0worker\0", b"TimeZone\0Europe/Berlin\0"],
    relayed=b"".join(BACKEND_SMALL[:-1]),
    fatal=BACKEND_SMALL[-1][5:],
)

# Rows larger than 64 KiB, to catch any 16-bit length or buffer-size assumption.
BIG_ROWS = [data_row(b"a" * 65_531), data_row(b"b" * 65_536), data_row(b"c" * 200_000, None)]
BACKEND_BIG = [
    parameter_status("client_encoding", "UTF8"),
    row_description("payload", "extra"),
    BIG_ROWS[0],
    data_row(b"small", b""),
    BIG_ROWS[1],
    BIG_ROWS[2],
    command_complete("SELECT 4"),
    ready_for_query(b"T"),
    notice("big result"),
    command_complete("COMMIT"),
    ready_for_query(b"I"),
]
BACKEND_BIG_STREAM = b"".join(BACKEND_BIG)


def boundaries_near_headers(parts: Sequence[bytes], reach: int = 7) -> list[int]:
    """Every offset within `reach` bytes of a message start, plus a few inside long bodies."""
    points, start = set(), 0
    for part in parts:
        points.update(range(max(1, start - reach), start + reach))
        points.update(range(start + 5, start + len(part), 9973))
        start += len(part)
    return sorted(p for p in points if 0 < p < start)


FRONTEND = [
    raw(b"Q", cstr("SELECT 1; SET search_path TO app")),
    parse("", "SELECT $1::int", 23),
    bind("", "", b"42"),
    describe(b"P", ""),
    execute(),
    SYNC,
    parse("", "SELECT * FROM orders WHERE id = $1", 23),
    describe(b"S", ""),
    FLUSH,
    bind("", "", None),
    execute("", 100),
    describe(b"P", "portal_1"),  # a portal's name is the session's own
    raw(b"C", b"Pportal_1\0"),  # Close portal
    SYNC,
    function_call(1598, b"x" * 10),
    raw(b"Q", cstr("COPY items FROM STDIN")),
    copy_data(b"1\tfirst\n"),
    copy_data(b"2\t" + b"z" * 300 + b"\n"),
    COPY_DONE,
    raw(b"Q", cstr("")),  # empty query: still answered with ReadyForQuery
    X,
]
FRONTEND_STREAM = b"".join(FRONTEND)
FRONTEND_TERMINATE_AT = len(FRONTEND_STREAM) - len(X)
FRONTEND_FACTS = FrontendFacts(
    syncs=6,  # Q, S, S, F, Q, Q
    statements=[
        (ord("Q"), cstr("SELECT 1; SET search_path TO app")),
        (ord("P"), FRONTEND[1][5:]),
        (ord("P"), FRONTEND[6][5:]),
        (ord("Q"), cstr("COPY items FROM STDIN")),
        (ord("Q"), b"\0"),
    ],
    relayed=FRONTEND_STREAM[:FRONTEND_TERMINATE_AT],
    stop="terminate",
)


# ---------------------------------------------------------------------------------------------
# BackendScanner


def test_backend_whole_stream_facts() -> None:
    assert scan_backend([BACKEND_SMALL_STREAM]) == BACKEND_SMALL_FACTS


def test_backend_facts_do_not_depend_on_any_single_split() -> None:
    stream = BACKEND_SMALL_STREAM
    for point in range(len(stream) + 1):
        assert scan_backend(cut(stream, [point])) == BACKEND_SMALL_FACTS, point


def test_backend_facts_do_not_depend_on_feeding_byte_by_byte() -> None:
    stream = BACKEND_SMALL_STREAM
    assert scan_backend(stream[i : i + 1] for i in range(len(stream))) == BACKEND_SMALL_FACTS


BACKEND_BIG_FACTS = BackendFacts(
    ready=2,
    status=ord("I"),
    params=[b"client_encoding\0UTF8\0"],
    relayed=BACKEND_BIG_STREAM,
    fatal=None,
)


def test_backend_rows_over_64_kib_whole_and_split_near_every_header() -> None:
    assert scan_backend([BACKEND_BIG_STREAM]) == BACKEND_BIG_FACTS
    for point in boundaries_near_headers(BACKEND_BIG):
        assert scan_backend(cut(BACKEND_BIG_STREAM, [point])) == BACKEND_BIG_FACTS, point


@SPLITS
@given(st.lists(st.integers(0, len(BACKEND_BIG_STREAM)), max_size=30))
def test_backend_facts_survive_random_multi_way_splits(points: list[int]) -> None:
    assert scan_backend(cut(BACKEND_BIG_STREAM, points)) == BACKEND_BIG_FACTS


def test_backend_relays_row_data_as_it_arrives() -> None:
    """Only message headers may be held back: a big row goes out chunk by chunk, so a slow
    client never makes the proxy buffer a result set."""
    stream = BIG_ROWS[2]
    scanner = BackendScanner()
    for start in range(0, len(stream), 4096):
        chunk = stream[start : start + 4096]
        assert scanner.feed(chunk) == chunk


def test_backend_holds_back_only_a_split_header() -> None:
    scanner = BackendScanner()
    row = data_row(b"v" * 100)
    assert scanner.feed(row[:3]) == b""
    assert scanner.feed(row[3:50]) == row[:50]
    assert scanner.feed(row[50:]) == row[50:]


def test_backend_holds_back_a_split_ready_for_query_until_its_status_arrives() -> None:
    scanner = BackendScanner()
    z = ready_for_query(b"T")
    assert scanner.feed(z[:5]) == b""
    assert (scanner.ready, scanner.status) == (0, ord("I"))
    assert scanner.feed(z[5:]) == z
    assert (scanner.ready, scanner.status) == (1, ord("T"))


def test_backend_ready_counts_only_the_last_chunk() -> None:
    scanner = BackendScanner()
    scanner.feed(ready_for_query(b"I") + ready_for_query(b"T"))
    assert (scanner.ready, scanner.status) == (2, ord("T"))
    scanner.feed(data_row(b"1"))
    assert (scanner.ready, scanner.status) == (0, ord("T"))
    scanner.feed(ready_for_query(b"E"))
    assert (scanner.ready, scanner.status) == (1, ord("E"))


def test_backend_relays_ordinary_errors_and_notices() -> None:
    stream = error_response("42P01", "relation does not exist") + notice("hi")
    facts = scan_backend([stream])
    assert facts.relayed == stream
    assert facts.fatal is None


@pytest.mark.parametrize("severity", ["FATAL", "PANIC"])
def test_backend_keeps_back_a_connection_ending_error(severity: str) -> None:
    dying = error_response("XX000", "server crashed", severity=severity)
    before, after = command_complete("SELECT 0"), ready_for_query(b"I")
    facts = scan_backend([before + dying + after])
    assert facts.relayed == before + after
    assert facts.fatal == dying[5:]
    assert parse_fields(facts.fatal)["S"] == severity


def test_backend_empty_chunks_change_nothing() -> None:
    chunks = cut(BACKEND_SMALL_STREAM, [0, 0, 7, 7, 7, 100, len(BACKEND_SMALL_STREAM)])
    assert b"" in chunks
    assert scan_backend(chunks) == BACKEND_SMALL_FACTS


@pytest.mark.parametrize("length", [0, 1, 3])
def test_backend_message_length_below_4_is_a_violation(length: int) -> None:
    bad = ready_for_query(b"I") + b"D" + struct.pack("!I", length) + b"\0\0\0\0"
    with pytest.raises(ProtocolViolation):
        BackendScanner().feed(bad)
    scanner = BackendScanner()
    with pytest.raises(ProtocolViolation):  # wherever the header is cut
        for i in range(len(bad)):
            scanner.feed(bad[i : i + 1])


# Random well-formed server streams, with the expected facts derived from how they were built.

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
_BACKEND_PLAIN = st.one_of(
    st.builds(lambda n: data_row(b"r" * n), st.integers(0, 400)),
    st.builds(lambda n: data_row(b"R" * n, None), st.sampled_from([65_535, 65_536, 70_001])),
    st.builds(row_description, _TEXT, _TEXT),
    st.builds(command_complete, _TEXT),
    st.builds(notice, _TEXT),
    st.builds(lambda code, text: error_response(code, text), st.just("23505"), _TEXT),
    st.sampled_from([raw(b"1", b""), raw(b"2", b""), raw(b"n", b""), raw(b"I", b"")]),
    st.builds(lambda d: raw(b"d", d), st.binary(max_size=50)),
)
_BACKEND_MESSAGE = st.one_of(
    st.tuples(st.just("plain"), _BACKEND_PLAIN),
    st.tuples(st.just("ready"), st.sampled_from(b"ITE")),
    st.tuples(st.just("param"), st.tuples(_TEXT, _TEXT)),
)


@SPLITS
@given(
    messages=st.lists(_BACKEND_MESSAGE, max_size=25),
    closing_fatal=st.booleans(),
    data=st.data(),
)
def test_backend_scanner_on_random_streams(
    messages: list[tuple[str, object]], closing_fatal: bool, data: st.DataObject
) -> None:
    parts, expected = [], BackendFacts(0, ord("I"), [], b"", None)
    for kind, value in messages:
        if kind == "ready":
            part = ready_for_query(bytes([value]))  # type: ignore[list-item]
            expected.ready += 1
            expected.status = value  # type: ignore[assignment]
        elif kind == "param":
            part = parameter_status(*value)  # type: ignore[misc]
            expected.params.append(part[5:])
        else:
            part = value  # type: ignore[assignment]
        parts.append(part)
    expected.relayed = b"".join(parts)
    if closing_fatal:
        parts.append(error_response("57P01", "bye", severity="FATAL"))
        expected.fatal = parts[-1][5:]
    stream = b"".join(parts)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert scan_backend([stream]) == expected
    assert scan_backend(cut(stream, points)) == expected


# ---------------------------------------------------------------------------------------------
# FrontendScanner


def test_frontend_whole_stream_facts() -> None:
    assert scan_frontend([FRONTEND_STREAM]) == FRONTEND_FACTS


def test_frontend_facts_do_not_depend_on_any_single_split() -> None:
    for point in range(len(FRONTEND_STREAM) + 1):
        assert scan_frontend(cut(FRONTEND_STREAM, [point])) == FRONTEND_FACTS, point


def test_frontend_facts_do_not_depend_on_feeding_byte_by_byte() -> None:
    stream = FRONTEND_STREAM
    assert scan_frontend(stream[i : i + 1] for i in range(len(stream))) == FRONTEND_FACTS


# The same session with a CopyData row over 64 KiB in the middle of the COPY.
FRONTEND_BIG = [*FRONTEND[:17], copy_data(b"3\t" + b"z" * 70_000 + b"\n"), *FRONTEND[17:]]
FRONTEND_BIG_STREAM = b"".join(FRONTEND_BIG)
FRONTEND_BIG_FACTS = FrontendFacts(
    FRONTEND_FACTS.syncs,
    FRONTEND_FACTS.statements,
    FRONTEND_BIG_STREAM[: -len(X)],
    "terminate",
)


def test_frontend_messages_over_64_kib_whole_and_split_near_every_header() -> None:
    assert scan_frontend([FRONTEND_BIG_STREAM]) == FRONTEND_BIG_FACTS
    for point in boundaries_near_headers(FRONTEND_BIG):
        assert scan_frontend(cut(FRONTEND_BIG_STREAM, [point])) == FRONTEND_BIG_FACTS, point


@SPLITS
@given(st.lists(st.integers(0, len(FRONTEND_BIG_STREAM)), max_size=30))
def test_frontend_facts_survive_random_multi_way_splits(points: list[int]) -> None:
    assert scan_frontend(cut(FRONTEND_BIG_STREAM, points)) == FRONTEND_BIG_FACTS


def test_frontend_counts_query_sync_and_function_call_as_syncing() -> None:
    scanner = FrontendScanner()
    scanner.feed(query("SELECT 1"))
    assert scanner.syncs == 1
    scanner.feed(parse("", "SELECT 1") + bind("", "") + execute() + FLUSH)
    assert scanner.syncs == 0
    scanner.feed(SYNC + function_call(1, b"a") + SYNC)
    assert scanner.syncs == 3
    scanner.feed(copy_data(b"row") + COPY_DONE)
    assert scanner.syncs == 0


def test_frontend_copy_messages_keep_the_kind_of_the_message_that_began_the_copy() -> None:
    """After a Query, COPY data ends what ReadyForQuery answers; after an Execute, or a stray
    CopyFail outside any COPY, the server still waits for a Sync."""
    scanner = FrontendScanner()
    scanner.feed(query("COPY t FROM STDIN") + copy_data(b"row") + COPY_DONE)
    assert scanner.last_kind == ord("Q")
    scanner.feed(execute() + raw(b"f", b"oops\0") + copy_data(b"row"))
    assert scanner.last_kind == ord("E")
    scanner.feed(SYNC)
    assert scanner.last_kind == ord("S")


@pytest.mark.timeout(60)
def test_backend_holding_a_huge_error_in_many_pieces_is_linear() -> None:
    """The same for a server's 256 MiB ErrorResponse."""
    error = error_response("22P02", "x" * (256 << 20))
    scanner = BackendScanner()
    step = 4 << 10
    relayed = [scanner.feed(error[i : i + step]) for i in range(0, len(error), step)]
    assert b"".join(relayed) == error


def test_frontend_relays_only_what_comes_before_terminate() -> None:
    before, after = query("SELECT 1") + SYNC, b"garbage that is never scanned"
    scanner = FrontendScanner()
    assert scanner.feed(before + X + after) == before
    assert scanner.syncs == 2
    assert scanner.terminated


@pytest.mark.parametrize("already_sent", [1, 2, 3, 4])
def test_frontend_never_relays_part_of_a_terminate(already_sent: int) -> None:
    """A split Terminate header is held back: no server ever sees half a message from a
    client that leaves."""
    scanner = FrontendScanner()
    prefix = execute()
    assert scanner.feed(prefix + X[:already_sent]) == prefix
    assert not scanner.terminated
    assert scanner.feed(X[already_sent:]) == b""
    assert scanner.terminated


def test_frontend_holds_a_query_back_until_it_is_whole() -> None:
    """The proxy reads a Query's text before any of it reaches a server (session state)."""
    q = query("SELECT 'a long enough statement'")
    scanner = FrontendScanner()
    assert scanner.feed(q[:10]) == b""
    assert scanner.mid_message
    assert scanner.feed(q[10:20]) == b""
    assert scanner.feed(q[20:] + X) == q
    assert (scanner.syncs, scanner.terminated) == (1, True)


@pytest.mark.timeout(60)
def test_frontend_holding_a_huge_message_in_many_pieces_is_linear() -> None:
    """Reassembly joins the pieces once: a 256 MiB Query fed in 4 KiB chunks is copied a
    bounded number of times (re-joining on every read would copy 8 TiB: this test would
    never end, and neither would the wait of every other client of the proxy)."""
    body = b"SELECT '" + b"x" * (256 << 20) + b"'\0"
    q = raw(b"Q", body)
    scanner = FrontendScanner()
    step = 4 << 10
    relayed = [scanner.feed(q[i : i + step]) for i in range(0, len(q), step)]
    assert b"".join(relayed) == q
    assert scanner.statements == [(ord("Q"), body)]
    assert not scanner.mid_message


def test_an_empty_parse_at_the_end_of_a_chunk_is_relayed_for_the_server_to_refuse() -> None:
    """Found by the fuzz test after login: a Parse with no body, the last bytes of a chunk,
    made the scanner read past the chunk (IndexError in the relay)."""
    scanner = FrontendScanner()
    data = query("SELECT 1") + raw(b"P", b"")
    assert scanner.feed(data) == data
    assert scanner.diverted is None


def test_frontend_statements_are_query_and_unnamed_parse_bodies_only() -> None:
    scanner = FrontendScanner()
    scanner.feed(
        query("SET a = 1")
        + parse("", "SELECT $1", 25)
        + bind("", "", b"v")
        + describe(b"P", "")
        + execute("")
        + copy_data(b"Q\0\0\0\x09SET b\0")  # a Query inside CopyData is just data
        + SYNC
    )
    assert scanner.statements == [
        (ord("Q"), b"SET a = 1\0"),
        (ord("P"), b"\0SELECT $1\0" + i16(1) + i32(25)),
    ]


NAMING = [
    parse("s1", "SELECT 1"),
    bind("", "s1"),
    bind("portal", ""),
    describe(b"S", "s1"),
    raw(b"C", b"Ss1\0"),
]


@pytest.mark.parametrize(
    "naming", NAMING, ids=["parse", "bind", "bind-portal", "describe", "close"]
)
def test_frontend_hands_over_at_the_first_message_naming_a_statement(naming: bytes) -> None:
    """Statement names are mapped by the proxy (no client may reach another's shared
    statements), so the raw relay stops there, wherever the chunks are cut, and the rest
    of the input goes to the relay that reads whole messages."""
    before = query("SELECT 1") + parse("", "SELECT 2") + bind("", "") + execute() + FLUSH
    stream = before + naming + SYNC + X
    for point in range(len(stream) + 1):
        facts = scan_frontend(cut(stream, [point]))
        assert facts.stop == "divert", point
        assert (facts.relayed, facts.rest) == (before, naming + SYNC + X), point
        assert facts.syncs == 1


def test_frontend_relays_unnamed_statements_and_named_portals_in_describe_and_close() -> None:
    p = parse("", "SELECT 1")
    stream = p + describe(b"S", "") + describe(b"P", "c") + raw(b"C", b"Pc\0")
    assert scan_frontend(cut(stream, [3, 9, 17])) == FrontendFacts(0, [(ord("P"), p[5:])], stream)


def test_frontend_mid_message_tracks_partial_messages() -> None:
    scanner = FrontendScanner()
    assert not scanner.mid_message
    big = copy_data(b"x" * 1000)
    scanner.feed(big[:3])
    assert scanner.mid_message  # a split header
    scanner.feed(big[3:500])
    assert scanner.mid_message  # a body still to come
    scanner.feed(big[500:])
    assert not scanner.mid_message


@pytest.mark.parametrize("kind", [b"Z", b"T", b"A", b"\0", b"q", b"x", b"\xff", b"p"])
def test_frontend_unknown_message_type_is_a_violation(kind: bytes) -> None:
    """Includes server-only types and PasswordMessage, which has no place after login."""
    scanner = FrontendScanner()
    scanner.feed(SYNC)
    with pytest.raises(ProtocolViolation):
        scanner.feed(kind + i32(4))


@pytest.mark.parametrize("length", [0, 1, 3, MAX_MESSAGE + 1, 2**32 - 1])
def test_frontend_impossible_length_is_a_violation(length: int) -> None:
    bad = b"d" + struct.pack("!I", length) + b"\0" * 8
    with pytest.raises(ProtocolViolation):
        FrontendScanner().feed(SYNC + bad)
    scanner = FrontendScanner()
    with pytest.raises(ProtocolViolation):  # wherever the header is cut
        for i in range(len(bad)):
            scanner.feed(bad[i : i + 1])


@pytest.mark.parametrize("kind", [b"S", b"H", b"X", b"E", b"D", b"C", b"c"])
def test_frontend_messages_without_user_data_are_capped(kind: bytes) -> None:
    """Sync, Flush, Execute, Describe... never need more than a few kilobytes; a huge length
    on one of them is garbage, refused before the proxy waits for its body."""
    with pytest.raises(ProtocolViolation):
        FrontendScanner().feed(kind + struct.pack("!I", MAX_SMALL_MESSAGE + 1))
    header = b"d" + struct.pack("!I", MAX_SMALL_MESSAGE + 1)
    assert FrontendScanner().feed(header) == header


def test_frontend_largest_allowed_message_is_accepted() -> None:
    header = b"d" + struct.pack("!I", MAX_MESSAGE)
    scanner = FrontendScanner()
    assert scanner.feed(header + b"\0" * 100) == header + b"\0" * 100
    assert scanner.mid_message


_FRONTEND_MESSAGE = st.one_of(
    st.builds(lambda t: raw(b"Q", cstr(t)), _TEXT),
    st.builds(parse, st.just(""), _TEXT),
    st.builds(lambda v: bind("", "", v), st.binary(max_size=20)),
    st.builds(describe, st.just(b"P"), _TEXT),
    st.builds(execute, _TEXT, st.integers(0, 1000)),
    st.builds(lambda n: copy_data(b"c" * n), st.sampled_from([0, 1, 100, 70_000])),
    st.sampled_from([SYNC, FLUSH, COPY_DONE, function_call(42, b"arg")]),
)


@SPLITS
@given(
    messages=st.lists(_FRONTEND_MESSAGE, max_size=25),
    terminate=st.booleans(),
    data=st.data(),
)
def test_frontend_scanner_on_random_streams(
    messages: list[bytes], terminate: bool, data: st.DataObject
) -> None:
    stream = b"".join(messages)
    expected = FrontendFacts(
        syncs=sum(m[:1] in (b"Q", b"S", b"F") for m in messages),
        statements=[(m[0], m[5:]) for m in messages if m[:1] in (b"Q", b"P")],
        relayed=stream,
        stop="terminate" if terminate else None,
    )
    if terminate:
        stream += X + query("SET never = 'seen'")
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert scan_frontend([stream]) == expected
    assert scan_frontend(cut(stream, points)) == expected


def test_fatal_is_recognised_in_any_server_language():
    """The S field is translated (lc_messages); the V field, which is not, decides."""
    localized = b"S\xd0\x92\xd0\x90\xd0\x96\xd0\x9d\xd0\x9e\0VFATAL\0C57P01\0M...\0\0"
    fatal = message(b"E", localized)
    scanner = BackendScanner()
    assert scanner.feed(fatal + message(b"N", b"SNOTICE\0VNOTICE\0\0")) == message(
        b"N", b"SNOTICE\0VNOTICE\0\0"
    )
    assert scanner.fatal == localized
