"""The client session's contract: what every engine promises its clients, written once and run
against both, through real drivers (asyncpg, aiomysql) and raw sockets, with dbmux in front of
a real PostgreSQL and a real MariaDB.

- limits: a client past max_client_connections is refused with the engine's "too many
  connections" error naming the setting;
- a borrow that waits past connection_borrow_timeout fails with an error naming the setting,
  and the client goes on;
- idle_client_timeout: a silent client, in a transaction or not, is told why and
  disconnected; one waiting for its query or for a server connection is not silent;
- pin and reset: a pinning statement keeps its server connection; the next client of that
  connection does not see the state;
- a client keeps its connection when its server connection is lost, between transactions
  (no error) or inside one (the engine's error, then the next transaction runs);
- a client that leaves mid-transaction has it rolled back and frees the connection;
- what clients make the proxy hold stays bounded: the pools of databases nobody uses go;
- bad input: garbage after login gets the engine's protocol error and the close, and the
  proxy serves others;
- an idle client costs little: no finished task kept, no instance dict.
"""

from __future__ import annotations

import asyncio
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomysql
import asyncpg
import pymysql
import pytest

from dbmux.engines.mysql import wire
from dbmux.metrics import ProxyMetrics
from dbmux.pool import PoolSet
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.engines.mysql.test_bad_input import err_of
from tests.engines.mysql.test_bad_input import logged_in as my_logged_in
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER
from tests.pgraw import RawClient, split_messages
from tests.slow_reader import IDLE
from tests.waiting import eventually

POOL_OF_ONE = {"max_connections_percent": 2}  # 2% of either test server's max_connections 50
WAIT = 15.0  # bound on any one driver call: a broken build fails instead of hanging


class Failure(Exception):
    """An error a client was told, in any engine's terms: its code and all its text."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code, self.text = code, text


class Running(Protocol):
    """A dbmux in front of one engine's server, as either engine's fixture starts it."""

    host: str
    port: int
    embedded: EmbeddedDbmux

    @property
    def metrics(self) -> ProxyMetrics: ...

    @property
    def pools(self) -> PoolSet: ...


class Client(ABC):
    """One driver connection: the few calls the contract needs, errors as Failure."""

    @abstractmethod
    async def query(self, sql: str) -> tuple[Any, ...] | None:
        """Run `sql`; its first row (None without rows)."""

    @abstractmethod
    def vanish(self) -> None:
        """Drop the socket without the protocol's goodbye."""

    @abstractmethod
    async def close(self) -> None: ...


class RawSession(ABC):
    """A raw socket logged in: send any bytes, read what the proxy says before it closes."""

    @abstractmethod
    async def query(self, sql: str) -> None:
        """Run `sql` (it must succeed)."""

    @abstractmethod
    async def send(self, data: bytes) -> None: ...

    @abstractmethod
    async def last_error(self) -> Failure:
        """Read until the proxy closes: its last message must be an error, whole."""

    @abstractmethod
    def close(self) -> None: ...


class PgClient(Client):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def query(self, sql: str) -> tuple[Any, ...] | None:
        try:
            row = await asyncio.wait_for(self.conn.fetchrow(sql), WAIT)
        except asyncpg.PostgresError as error:
            raise pg_failure(error) from error
        return tuple(row) if row is not None else None

    def vanish(self) -> None:
        self.conn.terminate()

    async def close(self) -> None:
        await self.conn.close()


def pg_failure(error: asyncpg.PostgresError) -> Failure:
    text = " ".join(str(part) for part in (error, error.detail, error.hint) if part)
    return Failure(error.sqlstate, text)


class MyClient(Client):
    def __init__(self, conn: aiomysql.Connection) -> None:
        self.conn = conn

    async def query(self, sql: str) -> tuple[Any, ...] | None:
        try:
            async with self.conn.cursor() as cur:
                await asyncio.wait_for(cur.execute(sql), WAIT)
                return await cur.fetchone()
        except pymysql.err.MySQLError as error:
            raise Failure(str(error.args[0]), str(error.args[1:])) from error

    def vanish(self) -> None:
        self.conn.close()  # aiomysql's close() drops the socket without COM_QUIT

    async def close(self) -> None:
        await self.conn.ensure_closed()


class PgRaw(RawSession):
    def __init__(self, raw: RawClient) -> None:
        self.raw = raw

    async def query(self, sql: str) -> None:
        await self.raw.simple_query(sql)

    async def send(self, data: bytes) -> None:
        await self.raw.send(data)

    async def last_error(self) -> Failure:
        messages, rest = split_messages(await self.raw.read_all())
        assert not rest, f"half a message before the close: {rest!r}"
        assert messages and messages[-1].kind == b"E", messages
        fields = messages[-1].fields
        assert fields["S"] == "FATAL", fields
        return Failure(fields["C"], fields["M"])

    def close(self) -> None:
        self.raw.abort()


class MyRaw(RawSession):
    def __init__(self, raw: RawMy) -> None:
        self.raw = raw

    async def query(self, sql: str) -> None:
        reply = await self.raw.query(sql)
        assert reply[0][:1] != b"\xff", wire.parse_err(reply[0])

    async def send(self, data: bytes) -> None:
        self.raw.send(data)

    async def last_error(self) -> Failure:
        error = err_of(await self.raw.read_all())
        return Failure(str(error.code), error.message)

    def close(self) -> None:
        self.raw.close()


@dataclass
class Engine:
    """One engine as the contract sees it: how to start dbmux and connect, and the engine's
    own words for what the contract checks."""

    name: str
    start: Callable[..., Running]  # start(pool={...}, **proxy_settings)
    connect: Callable[..., Awaitable[Client]]  # connect(proxy, database=the app's)
    login_raw: Callable[[Running], Awaitable[RawSession]]
    kill_server_connection: Callable[[int], None]  # by the id server_id_sql returns
    server_id_sql: str
    sleep_sql: str  # {seconds}
    begin_sql: str
    too_many_connections: str
    idle_timeout: str
    server_lost: str
    undefined_table: str
    protocol_error: str
    garbage: bytes  # no message of the engine's protocol, refused as soon as it is in
    temporary_table_pin: str  # the pin reason metrics count
    unknown_database: set[str]
    other_database: str  # one that exists and the app's user may use

    async def server_id(self, client: Client) -> int:
        row = await client.query(self.server_id_sql)
        assert row is not None
        return int(row[0])


def postgres(request: pytest.FixtureRequest) -> Engine:
    pg = request.getfixturevalue("pg")
    start_proxy = request.getfixturevalue("start_proxy")

    async def connect(proxy: Running, database: str = APP_DB) -> Client:
        try:
            conn = await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=APP_USER,
                password=APP_PASSWORD,
                database=database,
                statement_cache_size=0,
                timeout=WAIT,
            )
        except asyncpg.PostgresError as error:
            raise pg_failure(error) from error
        return PgClient(conn)

    async def login_raw(proxy: Running) -> RawSession:
        raw = await RawClient.connect(proxy.host, proxy.port)
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        return PgRaw(raw)

    return Engine(
        name="postgres",
        start=start_proxy,
        connect=connect,
        login_raw=login_raw,
        kill_server_connection=lambda pid: pg.psql(f"SELECT pg_terminate_backend({pid})"),
        server_id_sql="SELECT pg_backend_pid()",
        sleep_sql="SELECT 0 FROM pg_sleep({seconds})",
        begin_sql="BEGIN",
        too_many_connections="53300",
        idle_timeout="57P01",
        server_lost="08006",
        undefined_table="42P01",
        protocol_error="08P01",
        garbage=b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",  # a length over 1 GiB
        temporary_table_pin="temporary_object",
        unknown_database={"3D000"},
        other_database="postgres",
    )


def mysql(request: pytest.FixtureRequest) -> Engine:
    server = request.getfixturevalue("mariadb")
    start_proxy = request.getfixturevalue("start_my_proxy")

    async def connect(proxy: Running, database: str = MY_DB) -> Client:
        try:
            conn = await aiomysql.connect(
                host=proxy.host,
                port=proxy.port,
                user=MY_USER,
                password=MY_PASSWORD,
                db=database,
                autocommit=True,
                connect_timeout=WAIT,
            )
        except pymysql.err.MySQLError as error:
            raise Failure(str(error.args[0]), str(error.args[1:])) from error
        return MyClient(conn)

    async def login_raw(proxy: Running) -> RawSession:
        return MyRaw(await my_logged_in(proxy))

    return Engine(
        name="mysql",
        start=start_proxy,
        connect=connect,
        login_raw=login_raw,
        kill_server_connection=lambda thread: server.sql(f"KILL CONNECTION {thread}"),
        server_id_sql="SELECT CONNECTION_ID()",
        sleep_sql="SELECT SLEEP({seconds})",
        begin_sql="START TRANSACTION",
        too_many_connections=str(wire.ER_CON_COUNT_ERROR[0]),
        idle_timeout=str(wire.ER_CLIENT_INTERACTION_TIMEOUT[0]),
        server_lost=str(wire.CR_SERVER_LOST[0]),
        undefined_table="1146",
        protocol_error=str(wire.ER_NET_PACKETS_OUT_OF_ORDER[0]),
        # A short packet with sequence id 42 (a long one is only refused once it is all in).
        garbage=b"\x07\x00\x00\x2agarbage",
        temporary_table_pin="temporary_table",
        unknown_database={"1044", "1049"},  # no access / unknown database
        other_database="information_schema",
    )


@pytest.fixture(params=[postgres, mysql], ids=["postgres", "mysql"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each contract test runs once per engine (its server started only when needed)."""
    return request.param(request)


async def test_a_client_past_max_client_connections_is_refused_naming_the_setting(
    engine: Engine,
) -> None:
    proxy = engine.start(max_client_connections=2)
    first, second = await engine.connect(proxy), await engine.connect(proxy)
    with pytest.raises(Failure) as caught:
        await engine.connect(proxy)
    assert caught.value.code == engine.too_many_connections
    assert "max_client_connections" in caught.value.text
    assert proxy.metrics.client_connections_refused.value == 1
    await first.close()
    third = await engine.connect(proxy)  # a slot is free again
    assert await third.query("SELECT 3") == (3,)
    await second.close()
    await third.close()


async def test_a_borrow_timeout_is_an_error_naming_the_setting_and_the_client_goes_on(
    engine: Engine,
) -> None:
    proxy = engine.start(pool={**POOL_OF_ONE, "connection_borrow_timeout": 0.5})
    holder, waiter = await engine.connect(proxy), await engine.connect(proxy)
    await holder.query(engine.begin_sql)
    await holder.query("SELECT count(*) FROM items")  # holds the only server connection
    with pytest.raises(Failure) as caught:
        await waiter.query("SELECT 2")
    assert caught.value.code == engine.too_many_connections
    assert "connection_borrow_timeout" in caught.value.text
    assert proxy.metrics.borrow_timeouts.value == 1
    await holder.query("COMMIT")
    assert await waiter.query("SELECT 3") == (3,)  # the same client connection, now served
    await holder.close()
    await waiter.close()


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_a_silent_client_is_told_why_and_disconnected(
    engine: Engine, in_transaction: bool
) -> None:
    """idle_client_timeout ends a silent session, inside a transaction too, with the engine's
    error naming the setting, as the last message before the close."""
    proxy = engine.start(idle_client_timeout=IDLE)
    raw = await engine.login_raw(proxy)
    try:
        if in_transaction:
            await raw.query(engine.begin_sql)
        error = await raw.last_error()
    finally:
        raw.close()
    assert error.code == engine.idle_timeout
    assert "idle_client_timeout" in error.text
    await eventually(lambda: not proxy.embedded.proxy().runtime.clients, "the session gone")
    await eventually(lambda: proxy.pools.lent_count == 0, "its server connection back")


async def test_a_client_waiting_for_a_long_query_is_not_idle(engine: Engine) -> None:
    """A query running longer than idle_client_timeout: the client that waits for its answer
    is not silent, so it gets the answer, and the next one."""
    proxy = engine.start(idle_client_timeout=IDLE)
    client = await engine.connect(proxy)
    assert await client.query(engine.sleep_sql.format(seconds=3 * IDLE)) == (0,)
    assert await client.query("SELECT 2") == (2,)
    await client.close()


async def test_a_client_waiting_for_a_server_connection_is_not_idle(engine: Engine) -> None:
    """A client queued for the only server connection sends nothing while it waits; it is
    served, not disconnected."""
    proxy = engine.start(idle_client_timeout=IDLE, pool=POOL_OF_ONE)
    holder, waiter = await engine.connect(proxy), await engine.connect(proxy)
    slow = asyncio.create_task(holder.query(engine.sleep_sql.format(seconds=3 * IDLE)))
    await eventually(lambda: proxy.pools.lent_count == 1, "the holder's query runs")
    assert await waiter.query("SELECT 2") == (2,)
    assert await slow == (0,)
    await holder.close()
    await waiter.close()


async def test_a_pinning_statement_keeps_its_connection_and_the_next_client_sees_no_trace(
    engine: Engine,
) -> None:
    """A temporary table lives on one server connection: its client keeps that connection
    between transactions; once it leaves, the connection is reset (not replaced) before the
    next client gets it."""
    proxy = engine.start(pool=POOL_OF_ONE)
    pinned = await engine.connect(proxy)
    await pinned.query("CREATE TEMPORARY TABLE pinned_scratch (x INT)")
    server = await engine.server_id(pinned)
    for _ in range(3):
        assert await pinned.query("SELECT count(*) FROM pinned_scratch") == (0,)
        assert await engine.server_id(pinned) == server
    assert proxy.metrics.pins(engine.temporary_table_pin) == 1
    await pinned.close()
    await eventually(lambda: proxy.pools.lent_count == 0, "the pinned connection back")

    after = await engine.connect(proxy)
    with pytest.raises(Failure) as caught:
        await after.query("SELECT count(*) FROM pinned_scratch")
    assert caught.value.code == engine.undefined_table
    assert await engine.server_id(after) == server  # the same connection, reset
    assert proxy.pools.budget.open == 1
    await after.close()


async def test_a_session_says_whether_it_is_idle_active_or_pinned_and_why(
    engine: Engine,
) -> None:
    """Between transactions a client holds no server connection; inside one it does; a
    pinning statement keeps it, and the state names the reason."""
    proxy = engine.start()
    client = await engine.connect(proxy)
    (session,) = proxy.embedded.proxy().runtime.clients
    assert session.state == "idle"
    await client.query(engine.begin_sql)
    assert session.state == "active"
    await client.query("CREATE TEMPORARY TABLE state_scratch (x INT)")
    await client.query("COMMIT")
    assert session.state == f"pinned ({engine.temporary_table_pin})"
    await client.close()


async def test_a_server_connection_lost_between_transactions_costs_the_client_nothing(
    engine: Engine,
) -> None:
    proxy = engine.start()
    client = await engine.connect(proxy)
    lost = await engine.server_id(client)
    await asyncio.to_thread(engine.kill_server_connection, lost)
    await eventually(lambda: proxy.pools.budget.open == 0, "the proxy noticed the loss")
    assert await engine.server_id(client) != lost
    assert await client.query("SELECT 5") == (5,)
    await client.close()


async def test_a_server_connection_lost_in_a_transaction_fails_it_and_the_client_goes_on(
    engine: Engine,
) -> None:
    proxy = engine.start()
    client = await engine.connect(proxy)
    await client.query(engine.begin_sql)
    await client.query("INSERT INTO items (client, note) VALUES (-41, 'lost')")
    lost = await engine.server_id(client)
    await asyncio.to_thread(engine.kill_server_connection, lost)
    await eventually(lambda: proxy.pools.budget.open == 0, "the proxy noticed the loss")
    with pytest.raises(Failure) as caught:
        await client.query("SELECT 1")
    assert caught.value.code == engine.server_lost
    # The same client connection: its next transaction runs on a fresh server connection,
    # and nothing of the lost one was committed.
    assert await client.query("SELECT count(*) FROM items WHERE client = -41") == (0,)
    assert await engine.server_id(client) != lost
    assert proxy.metrics.database_connections_lost.value == 1
    await client.close()


async def test_a_client_that_leaves_mid_transaction_has_it_rolled_back(engine: Engine) -> None:
    proxy = engine.start(pool=POOL_OF_ONE)
    leaver = await engine.connect(proxy)
    await leaver.query(engine.begin_sql)
    await leaver.query("INSERT INTO items (client, note) VALUES (-40, 'never committed')")
    leaver.vanish()
    other = await engine.connect(proxy)  # served by the only server connection
    assert await other.query("SELECT count(*) FROM items WHERE client = -40") == (0,)
    assert proxy.pools.budget.open == 1
    await other.close()


async def test_garbage_after_login_is_a_protocol_error_and_others_are_served(
    engine: Engine,
) -> None:
    """The sender is told and disconnected; a client in the middle of a transaction meanwhile
    goes on untouched, and a newcomer is served."""
    proxy = engine.start()
    bystander = await engine.connect(proxy)
    await bystander.query(engine.begin_sql)
    await bystander.query("INSERT INTO items (client, note) VALUES (-42, 'bystander')")
    raw = await engine.login_raw(proxy)
    try:
        await raw.query("SELECT 1")
        await raw.send(engine.garbage)
        error = await raw.last_error()
    finally:
        raw.close()
    assert error.code == engine.protocol_error
    assert proxy.metrics.client_protocol_errors.value == 1
    assert proxy.metrics.database_connections_lost.value == 0
    assert await bystander.query("SELECT count(*) FROM items WHERE client = -42") == (1,)
    await bystander.query("ROLLBACK")
    newcomer = await engine.connect(proxy)
    assert await newcomer.query("SELECT 43") == (43,)
    await eventually(lambda: proxy.pools.lent_count == 0, "no server connection left lent")
    await bystander.close()
    await newcomer.close()


async def test_pools_of_databases_nobody_uses_are_dropped(engine: Engine) -> None:
    """Without it every database name a client ever tried keeps a pool (and a place in the
    target's budget) for the life of the proxy. A pool whose connections were reaped
    (idle_server_timeout) goes too; the one a client uses stays."""
    proxy = engine.start(pool={"idle_server_timeout": 1})
    stays = await engine.connect(proxy)
    for _ in range(40):
        with pytest.raises(Failure) as caught:
            await engine.connect(proxy, database="nope_" + secrets.token_hex(4))
        assert caught.value.code in engine.unknown_database
    other = await engine.connect(proxy, database=engine.other_database)
    assert await other.query("SELECT 1") == (1,)  # its pool opened a connection
    await other.close()
    pools = proxy.pools
    assert len(pools.pools) > 40
    await eventually(lambda: len(pools.pools) == 1, "unused pools dropped")
    assert len(pools.budget.pools) == 1
    assert next(iter(pools.pools)).database in (APP_DB, MY_DB)
    assert await stays.query("SELECT 1") == (1,)
    await stays.close()


async def test_an_idle_client_keeps_no_finished_task_and_no_instance_dict(engine: Engine) -> None:
    """What a logged-in idle client holds, the proxy holds tens of thousands of times (the
    bench's idle-20k row measures it): the tasks of its login and of the proxy's round trips
    for it are let go of once done, and its object has slots, no instance dict."""
    proxy = engine.start()
    client = await engine.connect(proxy)
    assert await client.query("SELECT 1") == (1,)
    [session] = proxy.embedded.proxy().runtime.clients
    await eventually(lambda: session._task is None, "the finished tasks let go of")
    assert not hasattr(session, "__dict__")
    await client.close()
