"""Borrowing, giving back, pinning, failures on either side, cancel, COPY, and limits."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import threading

import asyncpg
import psycopg
import pytest

from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER

POOL_OF_ONE = {"max_connections_percent": 2}  # 2% of max_connections 50


async def connect(proxy, **kwargs):
    return await asyncpg.connect(proxy.url(), statement_cache_size=0, **kwargs)


async def wait_until(predicate, timeout: float = 10.0) -> None:
    """Poll for a condition the proxy reaches asynchronously (never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_waiting_clients_are_served_in_turn_by_a_pool_of_one(start_proxy):
    proxy = start_proxy(pool=POOL_OF_ONE)

    async def client(n: int) -> int:
        conn = await connect(proxy)
        try:
            async with conn.transaction():
                return await conn.fetchval("SELECT $1::int", n)
        finally:
            await conn.close()

    assert await asyncio.gather(*(client(n) for n in range(30))) == list(range(30))
    assert proxy.pools.budget.open == 1


async def test_client_gone_during_a_running_query_cancels_it(pg, start_proxy):
    proxy = start_proxy(pool=POOL_OF_ONE)
    leaver = await connect(proxy)
    task = asyncio.ensure_future(leaver.execute("SELECT pg_sleep(30) -- leaver"))
    await wait_until(lambda: proxy.pools.lent_count == 1)
    leaver.terminate()
    task.cancel()
    other = await connect(proxy)
    try:
        assert await other.fetchval("SELECT 42") == 42
        await wait_until(
            lambda: (
                pg.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%-- leaver'"
                    " AND state = 'active'"
                )
                == "0"
            )
        )
    finally:
        await other.close()


async def test_server_connection_killed_mid_transaction(pg, proxy):
    conn = await connect(proxy)
    try:
        await conn.execute("BEGIN")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await asyncio.to_thread(pg.psql, f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval("SELECT 1")
        assert caught.value.sqlstate == "08006"
        assert "administrator command" in caught.value.detail  # the server's own reason
        # The client keeps its connection; its next transaction runs on a fresh server.
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid
        assert proxy.metrics.database_connections_lost.value == 1
    finally:
        await conn.close()


async def test_cancel_reaches_only_the_cancelling_clients_query(proxy):
    victim = await connect(proxy)
    bystander = await connect(proxy)
    try:
        slow = asyncio.ensure_future(bystander.fetchval("SELECT 1 FROM pg_sleep(1.5)"))
        with pytest.raises(asyncio.TimeoutError):
            # On timeout asyncpg sends a CancelRequest with the key dbmux gave it.
            await victim.execute("SELECT pg_sleep(30) -- victim", timeout=0.5)
        assert await victim.fetchval("SELECT 7") == 7  # served, so the sleep was cancelled
        assert await slow == 1  # the other client's query ran to its end
        running = await victim.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30) -- victim'"
            " AND state = 'active'"
        )
        assert running == 0
    finally:
        await victim.close()
        await bystander.close()


def test_psycopg_cancel(proxy_process):
    """libpq's cancel holds the GIL while it waits, so this proxy runs in its own process."""
    with psycopg.connect(proxy_process.url()) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_copy_in_and_out(proxy):
    rows = [(9000 + i, f"copied {i}") for i in range(5000)]
    with psycopg.connect(proxy.url(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY items (client, note) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            out = io.BytesIO()
            with cur.copy(
                "COPY (SELECT client, note FROM items WHERE client >= 9000 ORDER BY client)"
                " TO STDOUT"
            ) as copy:
                for chunk in copy:
                    out.write(chunk)
            lines = out.getvalue().decode().splitlines()
            assert lines == [f"{c}\t{n}" for c, n in rows]
            cur.execute("DELETE FROM items WHERE client >= 9000")


def test_copy_failure_is_reported_and_connection_stays_usable(proxy):
    with psycopg.connect(proxy.url(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor().copy("COPY items (client, note) FROM STDIN") as copy:
                copy.write(b"not-a-number\tx\n")
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_in_pin_mode_session_set_pins_and_does_not_leak_to_other_clients(start_proxy):
    proxy = start_proxy(session_state="pin")
    setter = await connect(proxy)
    try:
        await setter.execute("SET statement_timeout = '42s'")
        assert proxy.metrics.pins("set_variable") == 1
        pid = await setter.fetchval("SELECT pg_backend_pid()")
        for _ in range(3):
            assert await setter.fetchval("SHOW statement_timeout") == "42s"
            assert await setter.fetchval("SELECT pg_backend_pid()") == pid

        others = [await connect(proxy) for _ in range(12)]
        try:
            for other in others:
                assert await other.fetchval("SHOW statement_timeout") == "0"
        finally:
            for other in others:
                await other.close()
    finally:
        await setter.close()


async def test_wrong_password_is_28P01_and_counted(proxy):
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.url(password="wrong"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.url(user="nobody"))
    assert proxy.metrics.auth_failures() == 2


async def test_md5_client_auth_when_the_auth_entry_asks_for_it(start_proxy, tmp_path):
    secret = tmp_path / "md5.json"
    secret.write_text(json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
    proxy = start_proxy(
        auth=[{"secret": f"file:{secret}", "client_password_auth_type": "POSTGRES_MD5"}]
    )
    with psycopg.connect(proxy.url()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.url(password="wrong"))


async def test_unknown_database_is_reported_by_the_server(proxy):
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(proxy.url(db="no_such_db"))


async def test_init_query_still_holds_after_a_pinned_session_was_discarded(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2, "init_query": "SET work_mem = '3MB'"})
    pinned = await connect(proxy)
    await pinned.execute("LISTEN somewhere")  # pins; DISCARD ALL clears it on release
    await pinned.close()
    conn = await connect(proxy)
    try:
        assert proxy.pools.budget.open == 1
        assert await conn.fetchval("SHOW work_mem") == "3MB"
    finally:
        await conn.close()


async def test_init_query_runs_on_every_new_server_connection(start_proxy):
    proxy = start_proxy(pool={"init_query": "SET statement_timeout = '17s'"})
    conns = [await connect(proxy) for _ in range(3)]
    try:
        txs = [c.transaction() for c in conns]
        for c, tx in zip(conns, txs, strict=True):
            await tx.start()
            assert await c.fetchval("SHOW statement_timeout") == "17s"
        for tx in txs:
            await tx.commit()
        assert proxy.pools.budget.open == 3
        assert proxy.metrics.pins() == 0
    finally:
        for c in conns:
            await c.close()


async def test_startup_settings_follow_the_client_across_connections(proxy):
    """A client's startup parameters (application_name, DateStyle...) hold in every
    transaction, whichever server connection runs it, without pinning."""
    a = await connect(proxy, server_settings={"application_name": "alpha", "DateStyle": "SQL, DMY"})
    b = await connect(proxy, server_settings={"application_name": "beta"})
    try:
        for _ in range(5):
            assert await a.fetchval("SHOW application_name") == "alpha"
            assert await a.fetchval("SHOW DateStyle") == "SQL, DMY"
            assert await b.fetchval("SHOW application_name") == "beta"
            assert await b.fetchval("SHOW DateStyle") == "ISO, MDY"
        assert proxy.metrics.pins() == 0
    finally:
        await a.close()
        await b.close()


def test_connection_goes_back_after_copy_while_the_client_stays(start_proxy):
    proxy = start_proxy(pool={**POOL_OF_ONE, "connection_borrow_timeout": 5})
    with psycopg.connect(proxy.url(), autocommit=True) as copier:
        with copier.cursor().copy("COPY items (client, note) FROM STDIN") as copy:
            copy.write_row((-7, "copied"))
        with psycopg.connect(proxy.url(), autocommit=True) as other:
            assert other.execute("SELECT count(*) FROM items WHERE client = -7").fetchone() == (1,)
            other.execute("DELETE FROM items WHERE client = -7")


async def test_startup_setting_names_are_case_insensitive_and_need_no_pin(proxy):
    conns = [
        await connect(proxy, server_settings={"datestyle": "German", "application_name": f"c{n}"})
        for n in range(12)
    ]
    try:
        for n, conn in enumerate(conns):
            assert await conn.fetchval("SHOW DateStyle") == "German, DMY"
            assert await conn.fetchval("SHOW application_name") == f"c{n}"
        assert proxy.metrics.pins() == 0
    finally:
        for conn in conns:
            await conn.close()


async def test_a_startup_setting_the_server_rejects_fails_the_login(proxy):
    with pytest.raises(asyncpg.PostgresError) as caught:
        await connect(proxy, server_settings={"DateStyle": "no such style"})
    assert caught.value.sqlstate == "22023"
    with pytest.raises(asyncpg.PostgresError) as caught:
        await connect(proxy, server_settings={"no_such_setting": "1"})
    assert caught.value.sqlstate == "42704"


async def test_notifications_name_the_clients_own_process_id(proxy):
    """A client recognises its own NOTIFY by the process id dbmux gave it."""
    conn = await connect(proxy)
    received: asyncio.Queue = asyncio.Queue()
    try:
        await conn.add_listener("news", lambda c, pid, ch, payload: received.put_nowait(pid))
        await conn.execute("NOTIFY news, 'hello'")
        pid = await asyncio.wait_for(received.get(), 10)
        assert pid == conn.get_server_pid()
        assert proxy.metrics.pins("listen") == 1
    finally:
        await conn.close()


async def test_a_notification_names_the_notifying_clients_process_id(proxy):
    listener, notifier = await connect(proxy), await connect(proxy)
    received: asyncio.Queue = asyncio.Queue()
    try:
        await listener.add_listener("jobs", lambda c, pid, ch, payload: received.put_nowait(pid))
        await notifier.execute("NOTIFY jobs, 'go'")
        assert await asyncio.wait_for(received.get(), 10) == notifier.get_server_pid()
    finally:
        await listener.close()
        await notifier.close()


async def test_server_lost_after_answering_a_flushed_batch_is_told_at_the_next_sync(pg, proxy):
    """asyncpg prepares with Parse/Describe/Flush, reads the answer, then sends Bind/Execute/
    Sync. If the server dies in between, the client must hear of it in answer to that Sync
    (ErrorResponse, ReadyForQuery), not as a message nobody asked for."""
    from tests.pgraw import ProtocolFailure, RawClient, i32, msg

    async with await RawClient.connect(proxy.host, proxy.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, "app")
        await raw.simple_query("BEGIN")
        (row,) = [m for m in await raw.simple_query("SELECT pg_backend_pid()") if m.kind == b"D"]
        pid = int(row.payload[6:])
        await raw.send(msg(b"P", b"\0SELECT 1\0\0\0") + msg(b"D", b"S\0") + msg(b"H"))
        answered = [(await raw.read_message()).kind for _ in range(3)]
        assert answered == [b"1", b"t", b"T"]
        await asyncio.to_thread(pg.psql, f"SELECT pg_terminate_backend({pid})")
        await wait_until(lambda: proxy.metrics.database_connections_lost.value == 1)
        with pytest.raises(ProtocolFailure, match="no reply"):
            await raw.read_message(timeout=0.3)  # nothing unasked for
        await raw.send(msg(b"B", b"\0\0" + bytes(6)) + msg(b"E", b"\0" + i32(0)) + msg(b"S"))
        replies = await raw.read_until_ready()
        assert [m.kind for m in replies] == [b"E", b"Z"]
        assert replies[0].fields["C"] == "08006"
        assert [m.kind for m in await raw.simple_query("SELECT 1")][-1] == b"Z"


async def test_a_notice_before_the_server_is_lost_is_no_answer_to_a_flushed_batch(tmp_path):
    """A server that sends only a notice before it dies (after another backend crashed,
    PostgreSQL says "terminating connection because of crash of another server process"
    that way) has not answered the client's Execute/Flush: the client, still waiting, is
    told of the loss at once, not at a Sync it will never send."""
    from tests.pgraw import RawClient, i32, msg

    with PostgresCluster() as crashing:
        crashing.create_user(APP_USER, APP_PASSWORD)
        crashing.create_database(APP_DB, owner=APP_USER)
        secret = tmp_path / "app.json"
        secret.write_text(json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
        config = {
            "proxies": [
                {
                    "name": "crash",
                    "engine_family": "POSTGRESQL",
                    "listen": "127.0.0.1:0",
                    "auth": [{"secret": f"file:{secret}"}],
                    "target_group": {"targets": [{"host": crashing.host, "port": crashing.port}]},
                }
            ]
        }
        with EmbeddedDbmux(config) as dbmux:
            host, port = dbmux.address()
            async with await RawClient.connect(host, port) as raw:
                await raw.login(APP_USER, APP_PASSWORD, APP_DB)
                await raw.simple_query("BEGIN")
                parse = msg(b"P", b"\0SELECT pg_sleep(60)\0\0\0")
                bind = msg(b"B", b"\0\0" + bytes(6))
                await raw.send(parse + bind + msg(b"E", b"\0" + i32(0)) + msg(b"H"))
                victim = await asyncpg.connect(crashing.dsn(APP_USER, APP_PASSWORD, APP_DB))
                os.kill(victim.get_server_pid(), signal.SIGKILL)  # the postmaster restarts all
                reply = await raw.read_message()
                while reply.kind != b"E":  # ParseComplete, BindComplete, the notice
                    reply = await raw.read_message()
                assert reply.fields["C"] == "08006"
                await raw.send(msg(b"S"))
                assert [m.kind for m in await raw.read_until_ready()] == [b"Z"]
                victim.terminate()


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_a_server_lost_while_a_named_statement_is_parsed_leaves_its_name_free(
    pg, proxy, in_transaction
):
    """A named Parse goes to the server in the client's own batch. If that connection dies
    before answering, the client hears of the loss (08006) and keeps its connection, and the
    name it never got a ParseComplete for is free: a second Parse of it is no
    "already exists" (42P05)."""
    from tests.pgraw import RawClient, i32, msg

    locker = await asyncpg.connect(pg.dsn(dbname="app"))
    await locker.execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    async with await RawClient.connect(proxy.host, proxy.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, "app")
        if in_transaction:
            await raw.simple_query("BEGIN")
        parse = msg(b"P", b"s1\0SELECT count(*) FROM items WHERE id < 0\0\0\0")
        bind = msg(b"B", b"\0s1\0" + bytes(6))
        await raw.send(parse + bind + msg(b"E", b"\0" + i32(0)) + msg(b"S"))
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'"
        )
        await wait_until(lambda: pg.psql(waiting) != "")
        await asyncio.to_thread(pg.psql, f"SELECT pg_terminate_backend(({waiting}))")
        await wait_until(lambda: proxy.metrics.database_connections_lost.value == 1)
        await locker.execute("COMMIT")
        replies = await raw.read_until_ready()
        assert [m.kind for m in replies] == [b"E", b"Z"]
        assert replies[0].fields["C"] == "08006"
        await raw.send(parse + bind + msg(b"E", b"\0" + i32(0)) + msg(b"S"))
        assert [m.kind for m in await raw.read_until_ready()] == [b"1", b"2", b"D", b"C", b"Z"]
    await locker.close()


async def test_a_fatal_error_is_no_answer_to_a_flushed_batch(pg, proxy):
    """A server terminated while it works on a Parse/Describe/Flush says FATAL and leaves:
    dbmux keeps the FATAL back, and the client, still waiting, is told of the loss at once."""
    from tests.pgraw import RawClient, msg

    locker = await asyncpg.connect(pg.dsn(dbname="app"))
    await locker.execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    async with await RawClient.connect(proxy.host, proxy.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, "app")
        await raw.send(msg(b"P", b"\0SELECT count(*) FROM items\0\0\0") + msg(b"D", b"S\0"))
        await raw.send(msg(b"H"))
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'"
        )
        await wait_until(lambda: pg.psql(waiting) != "")
        await asyncio.to_thread(pg.psql, f"SELECT pg_terminate_backend(({waiting}))")
        error = await raw.read_message()
        assert (error.kind, error.fields["C"], error.fields["S"]) == (b"E", "08006", "ERROR")
        await raw.send(msg(b"S"))
        assert [m.kind for m in await raw.read_until_ready()] == [b"Z"]
        await locker.execute("COMMIT")
        assert [m.kind for m in await raw.simple_query("SELECT 1")][-1] == b"Z"
    await locker.close()


async def test_an_idle_server_connection_that_stopped_answering_is_never_lent(start_proxy):
    """A pooled connection idle past idle_check_interval is pinged first; one whose server
    does not answer (here a stopped process, as a vanished host would be) is closed, and
    the next transaction gets a fresh connection instead of hanging on it."""
    pool = {"max_connections_percent": 2, "max_idle_connections_percent": 2}
    proxy = start_proxy(pool={**pool, "idle_check_interval": 1})
    conn = await connect(proxy)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: proxy.pools.budget.open == 0, timeout=15)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await conn.close()


@pytest.mark.parametrize("cause", ["shutdown", "idle"])
async def test_a_proxy_made_error_never_lands_inside_a_relayed_message(start_proxy, cause):
    """The proxy writes its own FATAL (shutdown, expiry) on the client's socket only between
    server messages: written in the middle of a DataRow being relayed, the client would read
    the error as row data and the rest of the stream as garbage."""
    from tests.pgraw import RawClient, query, split_messages

    proxy = start_proxy()
    client = await RawClient.connect(proxy.host, proxy.port)
    try:
        await client.login(APP_USER, APP_PASSWORD, "app")
        await client.send(query("SELECT repeat('x', 999) FROM generate_series(1, 100000)"))
        head = await client.read_exactly(70_001)  # a little of the result, ending mid-row
        (session,) = proxy.embedded.proxy().runtime.clients
        # Reading nothing more, the client makes the proxy pause its server mid-result.
        await wait_until(
            lambda: session.server is not None and not session.server.transport.is_reading()
        )
        assert session.server.scanner.mid_message
        proxy.embedded.call(_expire(session, cause))
        stream = head + await client.read_all(timeout=30)
        messages, rest = split_messages(stream)
        assert {m.kind for m in messages} <= {b"T", b"D", b"E"}
        assert all(len(m.payload) == 2 + 4 + 999 for m in messages if m.kind == b"D")
        errors = [m for m in messages if m.kind == b"E"]
        if errors:  # an error only as the very last whole message
            assert messages[-1] is errors[0] and not rest
            assert errors[0].fields["C"] == "57P01"
    finally:
        client.abort()


async def _expire(session, cause: str) -> None:
    session.expire("the proxy is shutting down" if cause == "shutdown" else "idle test")
