"""Real drivers through dbmux with every write on both sides cut at random points and delayed
(dbmux.testing.rechunk): driver -> relay -> dbmux -> relay -> PostgreSQL. Code that takes one
read for one message, or assumes a peer waits for an answer before sending more, fails here even
when loopback happens to deliver whole messages. The cuts follow DBMUX_RECHUNK_SEED (1 by default);
bench.rechunk runs the loops with many random seeds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from dbmux.testing.rechunk import Rechunker
from dbmux.testing.scenarios import BY_NAME, POSTGRESQL, SCENARIOS, Endpoint, run_many
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RechunkedProxy

pytestmark = pytest.mark.timeout(90)
DEADLINE = 15.0  # seconds for one iteration of a scenario; a normal one takes well under 1 s
POOL_OF_TWO = {"max_connections_percent": 4}  # a shared statement is often missing on one
PG_SCENARIOS = [s.name for s in SCENARIOS if s.engine == POSTGRESQL]
MB = 1024 * 1024

StartProxy = Callable[..., RechunkedProxy]


def endpoint_of(relay: Rechunker) -> Endpoint:
    return Endpoint(relay.host, relay.port, APP_USER, APP_PASSWORD, APP_DB)


@pytest.mark.parametrize("name", PG_SCENARIOS)
async def test_each_driver_scenario_passes_through_cut_and_delayed_writes(
    start_rechunked_proxy: StartProxy, name: str
) -> None:
    """A few iterations of every scenario (pipelines, executemany, an error in the middle of a
    batch, prepared statements, COPY): a proxy that loses, reorders or waits for bytes that
    arrive in pieces fails or hangs here."""
    proxy = start_rechunked_proxy(pool=POOL_OF_TWO)
    await run_many(BY_NAME[name], endpoint_of(proxy.client_side), proxy.client_side, 5, DEADLINE)
    assert proxy.server_side.connections > 0  # dbmux really went through the server-side relay


async def test_copy_in_and_out_of_several_mb_with_psycopg(start_rechunked_proxy: StartProxy):
    """COPY FROM STDIN sends CopyData without waiting for answers and COPY TO STDOUT streams
    them back: both cross in pieces, whole and in order."""
    proxy = start_rechunked_proxy()
    rows = [(i, f"{i:08d}" * 40) for i in range(12_000)]  # about 4 MB of text
    async with await psycopg.AsyncConnection.connect(proxy.url()) as conn:
        await conn.execute("create temp table copied (a int, b text)")
        async with conn.cursor() as cur:
            async with cur.copy("copy copied (a, b) from stdin") as copy:
                for row in rows:
                    await copy.write_row(row)
            got = []
            async with cur.copy("copy (select a, b from copied order by a) to stdout") as copy:
                async for row in copy.rows():
                    got.append((int(row[0]), row[1]))
    assert got == rows


async def test_large_results_arrive_whole_through_asyncpg_and_psycopg(
    start_rechunked_proxy: StartProxy,
) -> None:
    """About 4 MB of DataRows per query, cut into hundreds of pieces on each hop."""
    proxy = start_rechunked_proxy()
    query = "select i, repeat(md5(i::text), 32) from generate_series(1, 4000) i"
    conn = await asyncpg.connect(proxy.url())
    try:
        rows = await conn.fetch(query)
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(proxy.url()) as aconn:
        cur = await aconn.execute(query)
        again = await cur.fetchall()
    assert [tuple(r) for r in rows] == again
    assert sum(len(r[1]) for r in again) == 4000 * 1024


async def test_psycopg_prepares_every_statement_of_two_clients_sharing_one_connection(
    start_rechunked_proxy: StartProxy,
) -> None:
    """prepare_threshold=0: every statement a Parse of a named statement, two clients
    alternating on one server connection, so dbmux keeps preparing each one's statements
    again while their messages arrive in pieces."""
    proxy = start_rechunked_proxy(pool={"max_connections_percent": 2})

    def alternate() -> None:
        with (
            psycopg.connect(proxy.url(), prepare_threshold=0, autocommit=True) as a,
            psycopg.connect(proxy.url(), prepare_threshold=0, autocommit=True) as b,
        ):
            for i in range(30):
                assert a.execute("select %s::int * 3", (i,)).fetchone() == (i * 3,)
                assert b.execute("select %s::text || 'b'", (str(i),)).fetchone() == (f"{i}b",)
                with pytest.raises(psycopg.errors.DivisionByZero):
                    a.execute("select 1 / %s::int", (0,))

    # A blocking driver stuck in a read is freed by cutting its connections at the deadline.
    await proxy.client_side.bounded(asyncio.to_thread(alternate), 60)


async def test_asyncpg_statements_of_many_clients_follow_them_across_a_small_pool(
    start_rechunked_proxy: StartProxy,
) -> None:
    proxy = start_rechunked_proxy(pool=POOL_OF_TWO)

    async def client(n: int) -> None:
        conn = await asyncpg.connect(proxy.url())
        try:
            for i in range(10):
                async with conn.transaction():
                    assert await conn.fetchval("select $1::int * $2::int", n, i) == n * i
                    row = await conn.fetchrow("select $1::text as who, $2::int as i", f"c{n}", i)
                    assert (row["who"], row["i"]) == (f"c{n}", i)
        finally:
            await conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(6))), 60)
    assert proxy.metrics.pins() == 0


# -- loops: hundreds of iterations, each with a deadline, so a rare hang shows up every time

LOOPS = 200


async def test_the_issue_10_scenario_loops_through_the_relay_alone(rechunked_pg: Rechunker):
    """The relay without dbmux: psycopg's executemany pipelines finish every time, so a hang
    in the next test is dbmux's, not the relay's."""
    await run_many(
        BY_NAME["psycopg-executemany-error"], endpoint_of(rechunked_pg), rechunked_pg, LOOPS, 10
    )


async def test_psycopg_executemany_pipelines_never_hang_through_dbmux(
    start_rechunked_proxy: StartProxy,
) -> None:
    """Issue 10.1: psycopg's async executemany (an unsynced pipeline ending in Flush) hung
    about one run in six when dbmux prepared a missing shared statement with a round trip of
    its own and swallowed the replies the driver was waiting for."""
    proxy = start_rechunked_proxy(pool=POOL_OF_TWO)
    scenario = BY_NAME["psycopg-executemany-error"]
    await run_many(scenario, endpoint_of(proxy.client_side), proxy.client_side, LOOPS, DEADLINE)


@pytest.mark.parametrize(
    "name",
    ["psycopg-async-pipeline", "psycopg-sync-pipeline-prepared", "asyncpg-prepared-executemany"],
)
async def test_pipelines_and_prepared_statements_never_hang_through_dbmux(
    start_rechunked_proxy: StartProxy, name: str
) -> None:
    """The other pipeline and extended-protocol scenarios, many times over on a pool of two,
    so statements are prepared again on one connection after another."""
    proxy = start_rechunked_proxy(pool=POOL_OF_TWO)
    relay = proxy.client_side
    await run_many(BY_NAME[name], endpoint_of(relay), relay, LOOPS, DEADLINE)
