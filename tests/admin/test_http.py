"""The admin listener faces the network: malformed, oversized and stalled requests get a 4xx
JSON answer and a close, never a traceback, and never hurt the proxy or other admin
clients. The parser itself takes any bytes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbmux.admin import http
from dbmux.admin.http import HttpError, parse_head
from tests.admin.answers import get_json
from tests.conftest import RunningProxy


@pytest.fixture
def admin(proxy: RunningProxy) -> Iterator[tuple[str, int]]:
    """The admin listener's address; afterwards, the proxy and its admin API still serve."""
    address = proxy.embedded.process.admin_address
    yield address
    with psycopg.connect(proxy.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert get_json(f"{proxy.embedded.admin_url}/api/proxies")["DBProxies"]


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10) -> bytes:
    """Send `data`, then read until the server closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 100 + b"\r\n", 431),
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
        (b"POST /api/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST /api/reload HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"POST /api/reload HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /api/reload HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ],
)
def test_malformed_requests_get_a_4xx_json_answer_and_a_close(admin, request_bytes, status):
    answer = exchange(admin, request_bytes)
    assert status_of(answer) == status
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert b'"message"' in body and b"Traceback" not in body


def test_a_request_that_never_finishes_is_answered_408_and_closed(admin, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.5)
    with socket.create_connection(admin, timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert status_of(read_all(sock)) == 408


def test_a_body_that_never_arrives_is_bounded_by_the_same_timeout(admin, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.5)
    with socket.create_connection(admin, timeout=10) as sock:
        sock.sendall(b"POST /api/reload HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        assert status_of(read_all(sock)) == 408


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(admin, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.5)
    with socket.create_connection(admin, timeout=10) as sock:
        sock.sendall(b"GET /api/proxies HTTP/1.1\r\n\r\n")
        answers = read_all(sock)
    assert answers.count(b"HTTP/1.1 ") == 2  # the answer, then 408 for the silence after it
    assert status_of(answers) == 200


def test_keep_alive_serves_several_requests_on_one_connection(admin):
    one = b"GET /api/proxies HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n"
    answers = exchange(admin, one * 3 + last)
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 4


def test_an_http_1_0_request_is_answered_and_closed(admin):
    answer = exchange(admin, b"GET /api/proxies HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1


def test_connections_beyond_the_limit_are_turned_away_and_the_others_served(admin, monkeypatch):
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    held = [socket.create_connection(admin, timeout=10) for _ in range(2)]
    try:
        for sock in held:  # each is accepted and waits for its request
            sock.sendall(b"GET /api/proxies HTTP/1.1\r\n\r\n")
            assert sock.recv(12) == b"HTTP/1.1 200"
        assert status_of(exchange(admin, b"GET /api/proxies HTTP/1.1\r\n\r\n")) == 503
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_disconnects_mid_request_costs_nothing(admin):
    for partial in (b"GET /api/pro", b"GET /api/proxies HTTP/1.1\r\nHo", b"POST / HTTP/1.1\r\n"):
        with socket.create_connection(admin, timeout=10) as sock:
            sock.sendall(partial)


@given(st.binary(max_size=2048))
def test_the_head_parser_takes_any_bytes(data):
    try:
        request = parse_head(data + b"\r\n\r\n")
    except HttpError as error:
        assert 400 <= error.status < 500
    else:
        assert request.path.startswith("/")


@given(
    st.lists(
        st.tuples(
            st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
            st.text(max_size=40).map(lambda s: s.encode("utf-8").decode("latin-1")),
        ),
        max_size=10,
    )
)
def test_headers_are_read_by_lower_case_name(headers):
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    data = f"GET /x?y=1 HTTP/1.1\r\n{lines}\r\n".encode("latin-1")
    try:
        request = parse_head(data)
    except HttpError:
        assert any("\r" in v or "\n" in v for _, v in headers)
        return
    assert (request.path, request.query) == ("/x", "y=1")
    for name, _value in headers:
        assert name.lower() in request.headers
