"""Malformed MySQL input gets a clear ERR and costs only the client that sent it: raw bytes
over real sockets, while a well-behaved client keeps running transactions."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import handshake, wire
from tests.myraw import CLIENT_CAPABILITIES, RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy

FUZZ_WAIT = 3.0


@pytest.fixture
def bystander(my_proxy: MyProxy) -> Iterator[list[BaseException]]:
    """A client running transactions throughout the test; it must see no error."""
    with bystanding(my_proxy) as errors:
        yield errors


@contextlib.contextmanager
def bystanding(proxy: MyProxy) -> Iterator[list[BaseException]]:
    """A client of `proxy` running transactions meanwhile; it must see no error."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            with proxy.connect(autocommit=False) as conn, conn.cursor() as cur:
                n = 0
                while not stop.is_set():
                    cur.execute("INSERT INTO items (client, note) VALUES (50, %s)", (str(n),))
                    cur.execute(
                        "SELECT COUNT(*) FROM items WHERE client = 50 AND note = %s", (str(n),)
                    )
                    assert cur.fetchone() == (1,)
                    conn.rollback()
                    n += 1
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    yield errors
    stop.set()
    thread.join()
    assert not errors, errors


async def logged_in(proxy: MyProxy, capabilities: int = 0) -> RawMy:
    """A raw client logged in, offering the usual capabilities and `capabilities`."""
    raw = await RawMy.connect(proxy.host, proxy.port)
    _, reply = await raw.login(MY_USER, MY_PASSWORD, MY_DB, CLIENT_CAPABILITIES | capabilities)
    assert reply[:1] == b"\0", reply
    return raw


def err_of(data: bytes) -> wire.Err:
    """The last packet the proxy sent before closing, as an ERR."""
    buf = bytearray(data)
    last = None
    while (item := wire.split_packet(buf)) is not None:
        last = item[1]
    assert not buf, "the proxy sent half a packet"
    assert last is not None and last[:1] == b"\xff", last
    return wire.parse_err(last)


async def assert_serves_a_good_client(proxy: MyProxy) -> None:
    async with await logged_in(proxy) as raw:
        reply = await raw.query("SELECT 40 + 2")
    assert any(p.endswith(b"42") for p in reply), reply
    for _ in range(200):
        if proxy.pools.lent_count <= 1:  # the bystander's
            return
        await asyncio.sleep(0.02)
    raise AssertionError("a server connection was left lent")


async def test_garbage_instead_of_a_handshake_response(my_proxy: MyProxy, bystander) -> None:
    async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
        await raw.packet()  # greeting
        raw.send(wire.packet(1, b"\x07garbage"))
        error = err_of(await raw.read_all())
    assert error.code == wire.ER_NET_READ_ERROR[0]
    await assert_serves_a_good_client(my_proxy)


async def test_an_empty_packet_is_a_protocol_error(my_proxy: MyProxy, bystander) -> None:
    async with await logged_in(my_proxy) as raw:
        raw.send(wire.packet(0, b""))
        assert err_of(await raw.read_all()).code == wire.ER_NET_READ_ERROR[0]
    await assert_serves_a_good_client(my_proxy)


async def test_an_unknown_command_is_an_error_and_the_client_goes_on(my_proxy: MyProxy) -> None:
    async with await logged_in(my_proxy) as raw:
        raw.command(b"\x7fwhat")
        (reply,) = await raw.response(wire.RESPONSE_SIMPLE)
        assert wire.parse_err(reply).code == wire.ER_UNKNOWN_COM_ERROR[0]
        assert any(p.endswith(b"1") for p in await raw.query("SELECT 1"))


async def test_a_client_that_stops_mid_command_costs_nothing(my_proxy: MyProxy, bystander):
    async with await logged_in(my_proxy) as raw:
        raw.send(wire.packet(0, b"\x03SELECT 'a long statement'")[:12])
    await assert_serves_a_good_client(my_proxy)


async def test_a_client_that_leaves_during_a_long_query_frees_its_connection(my_proxy: MyProxy):
    async with await logged_in(my_proxy) as raw:
        raw.command(b"\x03SELECT SLEEP(0.5)")
    await assert_serves_a_good_client(my_proxy)


LIMIT = 256 * 1024


async def test_a_command_over_max_command_size_is_error_1153_before_it_is_buffered(
    start_my_proxy,
) -> None:
    """The proxy buffers a command whole before it forwards it: without a bound below the
    protocol's 1 GiB, a few clients sending huge commands exhaust its memory. The refusal
    comes as soon as the packet header shows the size, as a server's would."""
    proxy = start_my_proxy(max_command_size=LIMIT)
    with bystanding(proxy):
        async with await logged_in(proxy) as raw:
            fits = await raw.query("SELECT '" + "x" * (LIMIT - 100) + "'")
            assert fits[-2].endswith(b"x" * 100)
            big = wire.packet(0, b"\x03SELECT '" + b"x" * LIMIT + b"'")
            # The header and a few KiB: the proxy must not wait for the rest. (Not more: bytes
            # still unread when the proxy closes make its kernel reset the connection, and a
            # reset may reach the client before the ERR does.)
            raw.send(big[:4096])
            error = err_of(await raw.read_all())
        assert error.code == wire.ER_NET_PACKET_TOO_LARGE[0]
        assert f"max_command_size ({LIMIT} bytes)" in error.message
        await assert_serves_a_good_client(proxy)


async def test_max_command_size_defaults_to_the_servers_max_allowed_packet(
    my_proxy: MyProxy, mariadb
) -> None:
    """Past the server's own max_allowed_packet the server refuses the command anyway: the
    proxy must not buffer (up to 1 GiB) what it can know will be refused."""
    limit = int(mariadb.sql("SELECT @@global.max_allowed_packet"))
    async with await logged_in(my_proxy) as raw:
        # Its first 16 MiB - 1 bytes are a physical packet within the limit, taken whole.
        raw.send(wire.packet(0, b"\x03SELECT '" + b"x" * limit + b"'"))
        error = err_of(await raw.read_all())
    assert error.code == wire.ER_NET_PACKET_TOO_LARGE[0]
    assert f"max_command_size ({limit} bytes)" in error.message


async def test_compression_and_tls_requests_are_refused_clearly(my_proxy: MyProxy) -> None:
    for flag in (handshake.CLIENT_COMPRESS, handshake.CLIENT_SSL):
        async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
            await raw.packet()
            caps = handshake.SERVER_BASE_CAPABILITIES | flag
            if flag == handshake.CLIENT_SSL:
                raw.send(wire.packet(1, caps.to_bytes(4, "little") + bytes(28)))
            else:
                raw.send(
                    wire.packet(
                        1,
                        handshake.build_handshake_response(
                            capabilities=caps,
                            charset=45,
                            user=MY_USER,
                            auth_response=b"",
                            database=MY_DB,
                            plugin="mysql_native_password",
                        ),
                    )
                )
            error = err_of(await raw.read_all())
        assert "not" in error.message


fuzz_packet = st.one_of(
    st.builds(lambda seq, body: wire.packet(seq, body), st.integers(0, 3), st.binary(max_size=40)),
    st.builds(
        lambda cmd, body: wire.packet(0, bytes((cmd,)) + body),
        st.sampled_from([3, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C, 0x02, 0x04, 0x11, 0xFA, 0x1B]),
        st.binary(max_size=40),
    ),
    st.binary(max_size=24),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.lists(fuzz_packet, min_size=1, max_size=4).map(b"".join))
async def test_fuzzed_commands_never_harm_the_proxy(my_proxy: MyProxy, data: bytes) -> None:
    async with await logged_in(my_proxy) as raw:
        raw.send(data)
        raw.writer.write_eof()
        # Still waiting for a complete command is fine too: we hang up.
        with contextlib.suppress(AssertionError):
            await raw.read_all(FUZZ_WAIT)
    await assert_serves_a_good_client(my_proxy)
    assert my_proxy.embedded._thread.is_alive()
