"""The MySQL response scanner on bytes: the end of every kind of response found, with its
status, whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import wire
from dbmux.engines.mysql.scanners import ResponseScanner
from dbmux.engines.mysql.wire import (
    RESPONSE_FIELDS,
    RESPONSE_PREPARE,
    RESPONSE_RESULT,
    RESPONSE_ROWS,
    RESPONSE_SIMPLE,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_CURSOR_EXISTS,
    SERVER_STATUS_IN_TRANS,
    ProtocolViolation,
)
from tests.engines.mysql.test_wire import chunks

# -- fixtures: server replies built packet by packet


def column(name: str = "c", type_: int = 253) -> bytes:
    return (
        wire.lenenc_str(b"def")
        + wire.lenenc_str(b"db")
        + wire.lenenc_str(b"t")
        + wire.lenenc_str(b"t")
        + wire.lenenc_str(name.encode())
        + wire.lenenc_str(name.encode())
        + b"\x0c"
        + (45).to_bytes(2, "little")
        + (100).to_bytes(4, "little")
        + bytes((type_,))
        + b"\0\0\0\0\0"
    )


def text_row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else wire.lenenc_str(v) for v in values)


def ok(status: int = SERVER_STATUS_AUTOCOMMIT, insert_id: int = 0, header: bytes = b"\0") -> bytes:
    return header + wire.ok_packet(insert_id=insert_id, status=status)[1:]


def result_set(columns: int, rows: list[bytes], status: int, *, deprecate_eof: bool) -> list[bytes]:
    """The payloads of one text result set, ended as the capability says."""
    payloads = [wire.lenenc_int(columns), *(column(f"c{i}") for i in range(columns))]
    if not deprecate_eof:
        payloads.append(wire.eof_packet(status))
    payloads += rows
    payloads.append(ok(status, header=b"\xfe") if deprecate_eof else wire.eof_packet(status))
    return payloads


def frame(payloads: list[bytes]) -> bytes:
    return b"".join(wire.packet(seq + 1, p) for seq, p in enumerate(payloads))


def scan(kinds: list[int], data_chunks: list[bytes], deprecate_eof: bool) -> list[int]:
    """Feed the chunks; return how many responses each chunk completed."""
    scanner = ResponseScanner(deprecate_eof)
    for kind in kinds:
        scanner.expect(kind)
    return [scanner.feed(c) for c in data_chunks]


# -- the response scanner

SPLIT = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_a_result_set_completes_at_its_terminator_with_its_status(deprecate_eof: bool) -> None:
    rows = [text_row(b"1", None), text_row(b"x" * 300, b"")]
    data = frame(result_set(2, rows, SERVER_STATUS_IN_TRANS, deprecate_eof=deprecate_eof))
    scanner = ResponseScanner(deprecate_eof)
    scanner.expect(RESPONSE_RESULT)
    assert scanner.feed(data[:-1]) == 0
    assert scanner.feed(data[-1:]) == 1
    assert scanner.status == SERVER_STATUS_IN_TRANS
    assert not scanner.busy and not scanner.failed


@pytest.mark.parametrize("deprecate_eof", [False, True])
@SPLIT
@given(points=st.lists(st.integers(0, 2000), max_size=12))
def test_multi_results_complete_once_whatever_the_chunking(
    deprecate_eof: bool, points: list[int]
) -> None:
    """CALL or a multi-statement query: OK, a result set and another, linked by the
    more-results flag; only the last ends the response."""
    more = SERVER_STATUS_AUTOCOMMIT | SERVER_MORE_RESULTS_EXISTS
    payloads = [ok(more, insert_id=5)]
    payloads += result_set(1, [text_row(b"a")] * 20, more, deprecate_eof=deprecate_eof)
    payloads += result_set(3, [text_row(b"b", b"c", None)], more, deprecate_eof=deprecate_eof)
    payloads.append(ok(SERVER_STATUS_AUTOCOMMIT))
    data = frame(payloads)
    assert sum(scan([RESPONSE_RESULT], chunks(data, points), deprecate_eof)) == 1


@given(points=st.lists(st.integers(0, 400), max_size=10))
@SPLIT
def test_responses_to_queued_commands_complete_in_order(points: list[int]) -> None:
    data = (
        frame([ok(insert_id=3)])
        + frame([b"\xff" + (1064).to_bytes(2, "little") + b"#42000syntax"])
        + frame(result_set(1, [text_row(b"1")], SERVER_STATUS_AUTOCOMMIT, deprecate_eof=False))
    )
    kinds = [RESPONSE_SIMPLE, RESPONSE_RESULT, RESPONSE_RESULT]
    assert sum(scan(kinds, chunks(data, points), False)) == 3


def test_an_error_in_the_middle_of_rows_ends_the_response_and_says_it_failed() -> None:
    payloads = result_set(1, [text_row(b"1")], 0, deprecate_eof=True)[:-1]
    payloads.append(b"\xff" + (1317).to_bytes(2, "little") + b"#70100interrupted")
    scanner = ResponseScanner(True)
    scanner.expect(RESPONSE_RESULT)
    assert scanner.feed(frame(payloads)) == 1
    assert scanner.failed


def test_a_row_starting_with_0xfe_is_data_when_it_is_long() -> None:
    """A text row whose first value is 16 MiB or longer starts with 0xFE too; only short
    0xFE packets end the rows."""
    long_row = b"\xfe" + (20).to_bytes(8, "little") + b"y" * 20
    payloads = result_set(1, [long_row], 0, deprecate_eof=False)
    scanner = ResponseScanner(False)
    scanner.expect(RESPONSE_RESULT)
    data = frame(payloads)
    end = len(data) - len(frame([wire.eof_packet(0)]))
    assert scanner.feed(data[:end]) == 0
    assert scanner.feed(data[end:]) == 1


def test_the_insert_id_of_an_ok_packet_is_kept() -> None:
    scanner = ResponseScanner(False)
    scanner.expect(RESPONSE_RESULT)
    assert scanner.feed(frame([ok(insert_id=70_000)])) == 1
    assert scanner.insert_id == 70_000


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize(("params", "columns"), [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_a_prepare_reply_ends_after_its_definitions(
    deprecate_eof: bool, params: int, columns: int
) -> None:
    head = b"\0" + (9).to_bytes(4, "little") + columns.to_bytes(2, "little")
    head += params.to_bytes(2, "little") + b"\0\0\0"
    payloads = [head]
    for count in (params, columns):
        payloads += [column()] * count
        if count and not deprecate_eof:
            payloads.append(wire.eof_packet())
    data = frame(payloads)
    assert scan([RESPONSE_PREPARE], [data[:-1], data[-1:]], deprecate_eof) == [0, 1]


def test_an_execute_that_opens_a_cursor_ends_after_the_column_definitions() -> None:
    payloads = [b"\x01", column(), wire.eof_packet(SERVER_STATUS_CURSOR_EXISTS)]
    assert scan([RESPONSE_RESULT], [frame(payloads)], False) == [1]
    rows = [b"\0\0\x01\x02", wire.eof_packet(0x80)]
    assert scan([RESPONSE_ROWS], [frame(rows)], False) == [1]


def test_field_list_ends_at_its_eof() -> None:
    assert scan([RESPONSE_FIELDS], [frame([column(), column(), wire.eof_packet()])], False) == [1]


def test_an_unasked_error_is_a_goodbye_and_anything_else_is_a_violation() -> None:
    scanner = ResponseScanner(False)
    assert scanner.feed(frame([b"\xff" + (1927).to_bytes(2, "little") + b"#70100killed"])) == 0
    assert scanner.unsolicited is not None
    with pytest.raises(ProtocolViolation):
        ResponseScanner(False).feed(frame([ok()]))


def test_a_local_infile_request_is_refused() -> None:
    scanner = ResponseScanner(False)
    scanner.expect(RESPONSE_RESULT)
    with pytest.raises(ProtocolViolation, match="LOAD DATA LOCAL"):
        scanner.feed(frame([b"\xfb/etc/passwd"]))


def mixed_replies(deprecate_eof: bool) -> tuple[list[int], bytes]:
    """Replies of every shape the scanner reads inline or not: an OK with a 3-byte insert
    id, a result set of many rows (one a 300-byte row; without CLIENT_DEPRECATE_EOF one
    starting with 0xFE too), a column count of 251, an ERR, a cursor's execute, a prepare."""
    rows = [text_row(b"1", None)] * 30 + [text_row(b"x" * 300, b"")]
    if not deprecate_eof:
        rows.append(b"\xfe" + (20).to_bytes(8, "little") + b"y" * 20)
    cursor = [b"\x01", column()]
    if deprecate_eof:
        cursor.append(ok(SERVER_STATUS_CURSOR_EXISTS, header=b"\xfe"))
    else:
        cursor.append(wire.eof_packet(SERVER_STATUS_CURSOR_EXISTS))
    prepare = b"\0" + (9).to_bytes(4, "little") + (1).to_bytes(2, "little") * 2 + b"\0\0\0"
    prepare_replies = [prepare, column(), column()] + (
        [] if deprecate_eof else [wire.eof_packet()] * 2
    )
    replies = [
        [ok(SERVER_STATUS_IN_TRANS, insert_id=70_000)],
        result_set(2, rows, SERVER_STATUS_IN_TRANS, deprecate_eof=deprecate_eof),
        result_set(
            251, [text_row(*[b"v"] * 251)], SERVER_STATUS_AUTOCOMMIT, deprecate_eof=deprecate_eof
        ),
        [b"\xff" + (1064).to_bytes(2, "little") + b"#42000syntax"],
        cursor,
        prepare_replies,
        result_set(1, [text_row(b"1")], SERVER_STATUS_IN_TRANS, deprecate_eof=deprecate_eof),
    ]
    kinds = [RESPONSE_RESULT] * 5 + [RESPONSE_PREPARE, RESPONSE_RESULT]
    return kinds, b"".join(frame(r) for r in replies)


@pytest.mark.parametrize("deprecate_eof", [False, True])
@SPLIT
@given(points=st.lists(st.integers(0, 12_000), max_size=40))
def test_the_scanner_reads_the_same_whatever_the_chunking(
    deprecate_eof: bool, points: list[int]
) -> None:
    """Responses completed, status, insert id, failure and the last sequence id are those of
    the stream fed whole, wherever the chunks cut it (inside headers too)."""
    kinds, data = mixed_replies(deprecate_eof)

    def outcome(data_chunks: list[bytes]) -> tuple[int, int, int, bool, int, bool]:
        scanner = ResponseScanner(deprecate_eof)
        for kind in kinds:
            scanner.expect(kind)
        done = sum(scanner.feed(c) for c in data_chunks)
        return done, scanner.status, scanner.insert_id, scanner.failed, scanner.seq, scanner.busy

    whole = outcome([data])
    assert whole == (7, SERVER_STATUS_IN_TRANS, 70_000, False, 4 if deprecate_eof else 5, False)
    assert outcome(chunks(data, points)) == whole
    assert outcome(chunks(data, list(range(0, len(data), 3)))) == whole
