"""Named prepared statements work across server connections without pinning."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

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
