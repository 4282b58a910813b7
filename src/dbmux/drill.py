"""The failover drill: long-lived writers insert numbered rows while the primary dies and a
replica is promoted; afterwards every number is looked up on the new writer.

What users judge a proxy's failover by is what the drill measures: the longest time without a
successful write, next to how long the promotion itself took; the client operations that
failed; the client connections that were dropped; and commits that were acknowledged but lost,
written twice, or written without being sent. ``dbmux demo`` (its failover phase) and the
benchmark (``python -m bench --only failover``) both run it, so they count the same way.

Each writer owns a range of numbers and one connection, and inserts the next number as soon as
the previous insert returned (an autocommit INSERT, so its return is the COMMIT's
acknowledgement). A number whose insert returned OK is *acknowledged* and must be on the new
writer exactly once; one whose insert raised is *uncertain* (it may or may not have
committed) and may be there at most once. The table has no unique key on n, so a commit that
was run twice (a proxy retrying what it should not) shows as a duplicate instead of an error.

Through dbmux a writer keeps its connection and retries after an error; a direct writer must
find the new writer itself: it knows both addresses (the best case for direct access) and,
when its connection is lost or the server says it is read-only, reconnects to whichever one
takes writes (PostgreSQL: libpq-style multi-host with target_session_attrs=read-write;
MariaDB: each host in turn, checking @@read_only).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbmux.storm import classify

if TYPE_CHECKING:
    from dbmux.embedded import EmbeddedDbmux

APP_USER = "drill"
APP_DB = "drill"
RANGE = 10_000_000  # numbers each writer owns: writer w inserts w * RANGE + 1, + 2, ...
OP_TIMEOUT = 20.0  # seconds one insert or connect may take before it counts as hung
CONNECT_TIMEOUT = 15.0
RETRY_DELAY = 0.05  # seconds a writer waits after a failed insert before the next one
PAUSE = 0.02  # seconds a writer waits after an acknowledged insert: 50 writers, <= 2,500 writes/s
RECONNECT_DELAY = 0.1  # seconds a direct writer waits between attempts to find the writer
PROBE_INTERVAL = 0.01  # seconds between the drill's own writes to the promoted replica
STOP_TIMEOUT = 30.0  # seconds writers get to finish their last insert once told to stop
RESUME_TIMEOUT = 60.0  # seconds after the failure the drill waits for writes to resume

# Targets the drill reports against (README: the failover drill).
GAP_OVER_PROMOTION = 1.0  # seconds the write gap through dbmux may exceed the promotion

READ_ONLY = frozenset({"25006", "1290", "1836"})  # "read-only transaction" / --read-only


# ----------------------------------------------------------------------------- results


@dataclass
class DrillResult:
    """One side of the drill (direct or through dbmux) on one fresh primary and replica.

    Times are time.monotonic(); `started` is when the writers began.
    """

    name: str  # "direct" or "dbmux"
    database: str  # "PostgreSQL" or "MariaDB"
    writers: int
    idle_clients: int
    failover: str = ""  # how the primary was failed, for the report
    started: float = 0.0
    failed_at: float | None = None  # the primary stopped taking writes (SIGKILL, read_only)
    promoted_at: float | None = None  # the replica took a write on a direct connection
    writer_seen_at: float | None = None  # dbmux chose the new writer (when observable)
    resumed_at: float | None = None  # the first acknowledged write after the outage
    ended: float = 0.0  # writers told to stop
    ack_times: list[float] = field(default_factory=list)  # every acknowledged insert
    acknowledged: set[int] = field(default_factory=set)
    uncertain: set[int] = field(default_factory=set)
    failure_times: list[float] = field(default_factory=list)  # failed inserts and connects
    failed_writes: int = 0
    failed_connects: int = 0  # a direct writer looking for the new writer, say
    failures: Counter[str] = field(default_factory=Counter)  # cause -> failed operations
    examples: dict[str, str] = field(default_factory=dict)  # cause -> first message
    dropped_writers: set[int] = field(default_factory=set)  # lost or had to reconnect
    reconnects: int = 0
    idle_dropped: int = 0  # idle clients whose connection did not live through it
    hung_writers: int = 0  # writers still inside an operation STOP_TIMEOUT after the end
    events: list[tuple[float, str]] = field(default_factory=list)  # for the timeline
    rows_checked: bool = False
    rows: int = 0  # rows on the new writer
    lost: list[int] = field(default_factory=list)  # acknowledged, not on the new writer
    duplicated: list[int] = field(default_factory=list)  # on the new writer more than once
    unexpected: list[int] = field(default_factory=list)  # on the new writer, never sent
    problem: str = ""  # why the drill did not complete

    @property
    def failed_ops(self) -> int:
        return self.failed_writes + self.failed_connects

    @property
    def promotion(self) -> float | None:
        """Seconds from the primary's failure until the replica took a direct write."""
        if self.failed_at is None or self.promoted_at is None:
            return None
        return self.promoted_at - self.failed_at

    def longest_gap(self) -> tuple[float, float, float] | None:
        """(seconds, from, to): the longest time between two acknowledged writes of any
        writers, over the whole drill (None with fewer than two)."""
        times = sorted(self.ack_times)
        if len(times) < 2:
            return None
        gap, at = max((b - a, i) for i, (a, b) in enumerate(itertools.pairwise(times)))
        return gap, times[at], times[at + 1]

    @property
    def gap(self) -> float | None:
        found = self.longest_gap()
        return None if found is None else found[0]

    def event(self, what: str, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        self.events.append((at, what))
        return at

    def note_ack(self, n: int, at: float, sent: float | None = None) -> None:
        """Insert n, sent at `sent`, acknowledged at `at`. The first write sent after the
        failure and acknowledged is where writes resumed: it cannot have been the old
        primary's (an ack read just after the failure can be)."""
        self.ack_times.append(at)
        self.acknowledged.add(n)
        sent = at if sent is None else sent
        if self.resumed_at is None and self.failed_at is not None and sent > self.failed_at:
            self.resumed_at = at
            self.event("writes resumed", at)

    def note_failure(self, error: BaseException, *, connect: bool = False) -> None:
        self.failure_times.append(time.monotonic())
        if connect:
            self.failed_connects += 1
        else:
            self.failed_writes += 1
        cause = classify(error)
        self.failures[cause] += 1
        self.examples.setdefault(cause, f"{type(error).__name__}: {error}".strip())

    def verdicts(self) -> list[tuple[str, bool]]:
        """(what, met) for each target that applies to this side."""
        out: list[tuple[str, bool]] = []
        if self.name == "dbmux":
            gap, promotion = self.gap, self.promotion
            met = (
                gap is not None and promotion is not None and gap <= promotion + GAP_OVER_PROMOTION
            )
            out.append((f"write gap <= promotion + {GAP_OVER_PROMOTION:g} s", met))
            out.append(("no idle client connection dropped", self.idle_dropped == 0))
        out.append(
            ("no lost or duplicated commit", self.rows_checked and not self.lost + self.duplicated)
        )
        return out

    def to_json(self) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.started, 4)

        found = self.longest_gap()
        return {
            "side": self.name,
            "database": self.database,
            "writers": self.writers,
            "idle_clients": self.idle_clients,
            "failover": self.failover,
            "failed_at": rel(self.failed_at),
            "promoted_at": rel(self.promoted_at),
            "writer_seen_at": rel(self.writer_seen_at),
            "resumed_at": rel(self.resumed_at),
            "ended": rel(self.ended),
            "promotion_seconds": None if self.promotion is None else round(self.promotion, 4),
            "longest_gap_seconds": None if found is None else round(found[0], 4),
            "longest_gap_from": None if found is None else rel(found[1]),
            "acknowledged": len(self.acknowledged),
            "uncertain": len(self.uncertain),
            "failed_writes": self.failed_writes,
            "failed_connects": self.failed_connects,
            "failures": dict(self.failures),
            "examples": self.examples,
            "dropped_writers": len(self.dropped_writers),
            "reconnects": self.reconnects,
            "idle_dropped": self.idle_dropped,
            "hung_writers": self.hung_writers,
            "rows": self.rows,
            "lost": self.lost[:100],
            "duplicated": self.duplicated[:100],
            "unexpected": self.unexpected[:100],
            "events": [(rel(t), what) for t, what in self.events],
            "problem": self.problem,
            "verdicts": dict(self.verdicts()),
        }


# ----------------------------------------------------------------------------- clients


class Client:
    """One client connection as the drill drives it, whatever the driver."""

    async def insert(self, n: int, writer: int) -> float:
        """INSERT the number (autocommit); time.monotonic() when the server acknowledged it."""
        raise NotImplementedError

    async def probe(self) -> None:
        """A write to the probe table (the drill's own check that this server takes writes)."""
        raise NotImplementedError

    async def ping(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _PgClient(Client):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def insert(self, n: int, writer: int) -> float:
        await self.conn.execute("INSERT INTO drill_writes (n, writer) VALUES ($1, $2)", n, writer)
        return time.monotonic()

    async def probe(self) -> None:
        await self.conn.execute("INSERT INTO drill_probe DEFAULT VALUES")

    async def ping(self) -> None:
        await self.conn.fetchval("SELECT 1")

    @property
    def closed(self) -> bool:
        return bool(self.conn.is_closed())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.conn.close(), 5)
        except Exception:
            self.conn.terminate()


class _MyClient(Client):
    """PyMySQL (blocking, autocommit) on a thread of the drill's executor."""

    def __init__(self, conn: Any, executor: ThreadPoolExecutor) -> None:
        self.conn = conn
        self.executor = executor

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> float:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, args)
        return time.monotonic()

    async def insert(self, n: int, writer: int) -> float:
        sql = "INSERT INTO drill_writes (n, writer) VALUES (%s, %s)"
        return float(await self._call(lambda: self._execute(sql, (n, writer))))

    async def probe(self) -> None:
        await self._call(lambda: self._execute("INSERT INTO drill_probe () VALUES ()"))

    async def ping(self) -> None:
        await self._call(lambda: self._execute("SELECT 1"))

    @property
    def closed(self) -> bool:
        return not self.conn.open

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._call(self.conn.close)


# Opens a client connection: to dbmux, to one server, or to whichever server takes writes.
Connect = Callable[[], Awaitable[Client]]


# ----------------------------------------------------------------------------- databases


class DrillDatabase:
    """A primary and its streaming replica with the drill's user and tables, the ways to
    connect to them, and the failover itself. Methods that block run on a thread."""

    name: str  # as the report names it
    family: str  # dbmux's engine_family
    failover: str  # what fail_primary() does, for the report
    password: str
    primary: tuple[str, int]
    replica: tuple[str, int]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [self.primary, self.replica]

    async def connect(self, host: str, port: int) -> Client:
        """The app user's connection to one address (a server or dbmux)."""
        raise NotImplementedError

    async def connect_writer(self) -> Client:
        """Direct access done well: a connection to whichever server takes writes now."""
        raise NotImplementedError

    def fail_primary(self, at: Callable[[], None]) -> None:
        """Make the primary stop taking writes, calling `at` at the moment it does."""
        raise NotImplementedError

    def promote_replica(self) -> None:
        raise NotImplementedError

    def row_counts(self) -> Counter[int]:
        """n -> rows with that n, read on the new writer (the promoted replica)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what the clients used (threads); the servers are the context's."""


class PostgresPair(DrillDatabase):
    name = "PostgreSQL"
    family = "POSTGRESQL"
    failover = "SIGKILL of the primary, then pg_ctl promote of the replica"

    def __init__(self, primary: Any, replica: Any, password: str) -> None:
        self.primary_cluster, self.replica_cluster = primary, replica
        self.password = password
        self.primary = (primary.host, primary.port)
        self.replica = (replica.host, replica.port)

    async def connect(self, host: str, port: int) -> Client:
        import asyncpg

        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=APP_USER,
            password=self.password,
            database=APP_DB,
            timeout=CONNECT_TIMEOUT,
        )
        return _PgClient(conn)

    async def connect_writer(self) -> Client:
        import asyncpg

        conn = await asyncpg.connect(
            host=[h for h, _ in self.addresses],
            port=[p for _, p in self.addresses],
            user=APP_USER,
            password=self.password,
            database=APP_DB,
            timeout=CONNECT_TIMEOUT,
            target_session_attrs="read-write",
        )
        return _PgClient(conn)

    def fail_primary(self, at: Callable[[], None]) -> None:
        self.primary_cluster.kill(before=at)

    def promote_replica(self) -> None:
        self.replica_cluster.promote()

    def row_counts(self) -> Counter[int]:
        text = self.replica_cluster.psql(
            "SELECT n, count(*) FROM drill_writes GROUP BY n", dbname=APP_DB
        )
        counts: Counter[int] = Counter()
        for line in text.splitlines():
            n, count = line.split("|")
            counts[int(n)] = int(count)
        return counts


class MariaDBPair(DrillDatabase):
    name = "MariaDB"
    family = "MYSQL"
    failover = (
        "switchover: primary read_only, replica caught up (MASTER_GTID_WAIT), primary stopped, "
        "replica promoted"
    )

    def __init__(self, primary: Any, replica: Any, password: str, threads: int) -> None:
        self.primary_server, self.replica_server = primary, replica
        self.password = password
        self.primary = (primary.host, primary.port)
        self.replica = (replica.host, replica.port)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="drill")

    def _connect_blocking(self, host: str, port: int) -> Any:
        import pymysql

        return pymysql.connect(
            host=host,
            port=port,
            user=APP_USER,
            password=self.password,
            database=APP_DB,
            autocommit=True,
            ssl_disabled=True,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=OP_TIMEOUT,
            write_timeout=OP_TIMEOUT,
        )

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def connect(self, host: str, port: int) -> Client:
        conn = await self._call(lambda: self._connect_blocking(host, port))
        return _MyClient(conn, self.executor)

    def _find_writer(self) -> Any:
        seen: list[str] = []
        for host, port in self.addresses:
            try:
                conn = self._connect_blocking(host, port)
            except Exception as error:
                seen.append(f"{host}:{port} {error}")
                continue
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT @@read_only")
                    row = cursor.fetchone()
                if row is not None and int(row[0]) == 0:
                    return conn
                seen.append(f"{host}:{port} read-only")
            except Exception as error:
                seen.append(f"{host}:{port} {error}")
            with contextlib.suppress(Exception):
                conn.close()
        raise ConnectionError("no server takes writes: " + "; ".join(seen))

    async def connect_writer(self) -> Client:
        return _MyClient(await self._call(self._find_writer), self.executor)

    def fail_primary(self, at: Callable[[], None]) -> None:
        at()
        self.primary_server.sql("SET GLOBAL read_only = 1")
        self.replica_server.wait_caught_up(self.primary_server)
        self.primary_server.stop()

    def promote_replica(self) -> None:
        self.replica_server.promote()

    def row_counts(self) -> Counter[int]:
        text = self.replica_server.sql("SELECT n, COUNT(*) FROM drill_writes GROUP BY n", APP_DB)
        counts: Counter[int] = Counter()
        for line in text.splitlines():
            n, count = line.split("\t")
            counts[int(n)] = int(count)
        return counts

    async def aclose(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"still not true after {timeout:g} s: {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def postgres_pair(max_connections: int = 100) -> Iterator[PostgresPair]:
    """A fresh PostgreSQL primary and streaming replica, replicating synchronously (no
    acknowledged commit may be lost in a crash), with the drill's user and tables."""
    from dbmux.testing import PostgresCluster

    password = secrets.token_urlsafe(12)
    settings = {"synchronous_commit": "on"}
    with PostgresCluster(
        max_connections=max_connections, password=secrets.token_urlsafe(12), settings=settings
    ) as primary:
        primary.create_user(APP_USER, password)
        primary.create_database(APP_DB, owner=APP_USER)
        primary.psql(
            "CREATE TABLE drill_writes (n bigint NOT NULL, writer int NOT NULL,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp());"
            "CREATE TABLE drill_probe (id bigserial, at timestamptz DEFAULT clock_timestamp());"
            f"ALTER TABLE drill_writes OWNER TO {APP_USER};"
            f"ALTER TABLE drill_probe OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        with primary.replica(settings=settings) as replica:
            # Synchronous once the replica streams: set on the primary only (ALTER SYSTEM is
            # not replicated), so the promoted replica does not wait for a standby of its own.
            _wait_for(
                lambda: primary.psql("SELECT count(*) FROM pg_stat_replication") == "1",
                "the replica streams",
            )
            primary.psql(
                "ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf()"
            )
            _wait_for(
                lambda: primary.psql("SELECT sync_state FROM pg_stat_replication") == "sync",
                "the replica is synchronous",
            )
            yield PostgresPair(primary, replica, password)


@contextlib.contextmanager
def mariadb_pair(max_connections: int = 100, threads: int = 64) -> Iterator[MariaDBPair]:
    """A fresh MariaDB primary and GTID replica with the drill's user and tables; `threads`:
    blocking PyMySQL calls that may run at once (every writer and idle client, and more)."""
    from dbmux.testing import MariaDBServer

    password = secrets.token_urlsafe(12)
    settings = MariaDBServer.primary_settings()
    root = secrets.token_urlsafe(12)
    with MariaDBServer(
        max_connections=max_connections, root_password=root, settings=settings
    ) as primary:
        with primary.replica() as replica:
            replica.replicate_from(primary)
            primary.create_user(APP_USER, password)
            primary.create_database(APP_DB, owner=APP_USER)
            primary.sql(
                "CREATE TABLE drill_writes (id bigint AUTO_INCREMENT PRIMARY KEY,"
                " n bigint NOT NULL, writer int NOT NULL,"
                " at timestamp(6) NOT NULL DEFAULT current_timestamp(6), KEY (n));"
                "CREATE TABLE drill_probe (id bigint AUTO_INCREMENT PRIMARY KEY,"
                " at timestamp(6) NOT NULL DEFAULT current_timestamp(6))",
                APP_DB,
            )
            replica.wait_caught_up(primary)
            yield MariaDBPair(primary, replica, password, threads)


def open_pair(database: str, clients: int) -> contextlib.AbstractContextManager[DrillDatabase]:
    """postgres_pair() or mariadb_pair() ("postgresql", "mysql") for `clients` connections."""
    if database == "postgresql":
        return postgres_pair(max_connections=max(100, clients + 20))
    if database == "mysql":
        return mariadb_pair(max_connections=max(100, clients + 20), threads=clients + 8)
    raise ValueError(f"unknown database {database!r}")


def dbmux_config(
    db: DrillDatabase, secret_file: str, *, probe_interval: float = 0.2, borrow_timeout: float = 30
) -> dict[str, Any]:
    """An embedded dbmux's config for the drill: one proxy on both servers of the pair."""
    return {
        "proxies": [
            {
                "name": "drill",
                "engine_family": db.family,
                "listen": "127.0.0.1:0",
                "auth": [{"secret": f"file:{secret_file}"}],
                "target_group": {
                    "probe_interval": probe_interval,
                    "connection_pool_config": {
                        "max_connections_percent": 20,
                        "connection_borrow_timeout": borrow_timeout,
                    },
                    "targets": [{"host": h, "port": p} for h, p in db.addresses],
                },
            }
        ]
    }


def secret_json(db: DrillDatabase) -> dict[str, str]:
    engine = "postgres" if db.family == "POSTGRESQL" else "mysql"
    return {"username": APP_USER, "password": db.password, "engine": engine}


@contextlib.contextmanager
def embedded_dbmux(db: DrillDatabase, probe_interval: float = 0.2) -> Iterator[EmbeddedDbmux]:
    """dbmux on a thread of this process in front of both servers of the pair."""
    from dbmux.embedded import EmbeddedDbmux

    with tempfile.TemporaryDirectory(prefix="dbmux-drill-") as tmp:
        secret = Path(tmp) / "drill.json"
        secret.write_text(json.dumps(secret_json(db)))
        secret.chmod(0o600)
        with EmbeddedDbmux(dbmux_config(db, str(secret), probe_interval=probe_interval)) as mux:
            yield mux


# ----------------------------------------------------------------------------- the drill


@dataclass
class _Writer:
    index: int
    client: Client
    busy: bool = False  # inside an insert or connect


class Drill:
    """One run of the drill: writers and idle clients on `connect`, the failover of `db`,
    and the check of the rows on the new writer.

    reconnect: what a writer does when its server says it is read-only: True (direct
    access) closes the connection and looks for the writer with `reconnect_with`; False
    (through a proxy) retries on the same connection. A lost connection is always reopened,
    and counted as dropped.
    """

    def __init__(
        self,
        result: DrillResult,
        db: DrillDatabase,
        connect: Connect,
        *,
        reconnect: bool,
        reconnect_with: Connect | None = None,
        before: float = 2.0,
        after: float = 3.0,
        pause: float = PAUSE,
        writer_of: Callable[[], object] | None = None,
        tick: Callable[[DrillResult], None] | None = None,
        tick_interval: float = 0.2,
    ) -> None:
        """before/after: seconds of writing before the failover and after writes resumed;
        pause: seconds each writer sleeps after an acknowledged insert; writer_of: what the
        proxy takes for the writer now (the drill notes when it changes); tick: called every
        tick_interval seconds while the drill runs (progress display)."""
        self.result = result
        self.db = db
        self.connect = connect
        self.reconnect = reconnect
        self.reconnect_with = reconnect_with or connect
        self.before, self.after, self.pause = before, after, pause
        self.writer_of = writer_of
        self.tick, self.tick_interval = tick, tick_interval
        self.stopping = False
        self._writers: list[_Writer] = []

    async def _open(self, connect: Connect) -> Client:
        async with asyncio.timeout(OP_TIMEOUT):
            return await connect()

    async def _reopen(self, writer: _Writer) -> None:
        """Connect again until it works (or the drill ends), counting each failed attempt."""
        r = self.result
        r.dropped_writers.add(writer.index)
        with contextlib.suppress(Exception):
            await writer.client.close()
        while not self.stopping:
            try:
                writer.client = await self._open(self.reconnect_with)
                r.reconnects += 1
                return
            except Exception as error:
                r.note_failure(error, connect=True)
                await asyncio.sleep(RECONNECT_DELAY)

    async def _write(self, writer: _Writer) -> None:
        r = self.result
        n = writer.index * RANGE
        while not self.stopping:
            n += 1
            writer.busy = True
            sent = time.monotonic()
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    acked = await writer.client.insert(n, writer.index)
            except Exception as error:
                r.uncertain.add(n)
                r.note_failure(error)
                lost = writer.client.closed or isinstance(error, TimeoutError)
                if lost or (self.reconnect and classify(error) in READ_ONLY):
                    await self._reopen(writer)
                else:
                    await asyncio.sleep(RETRY_DELAY)
            else:
                r.note_ack(n, acked, sent)
                if self.pause:
                    await asyncio.sleep(self.pause)
            finally:
                writer.busy = False

    async def _probe_promotion(self, client: Client) -> None:
        """Write to the replica directly until it takes the write: the promotion's end."""
        r = self.result
        while True:
            try:
                if client.closed:
                    client = await self._open(lambda: self.db.connect(*self.db.replica))
                await client.probe()
            except Exception:
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            r.promoted_at = r.event("the replica takes writes (direct probe)")
            await client.close()
            return

    async def _watch(self) -> None:
        """Progress ticks, and the moment the proxy changes its writer."""
        r = self.result
        seen = self.writer_of() if self.writer_of else None
        last_tick = 0.0
        while True:
            if self.writer_of is not None:
                now = self.writer_of()
                if now is not seen and r.failed_at is not None:
                    if now is None:
                        r.event("dbmux: no writer, transactions wait")
                    elif r.writer_seen_at is None:
                        r.writer_seen_at = r.event("dbmux: new writer chosen")
                    seen = now
            if self.tick is not None and time.monotonic() - last_tick >= self.tick_interval:
                last_tick = time.monotonic()
                self.tick(r)
            await asyncio.sleep(0.01)

    def run_sync(self) -> DrillResult:
        """run() on an event loop of its own (uvloop where installed)."""
        return run(self.run())  # type: ignore[no-any-return]

    async def run(self) -> DrillResult:
        """Connect, write, fail over, write on, stop, check; the result is also self.result."""
        r = self.result
        r.failover = self.db.failover
        t0 = time.monotonic()
        clients = await asyncio.gather(
            *(self._open(self.connect) for _ in range(r.writers + r.idle_clients))
        )
        r.event(f"connected in {time.monotonic() - t0:.2f} s", t0)
        self._writers = [_Writer(i + 1, c) for i, c in enumerate(clients[: r.writers])]
        idle = list(clients[r.writers :])
        probe = await self._open(lambda: self.db.connect(*self.db.replica))
        watching = asyncio.create_task(self._watch())
        tasks = [asyncio.create_task(self._write(w)) for w in self._writers]
        r.started = r.event("writers started")
        try:
            await asyncio.sleep(self.before)
            await self._fail_over(probe)
            deadline = r.failed_at + RESUME_TIMEOUT if r.failed_at else time.monotonic()
            while r.resumed_at is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if r.resumed_at is None:
                r.problem = f"writes did not resume within {RESUME_TIMEOUT:g} s of the failure"
            else:
                await asyncio.sleep(self.after)
        finally:
            self.stopping = True
            r.ended = r.event("writers told to stop")
            _done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            r.hung_writers = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            watching.cancel()
            with contextlib.suppress(BaseException):
                await watching
            if self.tick is not None:
                self.tick(r)
        for client in idle:
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await client.ping()
            except Exception:
                r.idle_dropped += 1
            else:
                r.idle_dropped += client.closed
        await asyncio.gather(
            *(c.close() for c in [*idle, *(w.client for w in self._writers)]),
            return_exceptions=True,
        )
        if r.resumed_at is None and (found := r.longest_gap()) and r.failed_at:
            r.resumed_at = found[2] if found[2] > r.failed_at else None
        await asyncio.to_thread(self._check_rows)
        return r

    async def _fail_over(self, probe: Client) -> None:
        r = self.result

        def at() -> None:
            r.failed_at = r.event(
                "primary killed" if self.db.family == "POSTGRESQL" else "primary read-only"
            )

        probing: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(self.db.fail_primary, at)
            if self.db.family != "POSTGRESQL":
                r.event("primary stopped")
            probing = asyncio.create_task(self._probe_promotion(probe))
            await asyncio.to_thread(self.db.promote_replica)
            r.event("promotion command returned")
            async with asyncio.timeout(RESUME_TIMEOUT):
                await probing
        finally:
            if probing is not None and not probing.done():
                probing.cancel()

    def _check_rows(self) -> None:
        r = self.result
        counts = self.db.row_counts()
        r.rows = counts.total()
        present = set(counts)
        r.lost = sorted(r.acknowledged - present)
        r.duplicated = sorted(n for n, c in counts.items() if c > 1)
        r.unexpected = sorted(present - r.acknowledged - r.uncertain)
        r.rows_checked = True


# ----------------------------------------------------------------------------- output


class Timeline:
    """Lines of a live timeline: writes and failures per interval, and what happened."""

    def __init__(self, result: DrillResult) -> None:
        self.result = result
        self._acks = 0
        self._failures = 0
        self._events = 0
        self._at = 0.0

    def line(self) -> str:
        """`+2.40 s  writes/s  1840  failed  0  | primary killed` since the previous line."""
        r = self.result
        now = time.monotonic()
        start = r.started or now
        span = now - self._at if self._at else 0.0
        acks, failures = len(r.ack_times), len(r.failure_times)
        rate = (acks - self._acks) / span if span > 0 else 0.0
        failed = failures - self._failures
        news = [w for _, w in sorted(r.events[self._events :]) if w != "writers started"]
        self._acks, self._failures, self._events, self._at = acks, failures, len(r.events), now
        line = f"  +{now - start:5.2f} s  writes/s {rate:6.0f}  failed {failed:4d}"
        if news:
            line += "  | " + "; ".join(news)
        return line


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def summary_rows(result: DrillResult) -> list[tuple[str, str]]:
    """(what, value) pairs of one side, as the reports print them."""
    r = result
    found = r.longest_gap()
    failed = f"{r.failed_ops}"
    if r.failed_connects:
        failed += f" ({r.failed_writes} writes, {r.failed_connects} connects)"
    dropped = f"{len(r.dropped_writers)} of {r.writers}"
    idle = f"{r.idle_dropped} of {r.idle_clients}"

    def count(items: list[int]) -> str:
        if not r.rows_checked:
            return "not checked"
        return str(len(items)) + (f" (e.g. {items[0]})" if items else "")

    rows = [
        ("promotion time", seconds(r.promotion)),
        ("longest write gap", seconds(None if found is None else found[0])),
        ("failed client operations", failed),
        ("writer connections dropped", dropped),
        ("idle connections dropped", idle),
        ("acknowledged commits", str(len(r.acknowledged))),
        ("lost commits", count(r.lost)),
        ("duplicated commits", count(r.duplicated)),
        ("rows never sent", count(r.unexpected)),
    ]
    if r.writer_seen_at is not None and r.failed_at is not None:
        rows.insert(1, ("dbmux saw the new writer after", seconds(r.writer_seen_at - r.failed_at)))
    if r.hung_writers:
        rows.append(("writers hung at the end", str(r.hung_writers)))
    return rows


def run(coro: Awaitable[Any]) -> Any:
    """Run the drill's coroutine on uvloop where installed (as the demo does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def driver_missing(database: str) -> str | None:
    """The client driver the drill needs for `database` if it is not installed."""
    import importlib.util

    driver = {"postgresql": "asyncpg", "mysql": "pymysql"}[database]
    return driver if importlib.util.find_spec(driver) is None else None


__all__ = [
    "Drill",
    "DrillDatabase",
    "DrillResult",
    "MariaDBPair",
    "PostgresPair",
    "Timeline",
    "dbmux_config",
    "embedded_dbmux",
    "mariadb_pair",
    "open_pair",
    "postgres_pair",
    "secret_json",
    "summary_rows",
]
