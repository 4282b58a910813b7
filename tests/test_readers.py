"""Read-only endpoints against a real PostgreSQL primary and two streaming replicas: reads
spread over the replicas, never a write on one, a lagging replica skipped, the writer as a
read-only fallback, and a promoted replica leaving the read-only side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

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
    await asyncio.sleep(0.5)
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


async def test_a_cancel_request_reaches_a_client_of_another_endpoint(dbmux) -> None:
    """Cancel keys belong to the proxy, not the listener: a driver's cancel connection to
    the proxy's main address stops a query that runs through its read-only endpoint."""
    ro_host, ro_port = dbmux.address(endpoint="ro")
    main_host, main_port = dbmux.address()
    async with await RawClient.connect(ro_host, ro_port) as raw:
        (key,) = [m for m in await raw.login(APP_USER, APP_PASSWORD, APP_DB) if m.kind == b"K"]
        await raw.send(msg(b"Q", b"SELECT pg_sleep(30)\0"))
        await asyncio.sleep(0.3)
        async with await RawClient.connect(main_host, main_port) as canceller:
            await canceller.send(i32(16) + i32(80877102) + key.payload)
        errors = [m.fields["C"] for m in await raw.read_until_ready() if m.kind == b"E"]
        assert errors == ["57014"]  # canceling statement due to user request
