"""Malformed, oversized and truncated input from one client: that client gets FATAL 08P01 (or
28P01 for a failed login) and is disconnected; the proxy, its pool and every other client
carry on as if nothing happened.

Bad input goes over raw sockets (tests/pgraw.py); the well-behaved clients are asyncpg.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from dbmux.auth.scram import ScramClient
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RunningProxy
from tests.pgraw import (
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    PROTOCOL_3_0,
    SSL_REQUEST,
    Message,
    RawClient,
    i32,
    msg,
    query,
    raw_startup,
    sasl_initial_response,
    split_messages,
    startup_packet,
    u32,
)

WAIT = 15.0  # generous bound for something that must happen, never a timing assertion
ONE_GIB = 1 << 30
APP_STARTUP = {"user": APP_USER, "database": APP_DB}


@pytest.fixture
def proxy_crashes() -> list[dict[str, Any]]:
    """What the proxies' event loops reported as unhandled (asyncio exception contexts)."""
    return []


@pytest.fixture
def start_proxy(start_proxy, proxy_crashes):
    """The shared start_proxy, with each proxy's loop reporting unhandled exceptions (a task
    dying of an unexpected exception, say) to the test instead of only logging them."""

    def start(*args: Any, **kwargs: Any) -> RunningProxy:
        running = start_proxy(*args, **kwargs)
        running.embedded.loop.set_exception_handler(lambda _, ctx: proxy_crashes.append(ctx))
        return running

    return start


@pytest.fixture(autouse=True)
def no_unhandled_exception_in_the_proxy(proxy_crashes, caplog):
    """A crash inside the proxy that its client never hears about is a bug even when the
    test's own assertions pass. Checked after the proxy stopped; collecting garbage makes
    asyncio report tasks that died unobserved."""
    yield
    gc.collect()
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    logged = [
        f"{r.name}: {r.getMessage()}" for r in records if r.exc_info and r.levelno >= logging.ERROR
    ]
    crashed = [f"{c.get('message')}: {c.get('exception')!r}" for c in proxy_crashes]
    assert not crashed + logged, "unhandled exception in the proxy:\n" + "\n".join(crashed + logged)


def pool_of_one(start_proxy: Callable[..., RunningProxy], **settings_: object) -> RunningProxy:
    """2% of the test database's max_connections (50): exactly one server connection."""
    return start_proxy(pool={"max_connections_percent": 2}, **settings_)


async def connect(proxy: RunningProxy) -> RawClient:
    return await RawClient.connect(proxy.host, proxy.port)


async def logged_in(proxy: RunningProxy) -> RawClient:
    client = await connect(proxy)
    await client.login(APP_USER, APP_PASSWORD, APP_DB)
    return client


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll the proxy's state until `condition` holds (bounded generously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still not true after {WAIT} s: {what}")
        await asyncio.sleep(0.02)


async def assert_proxy_serves_a_good_client(proxy: RunningProxy) -> None:
    """A fresh client logs in and runs a transaction; the pool keeps within its budget and
    every borrowed server connection comes back."""
    conn = await asyncio.wait_for(asyncpg.connect(proxy.url(), statement_cache_size=0), WAIT)
    try:
        async with conn.transaction():
            assert await asyncio.wait_for(conn.fetchval("SELECT 40 + 2"), WAIT) == 42
    finally:
        await conn.close()
    budget = proxy.pools.budget
    assert budget.limit is not None
    assert budget.open <= budget.limit
    await wait_until(lambda: proxy.pools.lent_count == 0, "no server connection left lent")
    assert proxy.embedded._thread.is_alive(), "the proxy's event loop thread died"


async def count_notes(proxy: RunningProxy, note: str) -> int:
    conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
    try:
        return await conn.fetchval("SELECT count(*) FROM items WHERE note = $1", note)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# Before and during startup

BAD_STARTUP_PACKETS = {
    "length_0": i32(0),
    "length_4_header_only": i32(4),
    "length_7": i32(7) + b"\0\0\0",
    "negative_length": i32(-1) + u32(PROTOCOL_3_0),
    "length_10001_header_only": i32(10_001) + u32(PROTOCOL_3_0),
    "length_over_1_GiB_header_only": i32(ONE_GIB + 1) + u32(PROTOCOL_3_0),
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\n\r\n",
    "tls_client_hello": bytes.fromhex("16030100c4010000c00303") + bytes(32),
    "protocol_2_0": startup_packet(APP_STARTUP, version=2 << 16),
    "protocol_4_0": startup_packet(APP_STARTUP, version=4 << 16),
    "protocol_0_0": startup_packet(APP_STARTUP, version=0),
    "protocol_1234_5678": startup_packet(APP_STARTUP, version=(1234 << 16) | 5678),
    "parameters_not_nul_terminated": raw_startup(u32(PROTOCOL_3_0) + b"user\0app\0database\0app"),
    "parameter_list_without_final_nul": raw_startup(u32(PROTOCOL_3_0) + b"user\0app\0"),
    "empty_parameter_list_without_terminator": raw_startup(u32(PROTOCOL_3_0) + b"\x01"),
    "odd_number_of_parameters": raw_startup(u32(PROTOCOL_3_0) + b"user\0app\0database\0\0"),
    "non_utf8_parameter_value": raw_startup(u32(PROTOCOL_3_0) + b"user\0\xff\xfeapp\0\0"),
    "non_utf8_parameter_name": raw_startup(u32(PROTOCOL_3_0) + b"us\xc3\x28er\0app\0\0"),
    "password_message_before_startup": msg(b"p", b"app-secret\0"),
    "query_before_startup": query("SELECT 1"),
    "sasl_response_before_startup": sasl_initial_response(b"n,,n=,r=abcdef"),
    "ssl_request_then_garbage": i32(8) + u32(SSL_REQUEST) + b"\x16\x03\x01\x00\xc4\x01",
}


@pytest.mark.parametrize("packet", BAD_STARTUP_PACKETS.values(), ids=BAD_STARTUP_PACKETS.keys())
async def test_malformed_startup_packet_gets_fatal_08P01_then_close(proxy, packet):
    errors_before = proxy.metrics.client_protocol_errors.value
    async with await connect(proxy) as client:
        await client.send(packet)
        if packet.startswith(i32(8) + u32(SSL_REQUEST)):
            assert await client.read_exactly(1) == b"N"
        fields = await client.expect_fatal("08P01")
    assert not client.reset, "the proxy reset the connection instead of closing it"
    assert fields["M"]
    assert proxy.metrics.client_protocol_errors.value == errors_before + 1
    assert proxy.metrics.client_connections_setup_succeeded.value == 0


@pytest.mark.parametrize("request_code", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
async def test_encryption_request_is_declined_with_N_and_startup_continues_on_same_socket(
    proxy, request_code
):
    async with await connect(proxy) as client:
        await client.send(i32(8) + u32(request_code))
        assert await client.read_exactly(1) == b"N"
        after = await client.login(APP_USER, APP_PASSWORD, APP_DB)
        assert after[-1].kind == b"Z"
        rows = await client.simple_query("SELECT current_user")
        assert [m.kind for m in rows] == [b"T", b"D", b"C", b"Z"]


async def test_gssenc_then_ssl_request_are_both_declined_and_startup_gets_auth_request(proxy):
    async with await connect(proxy) as client:
        await client.send(i32(8) + u32(GSSENC_REQUEST))
        assert await client.read_exactly(1) == b"N"
        await client.send(i32(8) + u32(SSL_REQUEST))
        assert await client.read_exactly(1) == b"N"
        auth = await client.start(APP_USER, APP_DB)
        assert auth.kind == b"R" and auth.auth_code == AUTH_SASL


async def test_client_that_stops_mid_startup_packet_gets_08P01_at_login_timeout(start_proxy):
    proxy = start_proxy(client_login_timeout=1)
    async with await connect(proxy) as client:
        await client.send(startup_packet(APP_STARTUP)[:11])
        fields = await client.expect_fatal("08P01")
        assert "client_login_timeout" in fields.get("H", "")


async def test_client_that_stops_mid_authentication_message_gets_08P01_at_login_timeout(
    start_proxy,
):
    proxy = start_proxy(client_login_timeout=1)
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        first = sasl_initial_response(ScramClient(APP_PASSWORD).client_first())
        await client.send(first[: len(first) // 2])
        await client.expect_fatal("08P01")


async def test_client_that_vanishes_mid_startup_leaves_the_proxy_serving(proxy):
    for cut in (2, 6, 11):
        client = await connect(proxy)
        await client.send(startup_packet(APP_STARTUP)[:cut])
        client.abort()
    await wait_until(
        lambda: not proxy.embedded.proxy().runtime.clients, "vanished clients forgotten"
    )
    await assert_proxy_serves_a_good_client(proxy)


# ---------------------------------------------------------------------------------------------
# During authentication


async def test_query_instead_of_sasl_initial_response_is_a_protocol_violation(proxy):
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(query("SELECT 1"))
        await client.expect_fatal("08P01")
    assert proxy.metrics.client_protocol_errors.value == 1


async def test_query_instead_of_sasl_response_is_a_protocol_violation(proxy):
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(sasl_initial_response(ScramClient(APP_PASSWORD).client_first()))
        assert (await client.read_message()).auth_code == AUTH_SASL_CONTINUE
        await client.send(query("SELECT 1"))
        await client.expect_fatal("08P01")


async def test_second_startup_packet_during_authentication_is_a_protocol_violation(proxy):
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(startup_packet(APP_STARTUP))
        await client.expect_fatal("08P01")


BAD_AUTH_MESSAGES = {
    "length_below_4": b"p" + i32(3),
    "length_over_1_GiB_header_only": b"p" + u32(ONE_GIB + 1),
    "unknown_type": msg(b"Y", b"n,,n=,r=abc"),
    "mechanism_not_nul_terminated": msg(b"p", b"SCRAM-SHA-256"),
    "data_length_missing": msg(b"p", b"SCRAM-SHA-256\0\0\0"),
    "data_length_larger_than_data": msg(b"p", b"SCRAM-SHA-256\0" + i32(100) + b"n,,n=,r=abc"),
    "data_length_negative": msg(b"p", b"SCRAM-SHA-256\0" + i32(-1)),
}


@pytest.mark.parametrize("bad", BAD_AUTH_MESSAGES.values(), ids=BAD_AUTH_MESSAGES.keys())
async def test_malformed_sasl_initial_response_gets_fatal_08P01_then_close(proxy, bad):
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(bad)
        await client.expect_fatal("08P01")
    assert proxy.metrics.client_protocol_errors.value == 1
    await assert_proxy_serves_a_good_client(proxy)


@pytest.mark.parametrize(
    "client_first",
    [b"hello", b"\xff\xfe", b"n,,", b"x,,n=,r=abc", b"n,,n="],
    ids=["not_scram", "not_utf8", "no_attributes", "bad_gs2_flag", "no_nonce"],
)
async def test_malformed_scram_client_first_message_gets_fatal_08P01(proxy, client_first):
    """PostgreSQL answers a malformed SCRAM message with 08P01 ("malformed SCRAM message"),
    keeping 28P01 for a wrong password."""
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(sasl_initial_response(client_first))
        await client.expect_fatal("08P01")


async def failed_login_fields(proxy: RunningProxy, user: str, password: str) -> dict[str, str]:
    async with await connect(proxy) as client:
        assert (await client.start(user, APP_DB)).auth_code == AUTH_SASL
        scram = ScramClient(password)
        await client.send(sasl_initial_response(scram.client_first()))
        cont = await client.read_message()
        assert cont.auth_code == AUTH_SASL_CONTINUE
        await client.send(msg(b"p", scram.handle_server_first(cont.payload[4:])))
        return await client.expect_fatal("28P01")


async def test_wrong_password_gets_fatal_28P01_and_counts_as_failed_auth(proxy):
    fields = await failed_login_fields(proxy, APP_USER, "not-the-password")
    assert fields["M"] == f'password authentication failed for user "{APP_USER}"'
    assert proxy.metrics.auth_failures() == 1
    assert proxy.metrics.auth_failures("wrong_password") == 1
    assert proxy.metrics.client_protocol_errors.value == 0
    assert proxy.metrics.client_connections_setup_succeeded.value == 0


async def test_unknown_user_gets_the_same_28P01_as_a_wrong_password(proxy):
    wrong_password = await failed_login_fields(proxy, APP_USER, "not-the-password")
    unknown_user = await failed_login_fields(proxy, "nosuchuser", APP_PASSWORD)
    # Told apart in the metrics only.
    assert proxy.metrics.auth_failures("wrong_password") == 1
    assert proxy.metrics.auth_failures("unknown_user") == 1
    # Same shape, same wording: nothing tells an attacker the user does not exist.
    assert unknown_user.keys() == wrong_password.keys()
    assert {k: v for k, v in unknown_user.items() if k != "M"} == {
        k: v for k, v in wrong_password.items() if k != "M"
    }
    assert unknown_user["M"] == wrong_password["M"].replace(APP_USER, "nosuchuser")
    assert "exist" not in " ".join(unknown_user.values()).lower()


# ---------------------------------------------------------------------------------------------
# After login

BAD_MESSAGES_AFTER_LOGIN = {
    "length_below_4": b"Q" + i32(3) + b"x",
    "length_0": b"S" + i32(0),
    "negative_length": b"Q" + i32(-1),
    "length_over_1_GiB_header_only": b"Q" + u32(ONE_GIB + 1),
    "length_4_GiB_header_only": b"d" + u32(0xFFFFFFFF),
    "unknown_type_Y": msg(b"Y", b"hello"),
    "nul_type": msg(b"\0", b"\0\0\0\0"),
    "startup_packet_again": startup_packet(APP_STARTUP),
    "password_message_after_login": msg(b"p", b"app-secret\0"),
}


@pytest.mark.parametrize(
    "bad", BAD_MESSAGES_AFTER_LOGIN.values(), ids=BAD_MESSAGES_AFTER_LOGIN.keys()
)
async def test_malformed_message_after_login_gets_fatal_08P01_then_close(start_proxy, bad):
    proxy = pool_of_one(start_proxy)
    async with await logged_in(proxy) as client:
        await client.simple_query("SELECT 1")
        await client.send(bad)
        await client.expect_fatal("08P01")
    assert proxy.metrics.client_protocol_errors.value == 1
    assert proxy.metrics.database_connections_lost.value == 0
    await assert_proxy_serves_a_good_client(proxy)


async def test_malformed_message_mid_transaction_rolls_it_back_and_frees_the_connection(
    start_proxy,
):
    proxy = pool_of_one(start_proxy)
    note = f"bad-mid-tx-{uuid.uuid4()}"
    async with await logged_in(proxy) as client:
        await client.simple_query("BEGIN")
        replies = await client.simple_query(
            f"INSERT INTO items (client, note) VALUES (-1, '{note}')"
        )
        assert replies[-1].payload == b"T"  # in a transaction, holding the only connection
        await client.send(msg(b"Y", b"garbage"))
        await client.expect_fatal("08P01")
    await assert_proxy_serves_a_good_client(proxy)
    assert await count_notes(proxy, note) == 0


async def test_valid_query_followed_by_garbage_in_one_packet_ends_with_fatal_08P01(start_proxy):
    proxy = pool_of_one(start_proxy)
    async with await logged_in(proxy) as client:
        await client.send(query("SELECT 1") + msg(b"Y"))
        received, tail = split_messages(await client.read_all())
    assert not tail
    assert received, "no reply at all"
    last = received[-1]
    assert last.kind == b"E" and last.fields["S"] == "FATAL" and last.fields["C"] == "08P01"
    await assert_proxy_serves_a_good_client(proxy)


HALF_MESSAGES = {
    "half_a_header": b"Q\0\0",
    "header_of_a_query_only": b"Q" + i32(100),
    "half_a_query": query("SELECT 'this query never arrives whole'")[:20],
    "half_a_big_bind": b"B" + i32(200_000) + bytes(5000),
    "one_query_and_half_another": query("SELECT 1") + query("SELECT 2")[:8],
}


@pytest.mark.parametrize("half", HALF_MESSAGES.values(), ids=HALF_MESSAGES.keys())
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_closing_mid_message_gives_its_server_connection_back(start_proxy, half, how):
    proxy = pool_of_one(start_proxy)
    client = await logged_in(proxy)
    await client.send(half)
    if half.startswith(query("SELECT 1")):
        await client.read_until_ready()
    if how == "close":
        client.close_write()
        await client.read_all()
    client.abort()
    await assert_proxy_serves_a_good_client(proxy)
    await assert_proxy_serves_a_good_client(proxy)  # and again: nothing stuck behind it


@pytest.mark.parametrize("half", HALF_MESSAGES.values(), ids=HALF_MESSAGES.keys())
async def test_client_closing_mid_message_inside_a_transaction_rolls_it_back(start_proxy, half):
    proxy = pool_of_one(start_proxy)
    note = f"half-mid-tx-{uuid.uuid4()}"
    client = await logged_in(proxy)
    await client.simple_query("BEGIN")
    await client.simple_query(f"INSERT INTO items (client, note) VALUES (-1, '{note}')")
    await client.send(half)
    if half.startswith(query("SELECT 1")):
        await client.read_until_ready()
    client.abort()
    await assert_proxy_serves_a_good_client(proxy)
    assert await count_notes(proxy, note) == 0
    await assert_proxy_serves_a_good_client(proxy)


def parse(sql: str) -> bytes:
    return msg(b"P", b"\0" + sql.encode() + b"\0" + b"\0\0")


BIND = msg(b"B", b"\0\0" + b"\0\0" * 3)  # unnamed portal and statement, no parameters
EXECUTE = msg(b"E", b"\0" + i32(0))
FLUSH = msg(b"H")


async def read_until(client: RawClient, kind: bytes) -> list[Message]:
    out = []
    while not out or out[-1].kind != kind:
        out.append(await client.read_message())
    return out


async def test_client_vanishing_after_extended_query_without_sync_leaves_no_trace(start_proxy):
    """Parse/Bind/Execute run in an implicit transaction that only a Sync ends: a client
    that leaves before its Sync must not have that work committed by the next borrower."""
    proxy = pool_of_one(start_proxy)
    note = f"no-sync-{uuid.uuid4()}"
    client = await logged_in(proxy)
    insert = f"INSERT INTO items (client, note) VALUES (-3, '{note}')"
    await client.send(parse(insert) + BIND + EXECUTE + FLUSH)
    replies = await read_until(client, b"C")
    assert [m.kind for m in replies] == [b"1", b"2", b"C"]
    client.abort()
    await assert_proxy_serves_a_good_client(proxy)
    assert await count_notes(proxy, note) == 0
    await assert_proxy_serves_a_good_client(proxy)


async def test_client_vanishing_after_a_failed_bind_without_sync_does_not_stall_the_next(
    start_proxy,
):
    """After an error the server skips everything up to the next Sync: a connection left in
    that state would swallow the next borrower's requests."""
    proxy = pool_of_one(start_proxy)
    client = await logged_in(proxy)
    await client.send(msg(b"B", b"") + FLUSH)  # too short: the server answers ERROR 08P01
    error = await client.read_message()
    assert error.kind == b"E" and error.fields["S"] == "ERROR", error
    client.abort()
    await assert_proxy_serves_a_good_client(proxy)
    await assert_proxy_serves_a_good_client(proxy)


# ---------------------------------------------------------------------------------------------
# Metrics


async def test_protocol_violations_are_counted_and_nothing_else_is(proxy):
    errors = proxy.metrics.client_protocol_errors
    assert errors.value == 0
    # Things that are not protocol violations.
    await failed_login_fields(proxy, APP_USER, "wrong")
    async with await logged_in(proxy) as client:
        await client.simple_query("SELECT 1")
        await client.send(msg(b"X"))
        await client.expect_closed()
    async with await connect(proxy) as client:  # a cancel request for nobody
        await client.send(i32(16) + u32(CANCEL_REQUEST) + i32(1) + i32(2))
        await client.expect_closed()
    assert errors.value == 0
    # One of each kind.
    for packet in (i32(3), b"GET / HTTP/1.1\r\n\r\n", startup_packet(APP_STARTUP, 2 << 16)):
        async with await connect(proxy) as client:
            await client.send(packet)
            await client.expect_fatal("08P01")
    async with await connect(proxy) as client:
        await client.start(APP_USER, APP_DB)
        await client.send(query("SELECT 1"))
        await client.expect_fatal("08P01")
    for bad in (b"Q" + i32(2), b"Q" + u32(ONE_GIB + 1), msg(b"Y")):
        async with await logged_in(proxy) as client:
            await client.send(bad)
            await client.expect_fatal("08P01")
    assert errors.value == 7
    assert proxy.metrics.auth_failures() == 1


# ---------------------------------------------------------------------------------------------
# Everybody at once


BAD_CLIENT_WAIT = 5.0  # how long a storm's bad client waits for the proxy to hang up on it


async def misbehave(proxy: RunningProxy, bad: bytes, *, login: bool) -> None:
    """Send `bad` (after logging in, or instead of a startup packet) and wait, boundedly, for
    the proxy to hang up. What exactly it answers is checked by the tests above; here only
    the well-behaved clients' fate counts."""
    client = await (logged_in(proxy) if login else connect(proxy))
    try:
        await client.send(bad)
        await client.read_all(BAD_CLIENT_WAIT)
    except (OSError, AssertionError):
        pass
    finally:
        client.abort()


async def fail_login(proxy: RunningProxy, user: str, password: str) -> None:
    await failed_login_fields(proxy, user, password)


async def vanish_mid_message(proxy: RunningProxy, in_transaction: bool) -> None:
    client = await logged_in(proxy)
    if in_transaction:
        await client.simple_query("BEGIN")
        await client.simple_query("INSERT INTO items (client, note) VALUES (-2, 'storm')")
    await client.send(query("SELECT 'never finished'")[:12])
    client.abort()


async def vanish_mid_startup(proxy: RunningProxy) -> None:
    client = await connect(proxy)
    await client.send(startup_packet(APP_STARTUP)[:9])
    client.abort()


async def wrong_type_during_auth(proxy: RunningProxy) -> None:
    async with await connect(proxy) as client:
        await client.start(APP_USER, APP_DB)
        await client.send(query("SELECT 1"))
        await client.expect_fatal("08P01")


async def test_storm_of_bad_clients_does_not_disturb_good_ones(pg, proxy):
    good_clients, transactions = 20, 15
    await asyncio.to_thread(pg.psql, "DELETE FROM items WHERE client >= 7000 OR client < 0", "app")
    bad_done = asyncio.Event()

    async def good(n: int) -> int:
        """Transactions in a loop until every bad client is done (and at least 15)."""
        client_id = 7000 + n
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        done = 0
        try:
            while done < transactions or not bad_done.is_set():
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO items (client, note) VALUES ($1, $2)", client_id, f"t{done}"
                    )
                    got = await conn.fetchval(
                        "SELECT count(*) FROM items WHERE client = $1", client_id
                    )
                    assert got == done + 1
                done += 1
            return done
        finally:
            await conn.close()

    behaviours: list[Callable[[], Awaitable[None]]] = [
        *(lambda p=p: misbehave(proxy, p, login=False) for p in BAD_STARTUP_PACKETS.values()),
        *(lambda b=b: misbehave(proxy, b, login=True) for b in BAD_MESSAGES_AFTER_LOGIN.values()),
        lambda: fail_login(proxy, APP_USER, "wrong"),
        lambda: fail_login(proxy, "mallory", "whatever"),
        lambda: wrong_type_during_auth(proxy),
        lambda: vanish_mid_message(proxy, in_transaction=False),
        lambda: vanish_mid_message(proxy, in_transaction=True),
        lambda: vanish_mid_startup(proxy),
    ]

    async def bad(behaviour: Callable[[], Awaitable[None]]) -> None:
        for _ in range(3):
            await behaviour()

    async def all_bad() -> None:
        try:
            await asyncio.gather(*(bad(b) for b in behaviours))
        finally:
            bad_done.set()

    results = await asyncio.wait_for(
        asyncio.gather(all_bad(), *(good(n) for n in range(good_clients))), 120
    )
    done = results[1:]
    assert all(d >= transactions for d in done)
    committed = await asyncio.to_thread(
        pg.psql, "SELECT count(*) FROM items WHERE client >= 7000", "app"
    )
    assert int(committed) == sum(done)
    rolled_back = await asyncio.to_thread(
        pg.psql, "SELECT count(*) FROM items WHERE client = -2", "app"
    )
    assert int(rolled_back) == 0
    assert proxy.metrics.client_protocol_errors.value >= 3 * len(BAD_STARTUP_PACKETS)
    assert proxy.metrics.auth_failures() == 6
    await assert_proxy_serves_a_good_client(proxy)


# ---------------------------------------------------------------------------------------------
# Fuzzing: bounded (50 examples, no shrinking) so that each runs in seconds; a failing example
# is printed as generated.

FUZZ_WAIT = 5.0
fuzz_settings = settings(
    max_examples=50,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What PostgreSQL itself accepts from a client after startup.
POSTGRES_FRONTEND_TYPES = frozenset(b"BCcdDEfFHPQSX")

interesting_lengths = st.sampled_from([0, 1, 3, 4, 5, 8, 10_000, ONE_GIB, ONE_GIB + 1, 2**32 - 1])
any_length = st.one_of(interesting_lengths, st.integers(0, 2**32 - 1))
fuzz_message = st.one_of(
    # well-typed messages with random content
    st.builds(
        lambda k, p: msg(bytes([k]), p),
        st.sampled_from(sorted(POSTGRES_FRONTEND_TYPES - {ord("X")})),
        st.binary(max_size=64),
    ),
    # any type byte
    st.builds(lambda k, p: msg(k, p), st.binary(min_size=1, max_size=1), st.binary(max_size=32)),
    # a header with any length, and whatever follows
    st.builds(lambda k, n: k + n.to_bytes(4, "big"), st.binary(min_size=1, max_size=1), any_length),
    st.binary(max_size=48),
)
fuzz_stream = st.lists(fuzz_message, min_size=1, max_size=5).map(b"".join)


def first_violation(data: bytes) -> bool | None:
    """What PostgreSQL's framing rules make of `data` sent after login: True if it reaches an
    invalid header, False if it reaches a Terminate, None if it runs out (possibly mid-message)."""
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if kind not in POSTGRES_FRONTEND_TYPES or length < 4 or length > ONE_GIB:
            return True
        if kind == ord("X"):
            return False
        pos += 1 + length
    return None


def check_replies(data: bytes) -> list[Message]:
    """Every reply is a well-formed message; errors carry severity, code and text."""
    received, tail = split_messages(data)
    assert not tail, f"the proxy sent half a message before closing: {tail!r}"
    for m in received:
        if m.kind in (b"E", b"N"):
            fields = m.fields
            assert {"S", "C", "M"} <= fields.keys(), fields
            assert len(fields["C"]) == 5, fields
    return received


def assert_fatal_ends(received: list[Message]) -> None:
    """A FATAL error, if any, is the last thing the client hears."""
    fatal = [i for i, m in enumerate(received) if m.kind == b"E" and m.fields["S"] == "FATAL"]
    assert fatal in ([], [len(received) - 1]), "a FATAL error that did not end the connection"


@fuzz_settings
@given(data=fuzz_stream)
# Found by CI: Executes with no Sync, then CopyFail outside any COPY. The server still waits
# for a Sync, so the connection must not go back to the pool.
@example(data=msg(b"E", b"\x9c\x05") * 3 + msg(b"f", b"Z") + msg(b"f", b"[\xc4\xaa"))
async def test_fuzzed_bytes_after_login_never_harm_the_proxy(proxy, data):
    async with await logged_in(proxy) as client:
        await client.send(data)
        verdict = first_violation(data)
        if verdict is None:
            client.close_write()  # the proxy sees the end of input; it must close too
        received = check_replies(await client.read_all(FUZZ_WAIT))
    if verdict:
        assert received, "a protocol violation was not answered"
        last = received[-1].fields
        assert (last["S"], last["C"]) == ("FATAL", "08P01"), last
    assert_fatal_ends(received)
    await assert_proxy_serves_a_good_client(proxy)


fuzz_auth_message = st.one_of(
    st.builds(lambda p: msg(b"p", p), st.binary(max_size=64)),
    st.builds(
        lambda mech, first, size: msg(b"p", mech + b"\0" + i32(size) + first),
        st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"", b"\xff"]),
        st.one_of(st.binary(max_size=48), st.sampled_from([b"n,,n=,r=abc", b"y,,n=,r=x"])),
        st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-1, 64)),
    ),
    fuzz_message,
).filter(bool)


@fuzz_settings
@given(data=fuzz_auth_message)
async def test_fuzzed_bytes_during_authentication_are_refused_cleanly(proxy, data):
    """Whatever comes instead of a SASLInitialResponse: PostgreSQL refuses a wrong message
    type as soon as it sees the type byte, a bad length at once, and a bad SASL payload once
    the message is complete."""
    length = int.from_bytes(data[1:5], "big") if len(data) >= 5 else None
    must_refuse = data[0] != ord("p") or (length is not None and not 4 <= length <= ONE_GIB)
    complete = not must_refuse and length is not None and len(data) >= 1 + length
    async with await connect(proxy) as client:
        assert (await client.start(APP_USER, APP_DB)).auth_code == AUTH_SASL
        await client.send(data)
        if must_refuse:
            received = check_replies(await client.read_all(FUZZ_WAIT))
        else:
            # A whole message gets an answer; after it (or for half a message) we hang up.
            received = [await client.read_message(FUZZ_WAIT)] if complete else []
            client.close_write()
            received += check_replies(await client.read_all(FUZZ_WAIT))
    assert all(m.kind in (b"E", b"R") for m in received), received
    if must_refuse:
        assert received, "a protocol violation was not answered"
        last = received[-1].fields
        assert (last["S"], last["C"]) == ("FATAL", "08P01"), last
    elif complete and received[0].kind == b"E":
        assert received[0].fields["S"] == "FATAL", received[0].fields
        assert received[0].fields["C"] in ("08P01", "28000", "28P01"), received[0].fields
    elif complete:
        assert received[0].auth_code == AUTH_SASL_CONTINUE, received[0]
    assert_fatal_ends(received)
    await assert_proxy_serves_a_good_client(proxy)


fuzz_startup = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda code, body: raw_startup(u32(code) + body),
        st.one_of(
            st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_0 + 1, SSL_REQUEST, GSSENC_REQUEST]),
            st.sampled_from([CANCEL_REQUEST, 2 << 16, 4 << 16]),
            st.integers(0, 2**32 - 1),
        ),
        st.one_of(
            st.binary(max_size=64),
            st.lists(
                st.sampled_from([b"user", b"app", b"database", b"", b"\xff", b"_pq_.x", b"x"]),
                max_size=6,
            ).map(lambda parts: b"\0".join(parts) + b"\0"),
        ),
    ),
)
# Enough zeros to finish any startup packet in flight (at most 10000 bytes) and then some:
# every path through startup must end in a refusal, so the proxy must close by itself.
STARTUP_PADDING = bytes(10_100)


@fuzz_settings
@given(packet=fuzz_startup)
async def test_fuzzed_startup_bytes_are_refused_cleanly(proxy, packet):
    logins = proxy.metrics.client_connections_setup_succeeded.value
    async with await connect(proxy) as client:
        await client.send(packet + STARTUP_PADDING)
        data = await client.read_all(FUZZ_WAIT)
    while data.startswith(b"N"):  # declined SSL/GSS encryption requests
        data = data[1:]
    received = check_replies(data)
    assert all(m.kind in (b"E", b"R", b"v") for m in received), received
    if received:
        last = received[-1].fields
        assert last["S"] == "FATAL", last
        assert last["C"] in ("08P01", "28000", "28P01"), last
    assert proxy.metrics.client_connections_setup_succeeded.value == logins
    await assert_proxy_serves_a_good_client(proxy)
