"""Named prepared statements work across server connections without pinning."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.pgraw import RawClient

POOL_OF_THREE = {"max_connections_percent": 6}


async def test_asyncpg_statements_follow_clients_across_a_small_pool(start_proxy):
    proxy = start_proxy(pool=POOL_OF_THREE)

    async def client(n: int) -> set[int]:
        conn = await asyncpg.connect(proxy.url())  # named statements, cached per connection
        backends: set[int] = set()
        try:
            for i in range(10):
                async with conn.transaction():
                    backends.add(await conn.fetchval("SELECT pg_backend_pid()"))
                    assert await conn.fetchval("SELECT $1::int * $2::int", n, i) == n * i
                    row = await conn.fetchrow("SELECT $1::text AS who, $2::int AS i", f"c{n}", i)
                    assert (row["who"], row["i"]) == (f"c{n}", i)
                await asyncio.sleep(0)
            return backends
        finally:
            await conn.close()

    seen = await asyncio.gather(*(client(n) for n in range(20)))
    assert proxy.metrics.pins() == 0
    assert proxy.pools.budget.open <= 3
    assert any(len(backends) > 1 for backends in seen)


async def test_same_statement_names_in_two_clients_never_cross(start_proxy):
    """asyncpg names its statements __asyncpg_stmt_1__, _2_, ... in every connection."""
    proxy = start_proxy(pool={"max_connections_percent": 2})  # one server connection
    a, b = await asyncpg.connect(proxy.url()), await asyncpg.connect(proxy.url())
    try:
        for i in range(5):
            assert await a.fetchval("SELECT 'a' || $1::text", str(i)) == f"a{i}"
            assert await b.fetchval("SELECT $1::int + 1000", i) == 1000 + i
        assert proxy.metrics.pins() == 0
    finally:
        await a.close()
        await b.close()


def test_psycopg_prepares_everything_with_prepare_threshold_zero(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})
    with (
        psycopg.connect(proxy.url(), prepare_threshold=0, autocommit=True) as a,
        psycopg.connect(proxy.url(), prepare_threshold=0, autocommit=True) as b,
    ):
        for i in range(6):
            assert a.execute("SELECT %s::int * 3", (i,)).fetchone() == (i * 3,)
            assert b.execute("SELECT %s::text || 'b'", (str(i),)).fetchone() == (f"{i}b",)
            with a.transaction():
                a.execute("INSERT INTO items (client, note) VALUES (%s, 'prepared')", (-20 - i,))
        count = b.execute("SELECT count(*) FROM items WHERE note = 'prepared'").fetchone()
        assert count == (6,)
        b.execute("DELETE FROM items WHERE note = 'prepared'")
    assert proxy.metrics.pins() == 0


async def test_a_bounded_cache_evicts_and_prepares_again(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2, "max_prepared_statements": 3})
    conn = await asyncpg.connect(proxy.url())
    try:
        statements = [await conn.prepare(f"SELECT $1::int + {k}") for k in range(10)]
        for _ in range(3):
            for k, statement in enumerate(statements):
                assert await statement.fetchval(5) == 5 + k
        (pool,) = proxy.pools.pools.values()
        assert all(len(server.prepared) <= 3 for server in [*pool.idle, *pool.lent])
        # The Closes went before the batch's Sync: nothing of theirs reaches the next client.
        async with await RawClient.connect(proxy.host, proxy.port) as raw:
            await raw.login("app", "app-secret", "app")
            replies = await raw.simple_query("SELECT 1")
            assert [m.kind for m in replies] == [b"T", b"D", b"C", b"Z"]
    finally:
        await conn.close()


async def test_a_failed_parse_leaves_the_session_usable(proxy):
    conn = await asyncpg.connect(proxy.url())
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.fetchval("SELEC 1")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetchval("SELECT * FROM no_such_table WHERE x = $1", 1)
        assert await conn.fetchval("SELECT $1::int", 3) == 3
    finally:
        await conn.close()


async def test_closing_a_statement_and_reusing_its_name(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})
    conn = await asyncpg.connect(proxy.url(), statement_cache_size=1)  # evicts: Close + reuse
    other = await asyncpg.connect(proxy.url())
    try:
        for i in range(6):
            assert await conn.fetchval(f"SELECT $1::int + {i}", 1) == 1 + i
            assert await other.fetchval("SELECT $1::int", i) == i  # shares the server
        assert proxy.metrics.pins() == 0
    finally:
        await conn.close()
        await other.close()


async def test_deallocate_all_clears_only_this_clients_statements(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 4})  # two server connections
    a, b = await asyncpg.connect(proxy.url()), await asyncpg.connect(proxy.url())
    try:
        a_stmt = await a.prepare("SELECT $1::int + 1")
        b_stmt = await b.prepare("SELECT $1::int + 1")  # the same text: shared on a server
        assert await a_stmt.fetchval(1) == 2
        await a.execute("DEALLOCATE ALL")  # pins a to its connection
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await a_stmt.fetchval(1)
        for i in range(4):
            assert await b_stmt.fetchval(i) == i + 1  # b's statement is untouched
        assert await a.fetchval("SELECT $1::int * 2", 4) == 8  # a prepares anew
    finally:
        await a.close()
        await b.close()


def test_a_failed_prepared_set_is_answered_and_the_next_query_runs(proxy):
    """psycopg prepares `SET x = $1`, which the server rejects; a regression for a session
    whose next request waited forever behind the settings read-back."""
    with psycopg.connect(proxy.url(), prepare_threshold=0, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SET statement_timeout = %s", ("5s",))
        assert conn.execute("SELECT %s::int", (3,)).fetchone() == (3,)


async def test_sql_execute_of_a_protocol_statement_pins_and_works(proxy):
    conn = await asyncpg.connect(proxy.url())
    try:
        statement = await conn.prepare("SELECT 41 + 1", name="answer")
        assert await conn.fetchval("EXECUTE answer") == 42
        assert await statement.fetchval() == 42
        assert proxy.metrics.pins("prepared_statement") == 1
    finally:
        await conn.close()


async def test_a_statement_prepared_again_after_ddl_gets_a_fresh_plan(proxy):
    """asyncpg re-prepares after "cached plan must not change result type"; the shared
    statement must be created anew, not the stale one used again."""
    conn = await asyncpg.connect(proxy.url())
    try:
        await conn.execute("DROP TABLE IF EXISTS ddl_t; CREATE TABLE ddl_t (a int)")
        await conn.execute("INSERT INTO ddl_t VALUES (1)")
        assert await conn.fetchval("SELECT * FROM ddl_t") == 1
        await conn.execute("ALTER TABLE ddl_t ALTER COLUMN a TYPE text")
        assert await conn.fetchval("SELECT * FROM ddl_t") == "1"
    finally:
        await conn.execute("DROP TABLE IF EXISTS ddl_t")
        await conn.close()


async def test_preparing_a_taken_name_fails_as_on_the_server(proxy):
    conn = await asyncpg.connect(proxy.url())
    try:
        await conn.prepare("SELECT 1", name="taken")
        with pytest.raises(asyncpg.DuplicatePreparedStatementError, match='"taken"'):
            await conn.prepare("SELECT 2", name="taken")
        assert await conn.fetchval("SELECT $1::int", 5) == 5
    finally:
        await conn.close()


def test_a_name_whose_parse_failed_can_be_used_again(proxy):
    """libpq-style clients reuse a statement name after its Parse failed."""
    with psycopg.connect(proxy.url(), autocommit=True) as conn:
        pgconn = conn.pgconn
        failed = pgconn.prepare(b"again", b"SELEC 1")  # libpq's PQprepare: Parse + Sync
        assert failed.status == psycopg.pq.ExecStatus.FATAL_ERROR
        prepared = pgconn.prepare(b"again", b"SELECT 1")
        assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK


# -- no client reaches another's statements --------------------------------------------------


GUESSED = [f"dbmux_{n}" for n in range(10)]  # the proxy's names are a counter


@pytest.mark.parametrize("attack", ["close-and-replace", "bind", "describe"])
async def test_a_client_cannot_reach_the_proxys_shared_statements(start_proxy, attack):
    """Shared statements carry a guessable name, visible in pg_prepared_statements. A client
    that names one in Close, Bind or Describe gets the server's own "does not exist" (26000)
    for it, as directly; closing one and preparing other SQL under its name must not make
    later clients run that SQL with their own parameters."""
    from tests.pgraw import RawClient, i32, msg

    proxy = start_proxy(pool={"max_connections_percent": 2})  # one server connection
    victim = await asyncpg.connect(proxy.url())
    attacker = await RawClient.connect(proxy.host, proxy.port)
    try:
        secret = await victim.prepare("SELECT $1::text || ' is mine'")
        assert await secret.fetchval("v") == "v is mine"
        await attacker.login("app", "app-secret", "app")
        names = [
            row.split("|")[0]
            for row in (await attacker_rows(attacker, "SELECT name FROM pg_prepared_statements"))
        ]
        assert names, "the shared statement should be visible on the shared connection"
        for name in names + GUESSED:
            n = name.encode() + b"\0"
            if attack == "close-and-replace":
                evil = msg(b"P", n + b"SELECT 'attacker: ' || $1::text\0\0\0")
                await attacker.send(msg(b"C", b"S" + n) + evil + msg(b"S"))
                kinds = [m.kind for m in await attacker.read_until_ready()]
                assert kinds == [b"3", b"1", b"Z"]  # its own name, its own statement
            elif attack == "bind":
                bind = msg(b"B", b"\0" + n + i32(0)[2:] + b"\0\1" + i32(1) + b"x" + b"\0\0")
                await attacker.send(bind + msg(b"E", b"\0" + i32(0)) + msg(b"S"))
                replies = await attacker.read_until_ready()
                assert [m.kind for m in replies] == [b"E", b"Z"]
                assert replies[0].fields["C"] == "26000"
            else:
                await attacker.send(msg(b"D", b"S" + n) + msg(b"S"))
                replies = await attacker.read_until_ready()
                assert [m.kind for m in replies] == [b"E", b"Z"]
                assert replies[0].fields["C"] == "26000"
        assert await secret.fetchval("w") == "w is mine"
        late = await asyncpg.connect(proxy.url())
        try:
            assert await late.fetchval("SELECT $1::text || ' is mine'", "z") == "z is mine"
        finally:
            await late.close()
    finally:
        attacker.abort()
        await victim.close()


async def attacker_rows(client, sql: str) -> list[str]:
    from tests.pgraw import data_rows, query

    await client.send(query(sql))
    return ["|".join(v or "" for v in row) for row in data_rows(await client.read_until_ready())]


async def test_psycopg_async_pipeline_with_an_error_in_executemany_never_hangs(proxy):
    """psycopg's AsyncConnection pipelines executemany with Flush and no Sync until the end;
    a statement the server lacked used to be prepared by a round trip of the proxy's own in
    the middle of that pipeline, which swallowed the answers in flight: about one run in six
    hung forever. Run it many times."""
    for run in range(60):
        async with asyncio.timeout(20):
            async with await psycopg.AsyncConnection.connect(proxy.url()) as conn:
                cur = conn.cursor()
                table = f"testmany_{run}"
                await cur.execute(f"CREATE TABLE {table} (a bigint, b bigint)")
                await cur.executemany(f"INSERT INTO {table} VALUES (%t, %t)", [[1, None], [3, 4]])
                with pytest.raises(psycopg.DataError):
                    await cur.executemany(f"INSERT INTO {table} VALUES (%t, %t)", [[1, ""], [3, 4]])
                await conn.rollback()


async def test_a_client_holding_too_many_statements_is_ended_and_others_go_on(proxy):
    """Every client name costs the proxy memory: one client may hold MAX_CLIENT_STATEMENTS
    at once; the session that asks for more is ended with 53400, not the proxy's memory."""
    from dbmux.engines.postgres.statements import MAX_CLIENT_STATEMENTS
    from tests.pgraw import RawClient, msg

    other = await asyncpg.connect(proxy.url())
    hog = await RawClient.connect(proxy.host, proxy.port)
    try:
        await hog.login("app", "app-secret", "app")
        parses = b"".join(
            msg(b"P", b"s%d\0SELECT %d\0\0\0" % (n, n)) for n in range(MAX_CLIENT_STATEMENTS)
        )
        await hog.send(parses + msg(b"S"))
        replies = await hog.read_until_ready(timeout=60)
        assert [m.kind for m in replies].count(b"1") == MAX_CLIENT_STATEMENTS
        await hog.send(msg(b"P", b"one_more\0SELECT 0\0\0\0") + msg(b"S"))
        await hog.expect_fatal("53400")
        assert await other.fetchval("SELECT $1::int", 7) == 7
    finally:
        hog.abort()
        await other.close()
