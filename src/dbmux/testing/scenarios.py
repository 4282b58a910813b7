"""Driver scenarios that keep many messages in flight (pipelines, executemany, prepared
statements, errors in the middle of a batch), for the loop tests and bench.rechunk to run many
times through the re-chunking relay (dbmux.testing.rechunk).

Each scenario is one iteration: it connects, works, checks what it got and disconnects, and
leaves no rows or tables behind (it rolls back), so it can run any number of times on one
database. A blocking driver's scenario runs on a worker thread; a hang in it is ended by
cutting the relay (Rechunker.bounded), which closes the driver's socket.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiomysql
import asyncpg
import mysql.connector
import psycopg
from pymysql.constants import CLIENT

from dbmux.testing.rechunk import Rechunker

POSTGRESQL, MYSQL = "POSTGRESQL", "MYSQL"


class ScenarioError(AssertionError):
    """A scenario got an answer other than the one the database gives directly."""


def expect(got: Any, wanted: Any, what: str) -> None:
    if got != wanted:
        raise ScenarioError(f"{what}: got {got!r}, wanted {wanted!r}")


@dataclass(frozen=True)
class Endpoint:
    """Where a scenario connects: dbmux, a relay, or the server itself."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def mysql_kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str
    body: Callable[[Endpoint], Any]  # a coroutine function, or a blocking one

    def run(self, endpoint: Endpoint) -> Awaitable[None]:
        if inspect.iscoroutinefunction(self.body):
            return self.body(endpoint)
        return asyncio.to_thread(self.body, endpoint)


class ScenarioFailed(AssertionError):
    """One iteration of a loop failed or hung; the message says which and with what seed."""

    def __init__(self, scenario: Scenario, iteration: int, times: int, seed: int, cause: str):
        super().__init__(
            f"{scenario.name}: iteration {iteration + 1} of {times} {cause} "
            f"(reproduce with DBMUX_RECHUNK_SEED={seed})"
        )
        self.iteration = iteration


async def run_many(
    scenario: Scenario,
    endpoint: Endpoint,
    relay: Rechunker,
    times: int,
    deadline: float,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Run `scenario` `times` times in a row through `relay` (the hop the driver connects
    to), each iteration within `deadline` seconds; the seconds it took in all. Raises
    ScenarioFailed at the first iteration that fails or hangs."""
    started = time.monotonic()
    for i in range(times):
        try:
            await relay.bounded(scenario.run(endpoint), deadline)
        except TimeoutError:
            raise ScenarioFailed(
                scenario, i, times, relay.seed, f"hung (no answer within {deadline} s)"
            ) from None
        except Exception as error:
            raise ScenarioFailed(scenario, i, times, relay.seed, f"failed: {error!r}") from error
        if progress is not None:
            progress(i + 1)
    return time.monotonic() - started


# -- PostgreSQL


async def psycopg_executemany_error(endpoint: Endpoint) -> None:
    """Issue 10's report, as written: two async executemany pipelines, the second failing in
    its first row, then a rollback."""
    async with await psycopg.AsyncConnection.connect(endpoint.url()) as aconn:
        cur = aconn.cursor()
        await cur.execute("create table testmany (a bigint, b bigint)")
        await cur.executemany("insert into testmany values (%t, %t)", [[1, None], [3, 4]])
        try:
            await cur.executemany("insert into testmany values (%t, %t)", [[1, ""], [3, 4]])
        except psycopg.DataError:
            pass
        else:
            raise ScenarioError("inserting '' into a bigint did not fail")
        await aconn.rollback()


async def psycopg_async_pipeline(endpoint: Endpoint) -> None:
    """An explicit async pipeline with results fetched before its Sync (psycopg sends Flush),
    an error in the middle of the next one, and the connection going on after it."""
    async with await psycopg.AsyncConnection.connect(
        endpoint.url(), autocommit=True, prepare_threshold=1
    ) as conn:
        async with conn.pipeline() as pipeline:
            curs = [await conn.execute("select %s::int * 2", (i,)) for i in range(8)]
            expect(await curs[0].fetchone(), (0,), "first result read mid-pipeline")
            await pipeline.sync()
            curs += [await conn.execute("select %s::text || 'x'", (str(i),)) for i in range(4)]
        expect([await c.fetchone() for c in curs[1:8]], [(i * 2,) for i in range(1, 8)], "ints")
        expect([await c.fetchone() for c in curs[8:]], [(f"{i}x",) for i in range(4)], "texts")
        try:
            async with conn.pipeline():
                before = await conn.execute("select 1")
                # psycopg may raise the error here already or at the end of the block.
                await conn.execute("select 1 / %s::int", (0,))
                await conn.execute("select 3")
        except psycopg.errors.DivisionByZero:
            pass
        else:
            raise ScenarioError("1 / 0 in a pipeline did not fail")
        expect(await before.fetchone(), (1,), "the statement before the error")
        expect(await (await conn.execute("select 4")).fetchone(), (4,), "after the pipeline")


def psycopg_sync_pipeline_prepared(endpoint: Endpoint) -> None:
    """The blocking API in pipeline mode with every statement prepared (prepare_threshold=0):
    Parse, Bind, Execute of many statements before one Sync, and an executemany that fails in
    the middle of a transaction."""
    with psycopg.connect(endpoint.url(), prepare_threshold=0) as conn:
        with conn.pipeline():
            conn.execute("create table pipemany (a int primary key, b text)")
            cur = conn.cursor()
            cur.executemany(
                "insert into pipemany values (%s, %s)", [(i, str(i)) for i in range(20)]
            )
            got = conn.execute("select count(*), sum(a) from pipemany where a < %s", (100,))
        expect(got.fetchone(), (20, 190), "rows inserted in the pipeline")
        try:
            with conn.pipeline():
                cur.executemany("insert into pipemany values (%s, 'again')", [(100,), (5,), (101,)])
        except psycopg.errors.UniqueViolation:
            pass
        else:
            raise ScenarioError("a duplicate key in executemany did not fail")
        conn.rollback()
        expect(conn.execute("select %s::int + 1", (41,)).fetchone(), (42,), "after the rollback")


async def asyncpg_prepared_executemany(endpoint: Endpoint) -> None:
    """asyncpg's named statements, an executemany (Bind/Execute pairs before one Sync), one
    that fails on the server in its middle row, and COPY both ways, in a rolled-back
    transaction."""
    conn = await asyncpg.connect(endpoint.url())
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("create table asyncmany (a int, b text)")
        await conn.executemany(
            "insert into asyncmany values ($1, $2)", [(i, f"r{i}") for i in range(30)]
        )
        statement = await conn.prepare("select count(*), max(b) from asyncmany where a < $1")
        expect(tuple(await statement.fetchrow(10)), (10, "r9"), "prepared select")
        await conn.copy_records_to_table("asyncmany", records=[(i, "copied") for i in range(100)])
        copied = await conn.fetch("select a from asyncmany where b = 'copied' order by a")
        expect([r["a"] for r in copied], list(range(100)), "COPY FROM STDIN")
        sink = bytearray()

        async def collect(chunk: bytes) -> None:
            sink.extend(chunk)

        await conn.copy_from_query("select a, b from asyncmany order by a, b", output=collect)
        expect(sink.count(b"\n"), 130, "COPY TO STDOUT lines")
        await transaction.rollback()
        try:
            # The table went with the rollback.
            await conn.executemany("insert into asyncmany values ($1)", [(1,), (2,)])
            raise ScenarioError("executemany into a rolled-back table did not fail")
        except asyncpg.UndefinedTableError:
            pass
        try:
            await conn.executemany("select 10 / $1::int", [(1,), (0,), (2,)])
            raise ScenarioError("executemany dividing by zero did not fail")
        except asyncpg.DivisionByZeroError:
            pass
        expect(await conn.fetchval("select $1::int + 1", 41), 42, "a statement after the errors")
    finally:
        await conn.close()


# -- MySQL


def mysql_connector_prepared(endpoint: Endpoint) -> None:
    """mysql-connector's binary protocol (prepared=True): prepare, executemany (one execute per
    row), a duplicate key in the middle, and a large result through a prepared select."""
    conn = mysql.connector.connect(**endpoint.mysql_kwargs(), use_pure=True, autocommit=False)
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("create or replace table prepmany (a int primary key, b text)")
        conn.start_transaction()
        cur.executemany("insert into prepmany values (%s, %s)", [(i, f"r{i}") for i in range(20)])
        try:
            cur.executemany("insert into prepmany values (%s, 'again')", [(100,), (5,), (101,)])
            raise ScenarioError("a duplicate key in executemany did not fail")
        except mysql.connector.IntegrityError:
            pass
        cur.execute("select count(*), max(a) from prepmany where a < %s", (100,))
        expect(cur.fetchall(), [(20, 19)], "rows of the first executemany")
        cur.execute("select repeat('x', %s) from seq_1_to_200", (5000,))
        rows = cast("list[tuple[Any, ...]]", cur.fetchall())  # tuples: no dictionary=True
        expect(sum(len(r[0]) for r in rows), 200 * 5000, "a 1 MB prepared result")
        conn.rollback()
        cur.close()
    finally:
        conn.close()


async def aiomysql_batches(endpoint: Endpoint) -> None:
    """aiomysql: a multi-statement query with several result sets, executemany (one multi-row
    INSERT), an error and the connection going on."""
    kwargs = endpoint.mysql_kwargs()
    kwargs["db"] = kwargs.pop("database")
    conn = await aiomysql.connect(**kwargs, client_flag=CLIENT.MULTI_STATEMENTS, autocommit=False)
    try:
        async with conn.cursor() as cur:
            await cur.execute("select 1; select 'two', 2; select 3")
            sets = [await cur.fetchall()]
            while await cur.nextset():
                sets.append(await cur.fetchall())
            expect(sets, [((1,),), (("two", 2),), ((3,),)], "result sets of a multi-statement")
            await cur.execute("create or replace table aiomany (a int primary key, b text)")
            await conn.begin()
            await cur.executemany(
                "insert into aiomany values (%s, %s)", [(i, f"r{i}") for i in range(50)]
            )
            try:
                await cur.execute("insert into aiomany values (1, 'dup')")
                raise ScenarioError("a duplicate key did not fail")
            except aiomysql.IntegrityError:
                pass
            await cur.execute("select count(*) from aiomany")
            expect(await cur.fetchone(), (50,), "rows of the executemany")
            await conn.rollback()
    finally:
        conn.close()


SCENARIOS = (
    Scenario("psycopg-executemany-error", POSTGRESQL, psycopg_executemany_error),
    Scenario("psycopg-async-pipeline", POSTGRESQL, psycopg_async_pipeline),
    Scenario("psycopg-sync-pipeline-prepared", POSTGRESQL, psycopg_sync_pipeline_prepared),
    Scenario("asyncpg-prepared-executemany", POSTGRESQL, asyncpg_prepared_executemany),
    Scenario("mysql-connector-prepared", MYSQL, mysql_connector_prepared),
    Scenario("aiomysql-batches", MYSQL, aiomysql_batches),
)
BY_NAME = {s.name: s for s in SCENARIOS}
