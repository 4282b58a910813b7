"""Read-only endpoints against a real PostgreSQL primary and two streaming replicas: reads
spread over the replicas, never a write on one, a lagging replica skipped, the writer as a
read-only fallback, and a promoted replica leaving the read-only side; then the same choices
of the replica route built directly, over pools of fake server connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dbmux.config import Endpoint, Target, TargetRole
from dbmux.engines.base import ServerConnection, ServerError
from dbmux.pool import PoolSet
from dbmux.replicas import ReplicaRoute
from dbmux.targets import Instance, TargetHealth
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    WAIT,
    group_config,
    wait_until,
    writer_port,
)
from tests.pgraw import RawClient, i32, msg
from tests.test_pool import pools_of
from tests.waiting import eventually

LAG_LIMIT = 1.0  # seconds, for the endpoints that limit replication lag


def proxy_config(tmp_path: Path, clusters: list[PostgresCluster]) -> dict[str, Any]:
    read_only = {"listen": "127.0.0.1:0", "target_role": "READ_ONLY"}
    endpoints = [
        {"name": "ro", **read_only},
        {"name": "fresh", **read_only, "max_replica_lag": LAG_LIMIT},
        {
            "name": "fresh-or-writer",
            **read_only,
            "max_replica_lag": LAG_LIMIT,
            "fallback_to_writer": True,
        },
    ]
    return group_config(
        "POSTGRESQL", clusters, tmp_path, APP_USER, APP_PASSWORD, endpoints=endpoints
    )


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Iterator[list[PostgresCluster]]:
    """A primary and two streaming replicas of it."""
    with PostgresCluster() as primary:
        primary.create_user(APP_USER, APP_PASSWORD)
        primary.create_database(APP_DB, owner=APP_USER)
        primary.psql(
            f"CREATE TABLE facts (n int); ALTER TABLE facts OWNER TO {APP_USER}", dbname=APP_DB
        )
        with primary.replica() as first, primary.replica() as second:
            yield [primary, first, second]


@pytest.fixture(scope="module")
def dbmux(clusters, tmp_path_factory) -> Iterator[EmbeddedDbmux]:
    with EmbeddedDbmux(proxy_config(tmp_path_factory.mktemp("readers"), clusters)) as running:
        targets = running.proxy().targets
        wait_until(lambda: all(i.role for i in targets.instances), "every target probed")
        yield running


@pytest.fixture
def lagging(dbmux, clusters) -> Iterator[Callable[..., None]]:
    """lagging(*replicas): pause their replay, write on the primary, and wait until dbmux
    has seen each of them lag past LAG_LIMIT; replay resumes after the test."""
    primary = clusters[0]
    paused: list[PostgresCluster] = []

    def lag(*replicas: PostgresCluster) -> None:
        for replica in replicas:
            replica.psql("SELECT pg_wal_replay_pause()")
            paused.append(replica)
        primary.psql("INSERT INTO facts VALUES (2); DELETE FROM facts", dbname=APP_DB)
        for replica in replicas:
            wait_until(lag_seen(dbmux, replica), f"{replica.port} lagging")

    yield lag
    for replica in paused:
        replica.psql("SELECT pg_wal_replay_resume()")


def url(dbmux: EmbeddedDbmux, endpoint: str | None = None) -> str:
    host, port = dbmux.address(endpoint=endpoint)
    return f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{port}/{APP_DB}"


async def ports_serving(dbmux: EmbeddedDbmux, endpoint: str, clients: int = 6) -> set[int]:
    """The server ports that concurrent transactions on `endpoint` ran on."""

    async def one() -> int:
        conn = await asyncpg.connect(url(dbmux, endpoint))
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(0.2)")
                return await conn.fetchval("SELECT inet_server_port()")
        finally:
            await conn.close()

    return set(await asyncio.gather(*(one() for _ in range(clients))))


def lag_seen(dbmux: EmbeddedDbmux, replica: PostgresCluster) -> Callable[[], bool]:
    """True once a probe that began after this call found the replica lagging."""
    instance = next(i for i in dbmux.proxy().targets.instances if i.target.port == replica.port)
    since = time.monotonic()
    return lambda: instance.probed_at > since and (instance.lag is None or instance.lag > LAG_LIMIT)


async def test_reads_spread_over_the_replicas_and_never_reach_the_writer(dbmux, clusters) -> None:
    _, first, second = clusters
    assert await ports_serving(dbmux, "ro") == {first.port, second.port}


async def test_a_write_on_a_read_only_endpoint_is_refused_and_the_client_goes_on(
    dbmux, clusters
) -> None:
    conn = await asyncpg.connect(url(dbmux, "ro"))
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute("INSERT INTO facts VALUES (1)")
    assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
    await conn.close()
    assert clusters[0].psql("SELECT count(*) FROM facts", dbname=APP_DB) == "0"


async def test_a_lagging_replica_is_skipped_until_it_catches_up(dbmux, clusters, lagging) -> None:
    _, first, second = clusters
    await asyncio.to_thread(lagging, first)
    assert await ports_serving(dbmux, "fresh") == {second.port}
    assert await ports_serving(dbmux, "ro") == {first.port, second.port}  # no limit there


async def test_with_every_replica_lagging_the_writer_serves_reads_read_only(
    dbmux, clusters, lagging
) -> None:
    primary, first, second = clusters
    await asyncio.to_thread(lagging, first, second)
    assert await ports_serving(dbmux, "fresh-or-writer") == {primary.port}
    conn = await asyncpg.connect(url(dbmux, "fresh-or-writer"))
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute("INSERT INTO facts VALUES (4)")
    await conn.close()


async def test_a_read_waits_for_a_replica_when_none_fits(dbmux, clusters, lagging) -> None:
    """No fallback: the read is held, then runs on the first replica to catch up."""
    _, first, second = clusters
    await asyncio.to_thread(lagging, first, second)
    conn = await asyncpg.connect(url(dbmux, "fresh"))
    read = asyncio.create_task(conn.fetchval("SELECT inet_server_port()"))
    route = dbmux.proxy().routes["fresh"]
    await eventually(lambda: bool(route.parked), "the read waits for a replica")
    assert not read.done(), "a read ran although no replica fits the endpoint"
    second.psql("SELECT pg_wal_replay_resume()")
    assert await asyncio.wait_for(read, WAIT) == second.port
    await conn.close()


def test_a_promoted_replica_leaves_the_read_only_side(tmp_path: Path) -> None:
    with PostgresCluster() as primary:
        primary.create_user(APP_USER, APP_PASSWORD)
        primary.create_database(APP_DB, owner=APP_USER)
        with primary.replica() as first, primary.replica() as second:
            with EmbeddedDbmux(proxy_config(tmp_path, [primary, first, second])) as dbmux:
                targets = dbmux.proxy().targets
                wait_until(lambda: all(i.role for i in targets.instances), "targets probed")
                assert asyncio.run(ports_serving(dbmux, "ro")) == {first.port, second.port}
                primary.stop()
                first.promote()
                wait_until(lambda: writer_port(dbmux) == first.port, "the replica as writer")
                assert asyncio.run(ports_serving(dbmux, "ro")) == {second.port}


async def test_a_cancel_request_reaches_a_client_of_another_endpoint(dbmux, clusters) -> None:
    """Cancel keys belong to the proxy, not the listener: a driver's cancel connection to
    the proxy's main address stops a query that runs through its read-only endpoint."""
    ro_host, ro_port = dbmux.address(endpoint="ro")
    main_host, main_port = dbmux.address()
    async with await RawClient.connect(ro_host, ro_port) as raw:
        (key,) = [m for m in await raw.login(APP_USER, APP_PASSWORD, APP_DB) if m.kind == b"K"]
        await raw.send(msg(b"Q", b"SELECT pg_sleep(30)\0"))
        sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
        await asyncio.to_thread(
            wait_until, lambda: any(c.psql(sleeping) == "1" for c in clusters), "the query runs"
        )
        async with await RawClient.connect(main_host, main_port) as canceller:
            await canceller.send(i32(16) + i32(80877102) + key.payload)
        errors = [m.fields["C"] for m in await raw.read_until_ready() if m.kind == b"E"]
        assert errors == ["57014"]  # canceling statement due to user request


# ---------------------------------------------------------------------------------------------
# The replica route built directly: instances set by the test, pools of FakeServers.


def replica(port: int, lag: float | None = 0.0) -> Instance:
    """An instance a probe found to be a replica, `lag` seconds behind."""
    instance = Instance(Target(host="127.0.0.1", port=port))
    instance.health, instance.role, instance.lag = TargetHealth.AVAILABLE, TargetRole.READ_ONLY, lag
    return instance


def route_over(
    instances: list[Instance], *, fallback: bool = False, timeout: float = WAIT
) -> ReplicaRoute:
    """A read-only endpoint limited to LAG_LIMIT over `instances`, each probed once."""
    endpoint = Endpoint(
        name="ro",
        listen="127.0.0.1:0",
        target_role=TargetRole.READ_ONLY,
        max_replica_lag=LAG_LIMIT,
        fallback_to_writer=fallback,
    )

    def pools(instance: Instance | None = None) -> PoolSet:
        return pools_of(max_connections_percent=100).pools  # ten connections each

    route = ReplicaRoute(endpoint, instances, pools, pools() if fallback else None, timeout)
    for instance in instances:
        route.instance_probed(instance)
    return route


def served_by(route: ReplicaRoute, conn: ServerConnection) -> str:
    """Which replica (or the writer) a connection is to."""
    for name, pools in route.sets.items():
        if conn.pool in pools.pools.values():
            return name
    assert route.fallback is not None and conn.pool in route.fallback.pools.values()
    return "writer"


async def test_a_borrow_goes_to_the_least_busy_replica_that_is_not_lagging() -> None:
    first, second = replica(1), replica(2)
    route = route_over([first, second])
    pool = route.get(APP_DB, APP_USER)
    held = [await pool.borrow() for _ in range(4)]
    assert sorted(served_by(route, c) for c in held) == sorted([first.name, second.name] * 2)
    for conn in held:
        if served_by(route, conn) == first.name:
            pool.release(conn)  # the first replica is idle now, the second has two lent
    more = [await pool.borrow(), await pool.borrow()]
    assert {served_by(route, c) for c in more} == {first.name}
    first.lag = LAG_LIMIT + 1
    route.instance_probed(first)
    assert {served_by(route, await pool.borrow()) for _ in range(3)} == {second.name}


async def test_a_borrow_with_no_usable_replica_waits_for_one() -> None:
    first = replica(1, lag=None)  # replication stopped: lag unknown
    route = route_over([first])
    borrowing = asyncio.create_task(route.get(APP_DB, APP_USER).borrow())
    await eventually(lambda: bool(route.parked), "the borrower waits for a replica")
    assert not borrowing.done()
    first.lag = 0.0
    route.instance_probed(first)
    conn = await asyncio.wait_for(borrowing, WAIT)
    assert served_by(route, conn) == first.name and not route.parked


async def test_a_borrow_with_no_usable_replica_fails_at_the_timeout_naming_the_replicas() -> None:
    route = route_over([replica(1, lag=LAG_LIMIT + 1)], timeout=0.05)
    with pytest.raises(ServerError) as caught:
        await asyncio.wait_for(route.get(APP_DB, APP_USER).borrow(), WAIT)
    assert caught.value.code == "08001"
    assert f"max_replica_lag {LAG_LIMIT}" in str(caught.value)
    assert "127.0.0.1:1 READ_ONLY AVAILABLE lag 2 s" in str(caught.value)


async def test_with_no_usable_replica_the_writer_serves_when_the_endpoint_falls_back() -> None:
    first = replica(1, lag=LAG_LIMIT + 1)
    route = route_over([first], fallback=True)
    pool = route.get(APP_DB, APP_USER)
    assert served_by(route, await pool.borrow()) == "writer"
    first.lag = 0.0
    route.instance_probed(first)
    assert served_by(route, await pool.borrow()) == first.name


async def test_a_promoted_replica_loses_its_connections_and_its_reads() -> None:
    first, second = replica(1), replica(2)
    route = route_over([first, second])
    pool = route.get(APP_DB, APP_USER)
    conns = [await pool.borrow() for _ in range(4)]
    for conn in conns:
        pool.release(conn)
    on_first = [c for c in conns if served_by(route, c) == first.name]
    assert on_first and all(not c.closed for c in on_first)
    first.role = TargetRole.READ_WRITE
    route.instance_probed(first)
    assert all(c.closed for c in on_first)
    assert route.sets[first.name].budget.open == 0
    assert {served_by(route, await pool.borrow()) for _ in range(3)} == {second.name}
