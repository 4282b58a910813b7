"""Real MySQL drivers through dbmux with every write on both sides cut at random points and
delayed (dbmux.testing.rechunk): driver -> relay -> dbmux -> relay -> MariaDB. A packet header split
after one byte, a 16 MiB packet's continuation arriving late, several result sets trickling
in: code that takes one read for one packet fails here. The cuts follow DBMUX_RECHUNK_SEED
(1 by default); bench.rechunk runs the loops with many random seeds."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import aiomysql
import mysql.connector
import pymysql
import pymysql.cursors
import pytest
from pymysql.constants import CLIENT

from dbmux.testing.rechunk import Rechunker
from dbmux.testing.scenarios import BY_NAME, MYSQL, SCENARIOS, Endpoint, run_many
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, RechunkedMyProxy

pytestmark = pytest.mark.timeout(90)
DEADLINE = 15.0  # seconds for one iteration of a scenario; a normal one takes well under 1 s
POOL_OF_TWO = {"max_connections_percent": 4}
MY_SCENARIOS = [s.name for s in SCENARIOS if s.engine == MYSQL]
SOCKET_TIMEOUT = 30  # PyMySQL's read and write timeouts: a hang is an error, not a stall

StartProxy = Callable[..., RechunkedMyProxy]


def endpoint_of(relay: Rechunker) -> Endpoint:
    return Endpoint(relay.host, relay.port, MY_USER, MY_PASSWORD, MY_DB)


def connect(proxy: RechunkedMyProxy, **kwargs) -> pymysql.Connection:
    return proxy.connect(read_timeout=SOCKET_TIMEOUT, write_timeout=SOCKET_TIMEOUT, **kwargs)


@pytest.mark.parametrize("name", MY_SCENARIOS)
async def test_each_driver_scenario_passes_through_cut_and_delayed_writes(
    start_rechunked_my_proxy: StartProxy, name: str
) -> None:
    """A few iterations of every scenario (prepared statements, executemany, a duplicate key in
    the middle of a batch, multi-statements): a proxy that loses, reorders or waits for bytes
    that arrive in pieces fails or hangs here."""
    proxy = start_rechunked_my_proxy(pool=POOL_OF_TWO)
    await run_many(BY_NAME[name], endpoint_of(proxy.client_side), proxy.client_side, 5, DEADLINE)
    assert proxy.server_side.connections > 0  # dbmux really went through the server-side relay


@pytest.mark.parametrize("cursor", [pymysql.cursors.Cursor, pymysql.cursors.SSCursor])
def test_large_results_arrive_whole_buffered_and_streamed(
    start_rechunked_my_proxy: StartProxy, cursor: type[pymysql.cursors.Cursor]
) -> None:
    """About 4 MB of rows, read at once and streamed row by row (SSCursor), each packet cut
    into pieces on both hops."""
    proxy = start_rechunked_my_proxy()
    with connect(proxy, cursorclass=cursor) as conn, conn.cursor() as cur:
        cur.execute("SELECT seq, REPEAT(MD5(seq), 32) FROM seq_1_to_4000")
        rows = list(cur.fetchall())
    assert [r[0] for r in rows] == list(range(1, 4001))
    assert sum(len(r[1]) for r in rows) == 4000 * 1024


def test_a_value_over_one_packet_crosses_both_ways(start_rechunked_my_proxy: StartProxy, mariadb):
    """16 MiB + 4 bytes is a full packet and its continuation, each header cut at random."""
    mariadb.sql("SET GLOBAL max_allowed_packet = 67108864")
    proxy = start_rechunked_my_proxy()
    repeats = 1 << 20
    value = "0123456789abcdef" * repeats + "tail"
    with connect(proxy) as conn, conn.cursor() as cur:
        cur.execute("SELECT MD5(%s)", (value,))
        assert cur.fetchone() == (hashlib.md5(value.encode()).hexdigest(),)
        cur.execute("SELECT CONCAT(REPEAT('0123456789abcdef', %s), 'tail')", (repeats,))
        assert cur.fetchone() == (value,)


def test_multi_statements_with_an_error_in_the_middle(start_rechunked_my_proxy: StartProxy):
    """Several result sets in one reply, then an error after the first: the client gets the
    first set and the error, and its next query works."""
    proxy = start_rechunked_my_proxy()
    with connect(proxy, client_flag=CLIENT.MULTI_STATEMENTS) as conn, conn.cursor() as cur:
        for i in range(20):
            cur.execute(f"SELECT {i}; SELECT 'b', {i}; SELECT REPEAT('x', 10000)")
            sets = [cur.fetchall()]
            while cur.nextset():
                sets.append(cur.fetchall())
            assert sets == [((i,),), (("b", i),), (("x" * 10000,),)]
            cur.execute("SELECT 1; SELECT * FROM no_such_table; SELECT 3")
            assert cur.fetchall() == ((1,),)
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.nextset()
            cur.execute("SELECT 4")
            assert cur.fetchone() == (4,)


def test_call_with_several_result_sets(start_rechunked_my_proxy: StartProxy) -> None:
    proxy = start_rechunked_my_proxy()
    with connect(proxy) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE PROCEDURE IF NOT EXISTS rechunked_results(n INT)"
            " BEGIN SELECT n; SELECT seq, REPEAT('y', 100) FROM seq_1_to_500 WHERE seq <= n;"
            " SELECT 'done'; END"
        )
        for n in (1, 250, 500):
            cur.execute("CALL rechunked_results(%s)", (n,))
            assert cur.fetchall() == ((n,),)
            assert cur.nextset()
            assert len(cur.fetchall()) == n
            assert cur.nextset()
            assert cur.fetchall() == (("done",),)
            while cur.nextset():
                pass
            cur.execute("SELECT 5")
            assert cur.fetchone() == (5,)


def test_prepared_statements_of_clients_sharing_one_connection(
    start_rechunked_my_proxy: StartProxy,
) -> None:
    """mysql-connector's binary protocol, two clients alternating on one server connection:
    dbmux prepares each one's statements again while their packets arrive in pieces."""
    proxy = start_rechunked_my_proxy(pool={"max_connections_percent": 2})
    kwargs = {"host": proxy.host, "port": proxy.port, "user": MY_USER, "password": MY_PASSWORD}
    a = mysql.connector.connect(**kwargs, database=MY_DB, use_pure=True, connection_timeout=30)
    b = mysql.connector.connect(**kwargs, database=MY_DB, use_pure=True, connection_timeout=30)
    try:
        ca, cb = a.cursor(prepared=True), b.cursor(prepared=True)
        for i in range(20):
            ca.execute("SELECT %s * 3", (i,))
            assert ca.fetchall() == [(i * 3,)]
            cb.execute("SELECT CONCAT(%s, 'b')", (str(i),))
            assert cb.fetchall() == [(f"{i}b",)]
    finally:
        a.close()
        b.close()


async def test_aiomysql_clients_across_a_small_pool(start_rechunked_my_proxy: StartProxy):
    proxy = start_rechunked_my_proxy(pool=POOL_OF_TWO)

    async def client(n: int) -> None:
        conn = await aiomysql.connect(
            host=proxy.host, port=proxy.port, user=MY_USER, password=MY_PASSWORD, db=MY_DB
        )
        try:
            async with conn.cursor() as cur:
                for i in range(10):
                    await cur.execute("SELECT %s, REPEAT('z', %s)", (n, 100 * i))
                    assert await cur.fetchone() == (n, "z" * 100 * i)
        finally:
            conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(6))), 60)


# -- loops: hundreds of iterations, each with a deadline, so a rare hang shows up every time

# mysql-connector's pure-Python client waits out a delayed ACK (40 ms) on each new statement,
# directly too: fewer of its iterations fit the same time.
LOOPS = {"mysql-connector-prepared": 80, "aiomysql-batches": 200}


@pytest.mark.parametrize("name", MY_SCENARIOS)
async def test_batches_and_prepared_statements_never_hang_through_dbmux(
    start_rechunked_my_proxy: StartProxy, name: str
) -> None:
    """Each scenario many times over on a pool of two, so statements are prepared again on one
    connection after another and result sets of many packets cross in pieces."""
    proxy = start_rechunked_my_proxy(pool=POOL_OF_TWO)
    relay = proxy.client_side
    await run_many(BY_NAME[name], endpoint_of(relay), relay, LOOPS[name], DEADLINE)
