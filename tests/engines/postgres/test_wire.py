"""PostgreSQL message building and parsing on byte fixtures: the builders match literal
bytes and the parsers read them back, and the whole-message parsers refuse malformed packets
with ProtocolViolation rather than crash or guess. The relay scanners are in test_scanners."""

from __future__ import annotations

import struct

import pytest

from dbmux.engines.postgres.wire import (
    AUTH_MD5,
    AUTH_SASL,
    CANCEL_REQUEST,
    MAX_MESSAGE,
    MAX_STARTUP,
    PROTOCOL_3_0,
    SSL_REQUEST,
    TERMINATE,
    ProtocolViolation,
    authentication,
    backend_key_data,
    cancel_request,
    cstr,
    error_response,
    message,
    negotiate_protocol_version,
    parameter_status,
    parse_auth,
    parse_cancel,
    parse_data_row,
    parse_fields,
    parse_parameter_status,
    parse_sasl_initial,
    parse_startup,
    password_message,
    query,
    ready_for_query,
    sasl_initial_response,
    split_message,
    split_startup,
    startup_message,
)

# ---------------------------------------------------------------------------------------------
# Message fixtures, built field by field as the protocol documentation lays them out (the
# scanner tests build on them too)


def i16(value: int) -> bytes:
    return struct.pack("!h", value)


def i32(value: int) -> bytes:
    return struct.pack("!i", value)


def raw(kind: bytes, payload: bytes) -> bytes:
    """A typed message with its length word computed by hand (not by wire.message)."""
    return kind + struct.pack("!I", len(payload) + 4) + payload


def data_row(*values: bytes | None) -> bytes:
    cols = b"".join(i32(-1) if v is None else i32(len(v)) + v for v in values)
    return raw(b"D", i16(len(values)) + cols)


# ---------------------------------------------------------------------------------------------
# Builders: literal byte fixtures anchor them, the parsers read them back


def test_message_frames_type_length_and_payload() -> None:
    assert message(b"Z", b"I") == b"Z\x00\x00\x00\x05I"
    assert message(b"S") == b"S\x00\x00\x00\x04"
    assert TERMINATE == b"X\x00\x00\x00\x04"
    assert ready_for_query(b"T") == raw(b"Z", b"T")
    assert query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"


def test_error_response_round_trips_through_parse_fields() -> None:
    built = error_response("53300", "too many clients", detail="pool is full", hint="wait")
    kind, payload = split_message(bytearray(built))
    assert kind == ord("E")
    assert payload.endswith(b"\0\0")
    assert parse_fields(payload) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "53300",
        "M": "too many clients",
        "D": "pool is full",
        "H": "wait",
    }


def test_error_response_omits_empty_detail_and_hint_and_keeps_non_ascii() -> None:
    fields = parse_fields(
        error_response("28P01", "Passwort falsch für „bob“", severity="FATAL")[5:]
    )
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "Passwort falsch für „bob“"}


def test_parameter_status_round_trips() -> None:
    kind, payload = split_message(bytearray(parameter_status("TimeZone", "Europe/Berlin")))
    assert kind == ord("S")
    assert parse_parameter_status(payload) == ("TimeZone", "Europe/Berlin")


def test_startup_message_round_trips_through_split_and_parse() -> None:
    params = {"user": "app", "database": "orders", "application_name": "café"}
    buf = bytearray(startup_message(params) + b"tail")
    packet = split_startup(buf)
    assert buf == b"tail"
    assert packet is not None
    assert parse_startup(packet) == (PROTOCOL_3_0, params)


def test_cancel_request_round_trips() -> None:
    buf = bytearray(cancel_request(4242, -7))
    packet = split_startup(buf)
    assert packet is not None and buf == b""
    assert struct.unpack_from("!i", packet)[0] == CANCEL_REQUEST
    assert parse_cancel(packet) == (4242, -7)


def test_authentication_and_key_data_round_trip() -> None:
    kind, payload = split_message(bytearray(authentication(AUTH_MD5, b"salt")))
    assert (kind, parse_auth(payload)) == (ord("R"), (AUTH_MD5, b"salt"))
    kind, payload = split_message(bytearray(backend_key_data(123, -456)))
    assert kind == ord("K")
    assert struct.unpack("!ii", payload) == (123, -456)


def test_sasl_initial_response_round_trips() -> None:
    data = b"n,,n=,r=abc"
    kind, payload = split_message(bytearray(sasl_initial_response("SCRAM-SHA-256", data)))
    assert kind == ord("p")
    assert parse_sasl_initial(payload) == ("SCRAM-SHA-256", data)


def test_sasl_initial_response_with_wrong_length_word_is_refused() -> None:
    payload = cstr("SCRAM-SHA-256") + i32(99) + b"short"
    with pytest.raises(ProtocolViolation):
        parse_sasl_initial(payload)


def test_password_message_and_negotiate_version_frames() -> None:
    assert split_message(bytearray(password_message(b"md5abc\0"))) == (ord("p"), b"md5abc\0")
    kind, payload = split_message(bytearray(negotiate_protocol_version(0, ["_pq_.x", "_pq_.y"])))
    assert kind == ord("v")
    assert payload == i32(0) + i32(2) + b"_pq_.x\0_pq_.y\0"


def test_authentication_sasl_lists_mechanisms() -> None:
    _, payload = split_message(bytearray(authentication(AUTH_SASL, cstr("SCRAM-SHA-256") + b"\0")))
    code, rest = parse_auth(payload)
    assert code == AUTH_SASL
    assert rest == b"SCRAM-SHA-256\0\0"


def test_parse_data_row_reads_values_and_nulls() -> None:
    payload = data_row(b"42", None, b"", "ü".encode())[5:]
    assert parse_data_row(payload) == ["42", None, "", "ü"]


# ---------------------------------------------------------------------------------------------
# split_startup / split_message / parse_startup / parse_cancel edge cases


@pytest.mark.parametrize("prefix", [b"", b"\x00", b"\x00\x00\x00"])
def test_split_startup_waits_for_the_length_word(prefix: bytes) -> None:
    buf = bytearray(prefix)
    assert split_startup(buf) is None
    assert buf == prefix


def test_split_startup_waits_for_the_whole_packet_and_leaves_the_buffer_alone() -> None:
    packet = startup_message({"user": "app"})
    buf = bytearray(packet[:-1])
    assert split_startup(buf) is None
    assert buf == packet[:-1]


@pytest.mark.parametrize("length", [-1, 0, 4, 7, MAX_STARTUP + 1, 2**31 - 1])
def test_split_startup_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        split_startup(bytearray(i32(length) + b"\0" * 8))


def test_split_startup_accepts_the_extreme_lengths() -> None:
    assert split_startup(bytearray(i32(8) + i32(SSL_REQUEST))) == i32(SSL_REQUEST)
    longest = i32(MAX_STARTUP) + b"\0" * (MAX_STARTUP - 4)
    assert split_startup(bytearray(longest)) == b"\0" * (MAX_STARTUP - 4)


@pytest.mark.parametrize("prefix", [b"", b"Q", b"Q\x00\x00\x00"])
def test_split_message_waits_for_a_whole_header(prefix: bytes) -> None:
    assert split_message(bytearray(prefix)) is None


def test_split_message_waits_for_the_whole_payload() -> None:
    whole = query("SELECT 1")
    buf = bytearray(whole[:-1])
    assert split_message(buf) is None
    assert buf == whole[:-1]
    buf += whole[-1:] + b"Z"
    assert split_message(buf) == (ord("Q"), b"SELECT 1\0")
    assert buf == b"Z"


@pytest.mark.parametrize("length", [0, 3, MAX_MESSAGE + 1, 2**32 - 1])
def test_split_message_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        split_message(bytearray(b"Q" + struct.pack("!I", length) + b"\0" * 8))


def test_parse_startup_of_a_non_3_0_request_returns_no_parameters() -> None:
    assert parse_startup(i32(SSL_REQUEST)) == (SSL_REQUEST, {})


def test_parse_startup_accepts_protocol_3_2_and_empty_parameter_lists() -> None:
    assert parse_startup(i32(196610) + b"user\0app\0\0") == (196610, {"user": "app"})
    assert parse_startup(i32(PROTOCOL_3_0) + b"\0") == (PROTOCOL_3_0, {})
    assert parse_startup(i32(PROTOCOL_3_0) + b"options\0\0\0") == (PROTOCOL_3_0, {"options": ""})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="no-terminator-at-all"),
        pytest.param(b"user\0app", id="value-not-nul-terminated"),
        pytest.param(b"user\0app\0", id="list-not-terminated"),
        pytest.param(b"user\0\0", id="name-without-value"),
        pytest.param(b"user\0app\0database\0\0", id="odd-parameter-count"),
        pytest.param(b"user\0app\0\0database\0x\0\0", id="pairs-after-the-terminator"),
        pytest.param(b"user\0\xff\xfe\0\0", id="non-utf8-value"),
        pytest.param(b"\xc3\0app\0\0", id="non-utf8-name"),
    ],
)
def test_parse_startup_refuses_malformed_parameter_lists(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_startup(i32(PROTOCOL_3_0) + body)


@pytest.mark.parametrize("size", [0, 4, 8, 11, 13, 16])
def test_parse_cancel_refuses_any_length_but_12(size: int) -> None:
    with pytest.raises(ProtocolViolation):
        parse_cancel(b"\0" * size)
