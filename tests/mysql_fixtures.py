"""Fixtures of the MySQL engine's tests: one throwaway MariaDB per test session, a fresh
dbmux in front of it per test."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest

from dbmux.metrics import ProxyMetrics
from dbmux.pool import PoolSet
from dbmux.testing import MariaDBServer
from dbmux.testing.embedded import EmbeddedDbmux
from dbmux.testing.rechunk import Rechunker
from tests.conftest import RECHUNK_SEED, Address, group_config

MY_USER, MY_PASSWORD, MY_DB = "app", "app-secret", "app"
SHA2_USER, SHA2_PASSWORD = "app_sha2", "sha2-secret"
# 20% (the tests' max_connections_percent) of 50 is a pool of 10.
MY_MAX_CONNECTIONS = 50


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """MariaDB with a small max_connections, an app user and an items table."""
    with MariaDBServer(max_connections=MY_MAX_CONNECTIONS) as server:
        server.create_user(MY_USER, MY_PASSWORD)
        server.create_database(MY_DB, owner=MY_USER)
        server.sql(
            "CREATE TABLE items (id INT AUTO_INCREMENT PRIMARY KEY, client INT, note TEXT)",
            MY_DB,
        )
        yield server


@dataclass
class MyProxy:
    """A dbmux in front of the session's MariaDB, as a test sees it."""

    embedded: EmbeddedDbmux
    host: str
    port: int

    def connect(self, user: str = MY_USER, password: str = MY_PASSWORD, **kwargs: Any):
        kwargs.setdefault("database", MY_DB)
        kwargs.setdefault("autocommit", True)
        return pymysql.connect(
            host=self.host, port=self.port, user=user, password=password, **kwargs
        )

    def connector(self, **kwargs: Any) -> Any:
        """mysql-connector-python in its pure-Python mode (the wheel has no C extension)."""
        kwargs.setdefault("database", MY_DB)
        kwargs.setdefault("use_pure", True)
        return mysql.connector.connect(
            host=self.host, port=self.port, user=MY_USER, password=MY_PASSWORD, **kwargs
        )

    @property
    def metrics(self) -> ProxyMetrics:
        return self.embedded.proxy().metrics

    @property
    def pools(self) -> PoolSet:
        return self.embedded.proxy().pools


@contextlib.contextmanager
def replicated_pair() -> Iterator[tuple[MariaDBServer, MariaDBServer]]:
    """A primary and a GTID replica of it, with the app's user (which may read replication
    status) and database and a table `writes`."""
    with MariaDBServer(settings=MariaDBServer.primary_settings()) as primary:
        with primary.replica() as replica:
            replica.replicate_from(primary)
            primary.create_user(MY_USER, MY_PASSWORD)
            primary.sql(f"GRANT SLAVE MONITOR ON *.* TO '{MY_USER}'@'%'")
            primary.create_database(MY_DB, owner=MY_USER)
            primary.sql("CREATE TABLE writes (n INT PRIMARY KEY)", MY_DB)
            replica.wait_caught_up(primary)
            yield primary, replica


@contextlib.contextmanager
def dbmux_in_front(
    pair: tuple[MariaDBServer, MariaDBServer], secrets_dir: Path, **proxy: Any
) -> Iterator[EmbeddedDbmux]:
    """dbmux following the writer of a replicated pair."""
    config = group_config("MYSQL", pair, secrets_dir, MY_USER, MY_PASSWORD, **proxy)
    with EmbeddedDbmux(config) as running:
        yield running


def my_proxy_config(
    server: Address,
    secrets_dir: Path,
    pool: dict[str, Any],
    auth: list[dict[str, Any]],
    **proxy: Any,
) -> dict[str, Any]:
    secret = secrets_dir / "my-app.json"
    secret.write_text(json.dumps({"username": MY_USER, "password": MY_PASSWORD}))
    return {
        "proxies": [
            {
                "name": "mytest",
                "engine_family": "MYSQL",
                "listen": "127.0.0.1:0",
                "auth": auth or [{"secret": f"file:{secret}"}],
                "target_group": {
                    "connection_pool_config": {"max_connections_percent": 20, **pool},
                    "targets": [{"host": server.host, "port": server.port}],
                },
                **proxy,
            }
        ]
    }


@pytest.fixture
def start_my_proxy(mariadb: MariaDBServer, tmp_path: Path) -> Iterator[Callable[..., MyProxy]]:
    """start_my_proxy(pool={...}, auth=[...], **proxy_settings)."""
    started: list[EmbeddedDbmux] = []

    def start(
        pool: dict[str, Any] | None = None, auth: list[dict[str, Any]] | None = None, **proxy: Any
    ) -> MyProxy:
        config = my_proxy_config(mariadb, tmp_path, pool or {}, auth or [], **proxy)
        embedded = EmbeddedDbmux(config).start()
        started.append(embedded)
        host, port = embedded.address()
        return MyProxy(embedded, host, port)

    yield start
    for embedded in started:
        embedded.stop()


@pytest.fixture
def my_proxy(start_my_proxy: Callable[..., MyProxy]) -> MyProxy:
    """dbmux with a pool of 10 server connections in front of MariaDB."""
    return start_my_proxy()


def server_connections(server: MariaDBServer, user: str = MY_USER) -> int:
    """Connections MariaDB currently has for `user` (information_schema.PROCESSLIST)."""
    return int(
        server.sql(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{user}'")
    )


@dataclass
class RechunkedMyProxy(MyProxy):
    """A dbmux with a re-chunking relay on both sides: host and port are the client side's."""

    client_side: Rechunker
    server_side: Rechunker


@pytest.fixture
def rechunked_mariadb(mariadb: MariaDBServer) -> Iterator[Rechunker]:
    """A re-chunking relay straight in front of the session's MariaDB (no dbmux)."""
    with Rechunker(mariadb.host, mariadb.port, seed=RECHUNK_SEED, name="server") as relay:
        yield relay


@pytest.fixture
def start_rechunked_my_proxy(
    mariadb: MariaDBServer, tmp_path: Path
) -> Iterator[Callable[..., RechunkedMyProxy]]:
    """start_my_proxy's dbmux, reached through a re-chunking relay and reaching MariaDB through
    another: driver -> relay -> dbmux -> relay -> MariaDB."""
    with contextlib.ExitStack() as started:

        def start(pool: dict[str, Any] | None = None, **proxy: Any) -> RechunkedMyProxy:
            server_side = started.enter_context(
                Rechunker(mariadb.host, mariadb.port, seed=RECHUNK_SEED, name="server")
            )
            config = my_proxy_config(server_side, tmp_path, pool or {}, [], **proxy)
            embedded = started.enter_context(EmbeddedDbmux(config))
            client_side = started.enter_context(
                Rechunker(*embedded.address(), seed=RECHUNK_SEED, name="client")
            )
            host, port = client_side.host, client_side.port
            return RechunkedMyProxy(embedded, host, port, client_side, server_side)

        yield start
