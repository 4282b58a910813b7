"""MySQL framing and the response scanner, on bytes: packets of every size, and the end of
every kind of response found whatever the chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import wire
from dbmux.engines.mysql.wire import (
    MAX_PAYLOAD,
    RESPONSE_FIELDS,
    RESPONSE_PREPARE,
    RESPONSE_RESULT,
    RESPONSE_ROWS,
    RESPONSE_SIMPLE,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_CURSOR_EXISTS,
    SERVER_STATUS_IN_TRANS,
    PacketReader,
    ProtocolViolation,
    ResponseScanner,
)

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


def chunks(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *points})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def scan(kinds: list[int], data_chunks: list[bytes], deprecate_eof: bool) -> list[int]:
    """Feed the chunks; return how many responses each chunk completed."""
    scanner = ResponseScanner(deprecate_eof)
    for kind in kinds:
        scanner.expect(kind)
    return [scanner.feed(c) for c in data_chunks]


# -- packets


def test_a_small_payload_is_one_packet_with_its_sequence_id() -> None:
    assert wire.packet(3, b"abc") == b"\x03\x00\x00\x03abc"


def test_a_payload_of_16_mib_is_split_and_ends_with_an_empty_packet() -> None:
    data = wire.packet(0, b"x" * MAX_PAYLOAD)
    assert data[:4] == b"\xff\xff\xff\x00"
    assert data[4 + MAX_PAYLOAD :] == b"\x00\x00\x00\x01"


def test_the_reader_reassembles_split_payloads_in_any_chunking() -> None:
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256 + 10)
    data = wire.packet(0, payload) + wire.packet(0, b"next")
    reader, buf, got = PacketReader(), bytearray(), []
    for piece in chunks(data, list(range(0, len(data), 1_000_003))):
        buf += piece
        while (item := reader.take(buf)) is not None:
            got.append(item)
    assert got == [payload, b"next"]


def test_the_reader_refuses_packets_over_its_limit_before_reading_them() -> None:
    reader = PacketReader(limit=1000)
    with pytest.raises(ProtocolViolation, match="max_allowed_packet"):
        reader.take(bytearray(wire.packet(0, b"x" * 1001)[:10]))


def test_lenenc_integers_round_trip_at_every_width() -> None:
    for value in (0, 250, 251, 65535, 65536, (1 << 24) - 1, 1 << 24, (1 << 64) - 1):
        encoded = wire.lenenc_int(value)
        assert wire.read_lenenc(encoded + b"tail", 0) == (value, len(encoded))


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


# -- statement commands


def test_execute_types_are_found_and_can_be_added_when_not_sent() -> None:
    params = 2
    head = b"\x17" + (5).to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
    null_bitmap = b"\0"
    types = b"\x08\x00\xfe\x00"
    values = (7).to_bytes(8, "little") + wire.lenenc_str(b"abc")
    with_types = head + null_bitmap + b"\x01" + types + values
    without = head + null_bitmap + b"\x00" + values
    assert wire.execute_types(with_types, params) == (11, types)
    flag_at, sent = wire.execute_types(without, params)
    assert sent is None
    assert wire.with_execute_types(without, flag_at, types) == with_types
    assert wire.statement_id(wire.with_statement_id(with_types, 99)) == 99
