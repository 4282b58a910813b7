"""The throwaway databases ``dbmux demo`` storms: how each starts, how its clients run an
invocation, and the admin connection that counts the app's connections and rows."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from dbmux.demo.report import TOO_MANY_CLIENTS, TOO_MANY_CONNECTIONS
from dbmux.demo.storm import CONNECT_TIMEOUT, Invocation, PhaseResult, pymysql_invocations
from dbmux.testing.certs import CertFiles

APP_USER = "app"
APP_DB = "app"


class _Database:
    """A throwaway database to storm: how to start it, how its clients run the storm's
    invocation, and an admin connection that counts the app's connections and rows."""

    name: str  # as the report names it
    family: str  # dbmux's engine_family
    refused: str  # the failure cause of a login refused for want of connection slots
    client: str  # how the storm's clients connect, for the storm's description
    host: str
    port: int
    version: str
    reserved = 0  # connections of max_connections only superusers may use
    slots_note = ""  # what the setup line says about the connection slots

    def start(
        self,
        resources: contextlib.ExitStack,
        max_connections: int,
        password: str,
        tls: CertFiles | None = None,
    ) -> None:
        """Start the server (cleaned up by `resources`) with the app's user, database and an
        orders table; with `tls`, the server offers TLS with that certificate."""
        raise NotImplementedError

    def invocations(
        self, host: str, port: int, password: str, clients: int, tls: ssl.SSLContext | None
    ) -> AbstractContextManager[Invocation]:
        """The storm's invocation against host:port; with `tls`, every connection uses TLS
        with that context (which checks the server's certificate)."""
        raise NotImplementedError

    async def open_admin(self) -> None:
        raise NotImplementedError

    async def connections(self) -> int:
        """The app user's server connections now."""
        raise NotImplementedError

    async def rows(self, phase: str) -> int:
        """Rows the phase left in the orders table."""
        raise NotImplementedError

    async def close_admin(self) -> None:
        raise NotImplementedError


class _Postgres(_Database):
    name = "PostgreSQL"
    family = "POSTGRESQL"
    refused = TOO_MANY_CLIENTS
    client = "asyncpg with its default settings"

    def start(
        self,
        resources: contextlib.ExitStack,
        max_connections: int,
        password: str,
        tls: CertFiles | None = None,
    ) -> None:
        from dbmux.testing import PostgresCluster

        self._superuser_password = secrets.token_urlsafe(16)
        cluster = resources.enter_context(
            PostgresCluster(
                max_connections=max_connections,
                auth_method="scram-sha-256",
                password=self._superuser_password,
                tls=tls,
            )
        )
        cluster.create_user(APP_USER, password)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.psql(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, phase text NOT NULL,"
            " invocation int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());"
            f"ALTER TABLE orders OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        self.cluster = cluster
        self.host, self.port = cluster.host, cluster.port
        self.version = cluster.psql("SHOW server_version").split()[0]
        self.reserved = int(cluster.psql("SHOW superuser_reserved_connections"))
        self.slots_note = (
            f"; {self.reserved} of its {max_connections} connections are reserved for superusers"
        )

    @contextlib.contextmanager
    def invocations(
        self, host: str, port: int, password: str, clients: int, tls: ssl.SSLContext | None
    ) -> Iterator[Invocation]:
        import asyncpg

        async def invocation(phase: PhaseResult, number: int) -> None:
            conn = await asyncpg.connect(
                host=host,
                port=port,
                user=APP_USER,
                password=password,
                database=APP_DB,
                timeout=CONNECT_TIMEOUT,
                ssl=tls if tls is not None else False,
            )
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO orders (phase, invocation) VALUES ($1, $2)", phase.name, number
                    )
                    await conn.fetchval("SELECT count(*) FROM orders WHERE phase = $1", phase.name)
                phase.committed += 1
                await conn.close()
            except BaseException:  # also on cancellation (Ctrl-C)
                conn.terminate()
                raise

        yield invocation

    async def open_admin(self) -> None:
        import asyncpg

        self._admin = await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.cluster.superuser,
            password=self._superuser_password,
            database=APP_DB,
            timeout=CONNECT_TIMEOUT,
        )

    async def connections(self) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
        return int(await self._admin.fetchval(sql, APP_USER))

    async def rows(self, phase: str) -> int:
        return int(
            await self._admin.fetchval("SELECT count(*) FROM orders WHERE phase = $1", phase)
        )

    async def close_admin(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin.close(timeout=5)


def _orders_transaction(cursor: Any, phase: str, number: int) -> None:
    """The storm's transaction for PyMySQL (between its BEGIN and COMMIT)."""
    cursor.execute("INSERT INTO orders (phase, invocation) VALUES (%s, %s)", (phase, number))
    cursor.execute("SELECT count(*) FROM orders WHERE phase = %s", (phase,))
    cursor.fetchone()


class _MariaDB(_Database):
    name = "MariaDB"
    family = "MYSQL"
    refused = TOO_MANY_CONNECTIONS
    client = (
        "PyMySQL with its default settings, each client blocking on a thread of its own as a "
        "Lambda function would"
    )
    slots_note = "; one more connection is kept for a user with SUPER"

    def start(
        self,
        resources: contextlib.ExitStack,
        max_connections: int,
        password: str,
        tls: CertFiles | None = None,
    ) -> None:
        from dbmux.testing import MariaDBServer

        self._root_password = secrets.token_urlsafe(16)
        server = resources.enter_context(
            MariaDBServer(
                max_connections=max_connections, root_password=self._root_password, tls=tls
            )
        )
        server.create_user(APP_USER, password)
        server.create_database(APP_DB, owner=APP_USER)
        server.sql(
            "CREATE TABLE orders (id bigint AUTO_INCREMENT PRIMARY KEY,"
            " phase varchar(16) NOT NULL, invocation int NOT NULL,"
            " created_at timestamp(6) NOT NULL DEFAULT current_timestamp(6), KEY (phase))",
            APP_DB,
        )
        self.host, self.port = server.host, server.port
        self.version = server.sql("SELECT VERSION()").split("-")[0]
        # One thread for the admin connection: PyMySQL connections are not thread-safe, and
        # a sample cancelled by the end of a storm may still be running when the next starts.
        self._admin_thread = resources.enter_context(ThreadPoolExecutor(max_workers=1))

    def invocations(
        self, host: str, port: int, password: str, clients: int, tls: ssl.SSLContext | None
    ) -> AbstractContextManager[Invocation]:
        connect = {"host": host, "port": port, "user": APP_USER, "password": password}
        connect["database"] = APP_DB
        return pymysql_invocations(connect, _orders_transaction, clients, tls)

    async def _admin_call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._admin_thread, fn)

    async def _count(self, sql: str, arg: str) -> int:
        def run() -> int:
            with self._admin.cursor() as cursor:
                cursor.execute(sql, (arg,))
                return int(cursor.fetchone()[0])

        return int(await self._admin_call(run))

    async def open_admin(self) -> None:
        import pymysql

        self._admin = await self._admin_call(
            lambda: pymysql.connect(
                host=self.host,
                port=self.port,
                user="root",
                password=self._root_password,
                database=APP_DB,
                autocommit=True,  # every count sees the rows committed so far
                connect_timeout=CONNECT_TIMEOUT,
            )
        )

    async def connections(self) -> int:
        sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = %s"
        return await self._count(sql, APP_USER)

    async def rows(self, phase: str) -> int:
        return await self._count("SELECT count(*) FROM orders WHERE phase = %s", phase)

    async def close_admin(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin_call(self._admin.close)


DATABASES: dict[str, type[_Database]] = {"postgresql": _Postgres, "mysql": _MariaDB}
# The client driver each database's storm needs (all come with dbmux[demo]).
DRIVERS = {"postgresql": "asyncpg", "mysql": "pymysql"}
