"""The primary and replica pairs the failover drill fails over (PostgreSQL, MariaDB), the
client connections its writers use, and dbmux in front of a pair."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbmux.testing.certs import CertFiles
    from dbmux.testing.embedded import EmbeddedDbmux

APP_USER = "drill"
APP_DB = "drill"
OP_TIMEOUT = 20.0  # seconds one insert or connect may take before it counts as hung
CONNECT_TIMEOUT = 15.0


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

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> Client:
        """The app user's connection to one address (a server or dbmux); with `tls`, over
        TLS with that context (which checks the server's certificate)."""
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

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> Client:
        import asyncpg

        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=APP_USER,
            password=self.password,
            database=APP_DB,
            timeout=CONNECT_TIMEOUT,
            ssl=tls if tls is not None else False,
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

    def _connect_blocking(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> Any:
        import pymysql

        security: dict[str, Any] = {"ssl": tls} if tls is not None else {"ssl_disabled": True}
        return pymysql.connect(
            host=host,
            port=port,
            user=APP_USER,
            password=self.password,
            database=APP_DB,
            autocommit=True,
            **security,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=OP_TIMEOUT,
            write_timeout=OP_TIMEOUT,
        )

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> Client:
        conn = await self._call(lambda: self._connect_blocking(host, port, tls))
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
    db: DrillDatabase,
    secret_file: str,
    *,
    probe_interval: float = 0.2,
    borrow_timeout: float = 30,
    tls: CertFiles | None = None,
) -> dict[str, Any]:
    """An embedded dbmux's config for the drill: one proxy on both servers of the pair; with
    `tls`, it offers its clients TLS with that certificate and requires it."""
    client_tls = {"require_tls": True, "tls": tls.as_tls()} if tls is not None else {}
    return {
        "state_dir": str(Path(secret_file).parent),  # MySQL's RSA key: throwaway
        "proxies": [
            {
                "name": "drill",
                "engine_family": db.family,
                "listen": "127.0.0.1:0",
                **client_tls,
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
        ],
    }


def secret_json(db: DrillDatabase) -> dict[str, str]:
    engine = "postgres" if db.family == "POSTGRESQL" else "mysql"
    return {"username": APP_USER, "password": db.password, "engine": engine}


@contextlib.contextmanager
def embedded_dbmux(
    db: DrillDatabase, probe_interval: float = 0.2, tls: CertFiles | None = None
) -> Iterator[EmbeddedDbmux]:
    """dbmux on a thread of this process in front of both servers of the pair; with `tls`,
    its clients must use TLS, with that certificate."""
    from dbmux.testing.embedded import EmbeddedDbmux

    with tempfile.TemporaryDirectory(prefix="dbmux-drill-") as tmp:
        secret = Path(tmp) / "drill.json"
        secret.write_text(json.dumps(secret_json(db)))
        secret.chmod(0o600)
        config = dbmux_config(db, str(secret), probe_interval=probe_interval, tls=tls)
        with EmbeddedDbmux(config) as mux:
            yield mux


def driver_missing(database: str) -> str | None:
    """The client driver the drill needs for `database` if it is not installed."""
    import importlib.util

    driver = {"postgresql": "asyncpg", "mysql": "pymysql"}[database]
    return driver if importlib.util.find_spec(driver) is None else None
