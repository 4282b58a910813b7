"""MySQL packet framing and parsing on bytes: packets of every size, length-encoded
integers, and the statement commands' fields. The response scanner is in test_scanners."""

from __future__ import annotations

import itertools

import pytest

from dbmux.engines.mysql import wire
from dbmux.engines.mysql.wire import MAX_PAYLOAD, PacketReader, ProtocolViolation

# -- chunking (the scanner tests use it too)


def chunks(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *points})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


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
