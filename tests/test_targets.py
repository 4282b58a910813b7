"""Target groups against a real PostgreSQL primary and streaming replica: roles and health
as probes find them, and a failover that clients live through without reconnecting; then
the group built directly, its probes answered by the test: split brain, failover waits and
why a target is unavailable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from dbmux.config import Target, TargetRole
from dbmux.engines.base import ErrorKind, ProbeResult, ServerError
from dbmux.relay import ConnectionClosed
from dbmux.targets import HealthReason, Instance, TargetGroup, TargetHealth
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, WAIT, group_config, wait_until
from tests.waiting import eventually


@pytest.fixture
def dbmux(cluster, tmp_path: Path) -> Iterator[EmbeddedDbmux]:
    config = group_config("POSTGRESQL", cluster, tmp_path, APP_USER, APP_PASSWORD)
    with EmbeddedDbmux(config) as running:
        yield running


def url(dbmux: EmbeddedDbmux) -> str:
    host, port = dbmux.address()
    return f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{port}/{APP_DB}"


def test_probes_find_the_writer_and_the_replica(dbmux: EmbeddedDbmux, cluster) -> None:
    primary, replica = cluster
    targets = dbmux.proxy().targets
    wait_until(lambda: all(i.health is TargetHealth.AVAILABLE for i in targets.instances), "probed")
    roles = {i.target.port: i.role for i in targets.instances}
    assert roles == {primary.port: TargetRole.READ_WRITE, replica.port: TargetRole.READ_ONLY}
    assert targets.writer is not None and targets.writer.target.port == primary.port


async def test_clients_live_through_a_failover_without_reconnecting(dbmux, cluster) -> None:
    """Idle clients notice nothing; a client inside a transaction gets an error and goes on;
    new transactions wait for the new writer; no acknowledged commit is lost or doubled."""
    primary, replica = cluster
    targets = dbmux.proxy().targets
    await asyncio.to_thread(wait_until, lambda: targets.writer is not None, "a writer")
    idle = await asyncpg.connect(url(dbmux), statement_cache_size=0)
    in_tx = await asyncpg.connect(url(dbmux), statement_cache_size=0)
    acknowledged: list[int] = []
    try:
        await idle.execute("INSERT INTO writes VALUES (0)")
        acknowledged.append(0)
        tx = in_tx.transaction()
        await tx.start()
        await in_tx.execute("INSERT INTO writes VALUES (-1)")  # never committed

        await asyncio.to_thread(primary.stop)
        await asyncio.to_thread(replica.promote)

        with pytest.raises(asyncpg.PostgresError) as caught:
            await in_tx.execute("INSERT INTO writes VALUES (-2)")
        assert caught.value.sqlstate in ("08006", "57P01")
        await tx.rollback()
        for n in range(1, 21):  # the idle client's next transactions run on the new writer
            await idle.execute("INSERT INTO writes VALUES ($1)", n)
            acknowledged.append(n)
        assert await in_tx.fetchval("SELECT 1") == 1
        assert await idle.fetchval("SELECT pg_is_in_recovery()") is False
    finally:
        await idle.close()
        await in_tx.close()
    committed = replica.psql(
        "SELECT string_agg(n::text, ',' ORDER BY n) FROM writes", dbname=APP_DB
    )
    assert committed == ",".join(map(str, acknowledged))
    assert targets.writer is not None and targets.writer.target.port == replica.port
    old = next(i for i in targets.instances if i.target.port == primary.port)
    assert old.health is TargetHealth.UNAVAILABLE
    # The metrics saw one failover, to the replica, and the old primary's down time.
    metrics = dbmux.proxy().metrics
    assert metrics.failovers() == 1
    assert metrics.failover_duration.count == 1 and metrics.failover_duration.sum > 0
    assert old.availability() < 100


def test_server_connections_ask_the_kernel_to_watch_them(dbmux: EmbeddedDbmux) -> None:
    import socket

    async def check() -> tuple[int, int]:
        pool = dbmux.proxy().pools.get(APP_DB, APP_USER)
        conn = await pool.borrow()
        try:
            sock = conn.transport.get_extra_info("socket")
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            )
        finally:
            pool.release(conn)

    assert dbmux.call(check()) == (1, 30)


async def test_a_killed_primary_loses_no_acknowledged_commit(dbmux, cluster) -> None:
    """SIGKILL of the primary with synchronous replication: writers keep their connections,
    see errors only for statements in flight, and every commit they saw acknowledged is on
    the new writer; nothing they did not send appears."""
    primary, replica = cluster
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf()")
    targets = dbmux.proxy().targets
    await asyncio.to_thread(wait_until, lambda: targets.writer is not None, "a writer")
    acknowledged: set[int] = set()
    uncertain: set[int] = set()
    failed_over = asyncio.Event()

    async def writer(w: int) -> asyncpg.Connection:
        conn = await asyncpg.connect(url(dbmux), statement_cache_size=0)
        n, after = w * 100_000, 0
        while after < 10:
            n += 1
            try:
                await conn.execute("INSERT INTO writes VALUES ($1)", n)
                acknowledged.add(n)
                after += failed_over.is_set()
            except (asyncpg.PostgresError, asyncpg.InterfaceError):
                uncertain.add(n)
                await asyncio.sleep(0.05)
        return conn

    tasks = [asyncio.create_task(writer(w)) for w in range(1, 6)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(primary.kill)
    await asyncio.to_thread(replica.promote)
    failed_over.set()
    conns = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert not any(c.is_closed() for c in conns), "a client connection was dropped"
    for c in conns:
        await c.close()
    rows = replica.psql("SELECT n FROM writes", dbname=APP_DB).split()
    committed = {int(r) for r in rows}
    assert acknowledged <= committed, f"lost: {sorted(acknowledged - committed)[:5]}"
    assert committed <= acknowledged | uncertain | {0}


async def test_a_target_with_no_connection_left_waits_as_pending_capacity(tmp_path) -> None:
    """A full database (every non-reserved slot taken) refuses the probe's login: dbmux
    reports it as RDS Proxy does, and takes it once a slot is free."""
    with PostgresCluster(max_connections=6) as full:  # 3 of them reserved for superusers
        full.create_user(APP_USER, APP_PASSWORD)
        hogs = [
            await asyncpg.connect(full.dsn(APP_USER, APP_PASSWORD, "postgres")) for _ in range(3)
        ]
        config = group_config("POSTGRESQL", [full], tmp_path, APP_USER, APP_PASSWORD)
        with EmbeddedDbmux(config) as dbmux:
            (instance,) = dbmux.proxy().targets.instances
            await asyncio.to_thread(wait_until, lambda: instance.reason is not None, "a probe")
            assert (instance.health, instance.reason) == (
                TargetHealth.UNAVAILABLE,
                HealthReason.PENDING_PROXY_CAPACITY,
            )
            await hogs.pop().close()
            await asyncio.to_thread(wait_until, lambda: instance.is_writer, "the writer")
        for hog in hogs:
            await hog.close()


@pytest.fixture
def replaying_dbmux(cluster, tmp_path: Path) -> Iterator[EmbeddedDbmux]:
    config = group_config(
        "POSTGRESQL", cluster, tmp_path, APP_USER, APP_PASSWORD, transaction_replay=True
    )
    with EmbeddedDbmux(config) as running:
        targets = running.proxy().targets
        wait_until(lambda: targets.writer is not None, "a writer")
        yield running


@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_read_in_flight_outside_a_transaction_runs_on_the_new_writer(
    replaying_dbmux, cluster, in_transaction
) -> None:
    """transaction_replay: a read the dead server had answered nothing of runs again on the
    new writer; inside a transaction block it is reported lost, as without replay."""
    primary, replica = cluster
    host, port = replaying_dbmux.address()
    dsn = f"host={host} port={port} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        if in_transaction:
            conn.execute("BEGIN")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = pool.submit(
                conn.execute, "SELECT pg_sleep(2), inet_server_port(), count(*) FROM writes"
            )
            running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%'"
            wait_until(lambda: primary.psql(running) == "1", "the read running")
            primary.kill()
            replica.promote()
            if in_transaction:
                with pytest.raises(psycopg.OperationalError, match="lost"):
                    read.result(timeout=WAIT)
                return
            assert read.result(timeout=WAIT).fetchone() == ("", replica.port, 0)
    assert replaying_dbmux.proxy().metrics.transaction_replays.value == 1


async def test_a_read_in_flight_on_named_statements_runs_on_the_new_writer(
    replaying_dbmux, cluster
) -> None:
    """asyncpg's prepared statements: the statement is prepared again on the new writer and
    the read in flight runs there."""
    primary, replica = cluster
    conn = await asyncpg.connect(url(replaying_dbmux))
    try:
        assert await conn.fetchval("SELECT count(*) FROM writes") == 0  # names in use
        query = "SELECT pg_sleep(2), inet_server_port(), count(*) FROM writes"
        read = asyncio.create_task(conn.fetchrow(query))
        running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%'"
        await asyncio.to_thread(wait_until, lambda: primary.psql(running) == "1", "running")
        await asyncio.to_thread(primary.kill)
        await asyncio.to_thread(replica.promote)
        row = await asyncio.wait_for(read, WAIT)
        assert (row[1], row[2]) == (replica.port, 0)
    finally:
        await conn.close()
    assert replaying_dbmux.proxy().metrics.transaction_replays.value == 1


async def test_a_server_closing_idle_connections_is_probed_at_once(cluster, tmp_path) -> None:
    """Probes are an hour apart here, so only the fast paths can find the failover: idle
    pooled connections that the stopping primary closes make dbmux probe at once, and
    while there is no writer the replica is probed often until it is promoted."""
    primary, replica = cluster
    config = group_config("POSTGRESQL", cluster, tmp_path, APP_USER, APP_PASSWORD)
    config["proxies"][0]["target_group"]["probe_interval"] = 3600
    with EmbeddedDbmux(config) as dbmux:
        targets = dbmux.proxy().targets
        await asyncio.to_thread(wait_until, lambda: targets.writer is not None, "a writer")
        conn = await asyncpg.connect(url(dbmux))
        await conn.fetchval("SELECT 1")  # leaves an idle server connection in the pool
        assert dbmux.proxy().pools.idle_count >= 1
        await asyncio.to_thread(primary.stop)
        await asyncio.to_thread(wait_until, lambda: targets.writer is None, "the loss noticed")
        await asyncio.to_thread(replica.promote)
        await asyncio.to_thread(wait_until, lambda: targets.writer is not None, "a new writer")
        assert targets.writer.target.port == replica.port
        assert await conn.fetchval("SELECT inet_server_port()") == replica.port
        await conn.close()


# ---------------------------------------------------------------------------------------------
# The target group built directly: probes that answer what the test says, no database.


class Answers:
    """What each instance (by port) answers to a probe; the test changes it as it goes."""

    def __init__(self, **by_port: ProbeResult | Exception) -> None:
        self.by_port = {int(port.removeprefix("p")): a for port, a in by_port.items()}
        self.calls = dict.fromkeys(self.by_port, 0)  # probes begun, per port

    def __setitem__(self, port: int, answer: ProbeResult | Exception) -> None:
        self.by_port[port] = answer

    async def __call__(self, target: Target) -> ProbeResult:
        self.calls[target.port] += 1
        answer = self.by_port[target.port]
        if isinstance(answer, Exception):
            raise answer
        return answer


WRITER, REPLICA = ProbeResult(writable=True), ProbeResult(writable=False)
PRIMARY, SECONDARY = 1001, 1002


def classify(error: ServerError) -> ErrorKind:
    """A test engine's reading of its error codes (they are its own)."""
    return {"auth": ErrorKind.AUTH, "busy": ErrorKind.BUSY, "gone": ErrorKind.GONE}.get(
        error.code, ErrorKind.OTHER
    )


@dataclass
class Group:
    """A started TargetGroup, the answers its probes get and the writer changes it made."""

    targets: TargetGroup
    answers: Answers
    changes: list[tuple[int | None, int | None]]
    failovers: list[tuple[int, float]]  # (the new writer's port, seconds without a writer)

    def instance(self, port: int) -> Instance:
        return next(i for i in self.targets.instances if i.target.port == port)

    async def probed(self) -> None:
        """Wait until every instance was probed again, with the answers as they are now
        (a second probe begun means the first one begun after this call has ended)."""
        calls = self.answers.calls
        wanted = {port: n + 2 for port, n in calls.items()}
        self.targets.suspect()
        await eventually(lambda: all(calls[p] >= n for p, n in wanted.items()), "probed again")


@contextlib.asynccontextmanager
async def group(answers: Answers) -> AsyncIterator[Group]:
    changes: list[tuple[int | None, int | None]] = []
    failovers: list[tuple[int, float]] = []

    def changed(old: Instance | None, new: Instance | None) -> None:
        changes.append((old and old.target.port, new and new.target.port))

    def failover(writer: Instance, seconds: float) -> None:
        failovers.append((writer.target.port, seconds))

    targets = TargetGroup(
        [Target(host="127.0.0.1", port=port) for port in answers.by_port],
        answers,
        classify,
        interval=0.02,
        on_writer_change=changed,
        on_failover=failover,
    )
    targets.start()
    try:
        running = Group(targets, answers, changes, failovers)
        await running.probed()
        yield running
    finally:
        targets.stop()


async def test_the_writer_is_the_instance_that_accepts_writes() -> None:
    async with group(Answers(p1001=WRITER, p1002=REPLICA)) as g:
        assert g.targets.writer is g.instance(PRIMARY)
        assert g.instance(SECONDARY).is_replica
        assert g.changes == [(None, PRIMARY)]


async def test_a_second_writable_instance_is_invalid_replication_state() -> None:
    """A split brain: the writer stays, the other writable instance is not followed (its
    writes would be lost) and is reported INVALID_REPLICATION_STATE until the writer goes."""
    async with group(Answers(p1001=WRITER, p1002=REPLICA)) as g:
        generation = g.targets.generation
        g.answers[SECONDARY] = WRITER
        await g.targets.wait_for_writer(1)
        for _ in range(3):
            await g.probed()
            other = g.instance(SECONDARY)
            assert (other.health, other.reason) == (
                TargetHealth.UNAVAILABLE,
                HealthReason.INVALID_REPLICATION_STATE,
            )
            assert g.targets.writer is g.instance(PRIMARY)
            assert g.targets.generation == generation
        g.answers[PRIMARY] = OSError("connection refused")
        await eventually(lambda: g.targets.writer is other, "the other writable one followed")
        assert g.instance(PRIMARY).reason is HealthReason.UNREACHABLE
        assert g.changes[-1] == (None, SECONDARY)


async def test_two_writable_instances_from_the_start_make_one_writer() -> None:
    async with group(Answers(p1001=WRITER, p1002=WRITER)) as g:
        writers = [i for i in g.targets.instances if i.is_writer]
        invalid = [
            i for i in g.targets.instances if i.reason is HealthReason.INVALID_REPLICATION_STATE
        ]
        assert writers == [g.targets.writer] and len(invalid) == 1
        assert len(g.changes) == 1


async def test_clients_wait_for_the_next_writer_during_a_failover() -> None:
    async with group(Answers(p1001=WRITER, p1002=REPLICA)) as g:
        generation = g.targets.generation
        g.answers[PRIMARY] = ServerError("the database system is shutting down", code="gone")
        await eventually(lambda: g.targets.writer is None, "the writer lost")
        assert g.targets.failing_over
        waiting = asyncio.create_task(g.targets.wait_for_writer(WAIT))
        changed = asyncio.create_task(g.targets.wait_for_change(generation, WAIT))
        await g.probed()
        assert not waiting.done()
        g.answers[SECONDARY] = WRITER  # promoted
        assert await asyncio.wait_for(waiting, WAIT) is g.instance(SECONDARY)
        assert await asyncio.wait_for(changed, WAIT)
        assert g.changes == [(None, PRIMARY), (PRIMARY, None), (None, SECONDARY)]
        assert g.instance(PRIMARY).reason is HealthReason.CONNECTION_FAILED
        # One failover (the first writer found is none), lasting from loss to promotion.
        ((port, seconds),) = g.failovers
        assert port == SECONDARY and seconds > 0


async def test_availability_is_the_share_of_time_an_instance_was_available() -> None:
    async with group(Answers(p1001=WRITER, p1002=OSError("connection refused"))) as g:
        assert g.instance(SECONDARY).availability() == 0
        up = g.instance(PRIMARY)
        assert 0 < up.availability() <= 100
        g.answers[PRIMARY] = OSError("connection refused")
        await eventually(lambda: g.targets.writer is None, "the writer lost")
        before = up.availability()
        await asyncio.sleep(0.05)
        assert up.availability() < before  # down time keeps growing, up time does not


async def test_with_no_writer_a_wait_ends_in_error_08001_naming_every_target() -> None:
    async with group(Answers(p1001=REPLICA, p1002=OSError("no route to host"))) as g:
        with pytest.raises(ServerError) as caught:
            await g.targets.wait_for_writer(0.05)
        assert caught.value.code == "08001"
        assert "127.0.0.1:1001 AVAILABLE" in str(caught.value)
        assert "127.0.0.1:1002 UNAVAILABLE no route to host" in str(caught.value)


async def test_while_every_target_refuses_the_login_nobody_waits_for_a_writer() -> None:
    """A wrong password or a TLS setting the servers do not meet is not a failover to wait
    out: the wait ends at once, with each target's reason."""
    refused = ServerError("certificate verify failed: IP address mismatch", code="auth")
    async with group(Answers(p1001=refused, p1002=refused)) as g:
        with pytest.raises(ServerError, match="IP address mismatch") as caught:
            await asyncio.wait_for(g.targets.wait_for_writer(WAIT), WAIT / 10)
        assert caught.value.code == "08001"
        g.answers[PRIMARY] = WRITER  # the setting fixed: the writer is found again
        await g.probed()
        assert (await g.targets.wait_for_writer(WAIT)).target.port == PRIMARY


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ServerError("password authentication failed", code="auth"), HealthReason.AUTH_FAILURE),
        (ServerError("too many connections", code="busy"), HealthReason.PENDING_PROXY_CAPACITY),
        (ServerError("anything else", code="XX000"), HealthReason.CONNECTION_FAILED),
        (ConnectionClosed("closed"), HealthReason.CONNECTION_FAILED),
        (OSError("connection refused"), HealthReason.UNREACHABLE),
    ],
)
async def test_a_probe_that_fails_says_why_the_target_is_unavailable(error, reason) -> None:
    async with group(Answers(p1001=WRITER, p1002=error)) as g:
        failed = g.instance(SECONDARY)
        assert (failed.health, failed.reason) == (TargetHealth.UNAVAILABLE, reason)
        assert failed.description == str(error)


async def test_a_writer_that_is_full_stays_the_writer() -> None:
    """A login refused for lack of connection slots proves the instance alive: its role did
    not change (the pool itself may hold every slot)."""
    async with group(Answers(p1001=WRITER, p1002=REPLICA)) as g:
        g.answers[PRIMARY] = ServerError("too many connections", code="busy")
        await g.probed()
        await g.probed()
        assert g.targets.writer is g.instance(PRIMARY)
        assert g.instance(PRIMARY).health is TargetHealth.AVAILABLE
        assert g.changes == [(None, PRIMARY)]
