"""Session isolation under random interleavings: through a pool of two server connections,
every MySQL client sees exactly its own session state and never another client's, whatever
the clients do and in whatever order.

A model keeps each client's session as MySQL defines it (system variables, user variables,
the current schema, LAST_INSERT_ID(); SET is not transactional, so a SET inside a rolled-back
transaction still counts) and every step compares it with what the client reads through the
proxy. Values are client-specific, so a leak shows up as a value naming another client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiomysql
import pymysql
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from pymysql.constants import CLIENT

from dbmux.engines.mysql import wire
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER

N_CLIENTS = 4
POOL_OF_TWO = {"max_connections_percent": 4, "connection_borrow_timeout": 5}
STEP_TIMEOUT = 20.0
SCHEMAS = (MY_DB, "other")


@dataclass
class Model:
    time_zone: str = "SYSTEM"
    sql_mode: str | None = None  # None: the server's default
    user_var: str | None = None
    schema: str = MY_DB
    insert_id: int = 0
    in_transaction: bool = False
    values: list[str] = field(default_factory=list)


actions = st.one_of(
    # Quarter hours: MariaDB itself reads some other offsets back wrongly ('-04:04' as
    # '-01:56'), directly as through the proxy.
    st.tuples(st.just("time_zone"), st.sampled_from([0, 15, 30, 45])),
    st.tuples(st.just("sql_mode"), st.sampled_from(["ANSI_QUOTES", "NO_ZERO_DATE", ""])),
    st.tuples(st.just("user_var"), st.integers(0, 999)),
    st.tuples(st.just("clear_user_var"), st.just(0)),
    st.tuples(st.just("use"), st.sampled_from(SCHEMAS)),
    st.tuples(st.just("insert"), st.just(0)),
    st.tuples(st.just("begin"), st.just(0)),
    st.tuples(st.just("end"), st.booleans()),
    st.tuples(st.just("multi_statement"), st.sampled_from([0, 15, 30, 45])),
)
steps = st.lists(st.tuples(st.integers(0, N_CLIENTS - 1), actions), min_size=5, max_size=30)


async def fetch(conn, sql: str, args=None):
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        return await cur.fetchall()


async def check(i: int, conn, model: Model) -> None:
    ((tz, mode, var, schema, last),) = await fetch(
        conn, "SELECT @@time_zone, @@sql_mode, @v, DATABASE(), LAST_INSERT_ID()"
    )
    assert tz == model.time_zone, f"client {i}: time_zone {tz!r}"
    if model.sql_mode is not None:
        assert mode == model.sql_mode, f"client {i}: sql_mode {mode!r}"
    assert var == model.user_var, f"client {i}: @v {var!r}"
    assert schema == model.schema, f"client {i}: schema {schema!r}"
    assert last == model.insert_id, f"client {i}: LAST_INSERT_ID() {last}"


async def act(i: int, conn, model: Model, action: tuple[str, object]) -> None:
    kind, arg = action
    if kind == "time_zone":
        model.time_zone = f"+{i:02d}:{arg:02d}"
        await fetch(conn, f"SET time_zone = '{model.time_zone}'")
    elif kind == "sql_mode":
        model.sql_mode = str(arg)
        await fetch(conn, f"SET SESSION sql_mode = '{arg}'")
    elif kind == "user_var":
        model.user_var = f"client{i}-{arg}"
        await fetch(conn, "SET @v = %s", (model.user_var,))
    elif kind == "clear_user_var":
        model.user_var = None
        await fetch(conn, "SET @v = NULL")
    elif kind == "use":
        model.schema = str(arg)
        await conn.select_db(model.schema)
    elif kind == "insert":
        async with conn.cursor() as cur:
            await cur.execute(
                f"INSERT INTO {MY_DB}.items (client, note) VALUES (%s, 'iso')", (70_000 + i,)
            )
            model.insert_id = cur.lastrowid
    elif kind == "begin" and not model.in_transaction:
        await conn.begin()
        await fetch(conn, f"SELECT COUNT(*) FROM {MY_DB}.items")
        model.in_transaction = True
    elif kind == "end" and model.in_transaction:
        await (conn.commit() if arg else conn.rollback())
        model.in_transaction = False
    elif kind == "multi_statement":
        model.time_zone = f"-{i + 1:02d}:{arg:02d}"
        async with conn.cursor() as cur:
            await cur.execute(f"SET time_zone = '{model.time_zone}'; SELECT 1")
            while await cur.nextset():
                pass


@pytest.fixture
def isolation_proxy(start_my_proxy, mariadb):
    mariadb.sql("CREATE DATABASE IF NOT EXISTS other; GRANT ALL ON other.* TO 'app'@'%'")
    return start_my_proxy(pool=POOL_OF_TWO)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=steps)
async def test_every_client_sees_only_its_own_session(isolation_proxy, plan) -> None:
    proxy = isolation_proxy
    conns = [
        await aiomysql.connect(
            host=proxy.host,
            port=proxy.port,
            user=MY_USER,
            password=MY_PASSWORD,
            db=MY_DB,
            autocommit=True,
            client_flag=CLIENT.MULTI_STATEMENTS,
        )
        for _ in range(N_CLIENTS)
    ]
    models = [Model() for _ in range(N_CLIENTS)]
    try:
        for i, action in plan:
            # At most one open transaction at a time: the pool has two connections.
            if action[0] == "begin" and any(m.in_transaction for m in models):
                continue
            note(f"client {i}: {action}")
            async with asyncio.timeout(STEP_TIMEOUT):
                await act(i, conns[i], models[i], action)
                await check(i, conns[i], models[i])
        for i, conn in enumerate(conns):
            if models[i].in_transaction:
                await conn.rollback()
                models[i].in_transaction = False
            await check(i, conn, models[i])
    finally:
        for conn in conns:
            conn.close()
    assert proxy.metrics.pins() == 0


# -- long data ------------------------------------------------------------------------------

POOL_OF_ONE = {"max_connections_percent": 2, "connection_borrow_timeout": 5}


async def prepare(raw: RawMy, text: bytes) -> int:
    raw.command(b"\x16" + text)
    reply = await raw.response(wire.RESPONSE_PREPARE)
    return wire.parse_prepare_ok(reply[0]).statement_id


def execute_strings(statement: int, *values: bytes) -> bytes:
    """COM_STMT_EXECUTE binding VAR_STRING parameters (types sent)."""
    head = b"\x17" + statement.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
    nulls = bytes((len(values) + 7) // 8)
    types = b"\xfd\x00" * len(values)
    return head + nulls + b"\x01" + types + b"".join(wire.lenenc_str(v) for v in values)


def send_long_data(statement: int, param: int, data: bytes) -> bytes:
    return b"\x18" + statement.to_bytes(4, "little") + param.to_bytes(2, "little") + data


async def test_long_data_never_reaches_another_clients_execute(start_my_proxy) -> None:
    """Client A sends long data for `SELECT ?`, then executes a different statement, which
    ends its transaction. Without the fix the connection went back to the pool with A's long
    data still bound to the shared server statement, and client B executing `SELECT ?` on
    that connection got A's value instead of its own (MariaDB 10.11 keeps the data: this
    test failed before the fix). Now A keeps the connection until it executes `SELECT ?`."""
    proxy = start_my_proxy(pool=POOL_OF_ONE)

    async def run_b(b: RawMy) -> bytes:
        b_param = await prepare(b, b"SELECT ?")
        b.command(execute_strings(b_param, b"value-of-b"))
        return b"".join(await b.response())

    async with asyncio.timeout(STEP_TIMEOUT):
        async with (
            await RawMy.connect(proxy.host, proxy.port) as a,
            await RawMy.connect(proxy.host, proxy.port) as b,
        ):
            for raw in (a, b):
                assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
            a_param = await prepare(a, b"SELECT ?")
            a_other = await prepare(a, b"SELECT 'other'")
            a.command(send_long_data(a_param, 0, b"secret-of-a"))
            a.command(execute_strings(a_other))
            assert b"other" in b"".join(await a.response())
            seen_by_b = asyncio.create_task(run_b(b))
            # B runs to the end if the connection went back, else waits for it.
            while not seen_by_b.done() and not any(p.waiters for p in proxy.pools.pools.values()):
                await asyncio.sleep(0.01)
            a.command(execute_strings(a_param, b"ignored"))
            seen_by_a = b"".join(await a.response())
            assert b"secret-of-a" in seen_by_a  # A's long data is still its own
            assert b"value-of-b" in await seen_by_b
            assert b"secret-of-a" not in seen_by_b.result()


async def test_closing_a_statement_drops_its_long_data_and_frees_the_connection(
    start_my_proxy,
) -> None:
    """A client that sends long data and then closes the statement leaves nothing behind:
    the shared server statement is reset, so the next client's execute of that text gets
    its own parameter, and the connection goes back without waiting for an execute that
    will never come (without it, B timed out waiting for the pool's one connection)."""
    proxy = start_my_proxy(pool=POOL_OF_ONE)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with (
            await RawMy.connect(proxy.host, proxy.port) as a,
            await RawMy.connect(proxy.host, proxy.port) as b,
        ):
            for raw in (a, b):
                assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
            a_param = await prepare(a, b"SELECT ?")
            a.command(send_long_data(a_param, 0, b"secret-of-a"))
            a.command(b"\x19" + a_param.to_bytes(4, "little"))
            assert (await a.query("SELECT 'a goes on'"))[-2].endswith(b"a goes on")
            b_param = await prepare(b, b"SELECT ?")
            b.command(execute_strings(b_param, b"value-of-b"))
            seen_by_b = b"".join(await b.response())
    assert b"value-of-b" in seen_by_b
    assert b"secret-of-a" not in seen_by_b


# -- KILL ----------------------------------------------------------------------------------

KILL_SPELLINGS = [
    "KILL {id}",
    "KILL/**/{id}",
    "/*x*/KILL {id}",
    "kill\n{id}",
    "KILL HARD {id}",
    "KILL SOFT QUERY {id}",
    "KILL CONNECTION {id}",
    "KILL HARD CONNECTION {id};",
    "KILL QUERY ID {id}",
    "KILL USER 'app'",
    "KILL QUERY USER app",
    "/*!KILL {id}*/",
    "/*!50000 KILL CONNECTION {id}*/",
    "/*M!100000 KILL {id}*/",
    "KILL ({id})",
    "KILL {id} + 0",
    "SELECT 1; KILL {id}",
    "SET STATEMENT max_statement_time = 10 FOR KILL {id}",
    "BEGIN NOT ATOMIC KILL {id}; END",
    "EXECUTE IMMEDIATE 'KILL {id}'",
    "EXECUTE IMMEDIATE CONCAT('KI', 'LL {id}')",
    "EXECUTE IMMEDIATE 'EXECUTE IMMEDIATE ''KILL {id}'''",
    "PREPARE s FROM 'KILL {id}'",
    "PREPARE s FROM _latin1'KILL {id}'",
    "PREPARE s FROM 'KI' 'LL {id}'",
    "SET @k = 'KILL {id}'; PREPARE s FROM @k; EXECUTE s",
    "KILL 'a\\' ; KILL {id} -- '",
]


@pytest.fixture
def kill_proxy(start_my_proxy):
    return start_my_proxy(pool={"max_connections_percent": 4, "connection_borrow_timeout": 5})


def run_all(conn, sql: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql)
        while cur.nextset():
            pass


@pytest.mark.parametrize("spelling", KILL_SPELLINGS)
def test_no_spelling_of_kill_reaches_a_server_connection_lent_to_another_client(
    kill_proxy, spelling: str
) -> None:
    """A client that learned the server thread id of a connection lent to another client
    (CONNECTION_ID(), the process list) sends KILL spelled so that a regex misses it. Before,
    every form but the plain one reached MariaDB as typed and ended the victim's connection
    in the middle of its transaction; now each is carried out on dbmux's own ids (where the
    server id is no client's) or refused."""
    with (
        kill_proxy.connect() as victim,
        kill_proxy.connect(client_flag=CLIENT.MULTI_STATEMENTS) as attacker,
    ):
        victim.begin()
        with victim.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            (server_id,) = cur.fetchone()
        assert server_id not in (victim.thread_id(), attacker.thread_id())  # no client's id
        try:
            run_all(attacker, spelling.format(id=server_id))
        except pymysql.err.MySQLError as error:
            assert error.args[0] in (1094, 1235), error  # unknown id, or refused
        with victim.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            assert cur.fetchone() == (server_id,)  # the same connection, still in use
        victim.rollback()
        assert run_one(attacker, "SELECT 'alive'") == "alive"


def run_one(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


@pytest.mark.parametrize("spelling", ["KILL/**/QUERY {id}", "/*x*/ KILL SOFT QUERY {id}"])
def test_kill_query_of_a_clients_own_id_in_any_spelling_is_carried_out(
    kill_proxy, spelling: str
) -> None:
    """KILL QUERY with the dbmux id, spelled with comments or modifiers, still works: the
    refusal of the other forms must not cost drivers their cancel."""
    with kill_proxy.connect() as conn:
        run_all(conn, spelling.format(id=conn.thread_id()))
        assert run_one(conn, "SELECT 'alive'") == "alive"


def test_kill_connection_of_a_clients_own_id_spelled_with_comments_ends_it(kill_proxy) -> None:
    """`KILL/**/CONNECTION <own id>` ends the client's own connection, as on a server."""
    with kill_proxy.connect() as conn:
        with pytest.raises(pymysql.err.OperationalError):
            run_all(conn, f"/*!KILL*/ /**/ CONNECTION {conn.thread_id()}")
            run_one(conn, "SELECT 1")


async def test_kill_cannot_be_prepared_in_the_binary_protocol(kill_proxy) -> None:
    """COM_STMT_PREPARE of `KILL ?` would let an execute send any server thread id: it is
    refused with a MySQL error, and the client goes on."""
    async with asyncio.timeout(STEP_TIMEOUT):
        async with await RawMy.connect(kill_proxy.host, kill_proxy.port) as raw:
            assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
            for text in (b"KILL ?", b"KILL/**/5", b"EXECUTE IMMEDIATE 'KILL 5'"):
                raw.command(b"\x16" + text)
                (reply,) = await raw.response(wire.RESPONSE_PREPARE)
                assert wire.parse_err(reply).code == 1235
            assert (await raw.query("SELECT 'alive'"))[-2].endswith(b"alive")


# -- temporary tables ------------------------------------------------------------------------

TEMP_TABLE_FORMS = [
    b"\x03CREATE /*!TEMPORARY*/ TABLE items SELECT 'secret' AS note",
    b"\x03/*!50000 CREATE*/ /*M!100000 TEMPORARY */ TABLE items SELECT 'secret' AS note",
    b"\x03create/**/temporary\ttable IF NOT EXISTS items SELECT 'secret' AS note",
    b"\x03SET STATEMENT max_statement_time = 5 FOR CREATE TEMPORARY TABLE items"
    b" SELECT 'secret' AS note",
    b"\x03/*M!CREATE TEMPORARY TABLE items SELECT 'secret' AS note*/",
    b"\x03EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE items SELECT ''secret'' AS note'",
    # binary protocol: prepared now, executed below
    b"\x16CREATE OR REPLACE TEMPORARY TABLE items SELECT 'secret' AS note",
]


@pytest.mark.parametrize("form", TEMP_TABLE_FORMS)
async def test_a_temporary_table_made_in_any_form_is_never_seen_by_another_client(
    start_my_proxy, form: bytes
) -> None:
    """A client makes a temporary `items`, which shadows the real table, in a spelling a
    simple reading misses (executable comments, comments as blanks, SET STATEMENT, dynamic
    SQL, a binary-protocol prepare).
    Its session keeps the connection until it leaves; the next client's `items` is the real
    table. (The MySQL classifier read all of these already: this test passed before.)"""
    proxy = start_my_proxy(pool=POOL_OF_ONE)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with (
            await RawMy.connect(proxy.host, proxy.port) as creator,
            await RawMy.connect(proxy.host, proxy.port) as other,
        ):
            for raw in (creator, other):
                assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
            creator.command(form)
            if form[0] == wire.COM_STMT_PREPARE:
                reply = await creator.response(wire.RESPONSE_PREPARE)
                creator.command(execute_strings(wire.parse_prepare_ok(reply[0]).statement_id))
            assert (await creator.response())[0][:1] == b"\0"
            mine = await creator.query("SELECT COUNT(*) FROM items WHERE note = 'secret'")
            assert mine[-2] == b"\x011"  # its own temporary table
            seen = asyncio.create_task(
                other.query("SELECT COUNT(*) FROM items WHERE note = 'secret'")
            )
            while not seen.done() and not any(p.waiters for p in proxy.pools.pools.values()):
                await asyncio.sleep(0.01)
            creator.command(b"\x01")  # COM_QUIT
            assert (await seen)[-2] == b"\x010"
