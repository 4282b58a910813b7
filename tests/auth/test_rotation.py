"""Secrets that rotate under a running workload: no client sees an error.

The rotation takes the steps AWS's rotation functions take, against a local Secrets Manager:
createSecret (a new password labelled AWSPENDING), setSecret (the database's password
changed with ALTER ROLE / ALTER USER), finishSecret (AWSCURRENT moves to the new password).
Meanwhile clients log in with whatever AWSCURRENT holds when they connect (as an application
reading the secret does), run transactions on connections they keep, and new server
connections are opened at each step (each new database a client asks for is a new pool).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from dbmux.testing import MariaDBServer, PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.auth.conftest import SecretsManager
from tests.conftest import proxy_config, wait_until
from tests.mysql_fixtures import my_proxy_config

WORKERS = 4


@dataclass
class Database:
    """One engine's side of the test: how to connect through dbmux and change a password."""

    engine: str
    user: str
    databases: list[str]  # for new pools (so new server logins) at each step
    connect: Callable[[tuple[str, int], str, str], Any]  # (address, password, database)
    set_password: Callable[[str], None]
    config: Callable[[Path, str], dict[str, Any]]  # (secrets folder, secret ARN)


def _pg_connect(user: str) -> Callable[[tuple[str, int], str, str], Any]:
    def connect(at: tuple[str, int], password: str, database: str) -> Any:
        return psycopg.connect(
            host=at[0],
            port=at[1],
            user=user,
            password=password,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    return connect


@pytest.fixture
def postgres_side(pg: PostgresCluster, pg_role: str) -> Iterator[Database]:
    pg.create_user(pg_role, "first-password")
    databases = [f"{pg_role}_{i}" for i in range(4)]
    for name in databases:
        pg.create_database(name, owner=pg_role)
    yield Database(
        "POSTGRESQL",
        pg_role,
        databases,
        _pg_connect(pg_role),
        lambda password: pg.psql(f"ALTER ROLE \"{pg_role}\" PASSWORD '{password}'"),
        lambda folder, arn: proxy_config(pg, folder, {}, [{"secret": arn}]),
    )
    for name in databases:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mysql_side(mariadb: MariaDBServer) -> Iterator[Database]:
    user = f"rot_{secrets.token_hex(4)}"
    mariadb.create_user(user, "first-password")
    databases = [f"{user}_{i}" for i in range(4)]
    for name in databases:
        mariadb.create_database(name, owner=user)

    def connect(at: tuple[str, int], password: str, database: str) -> Any:
        return pymysql.connect(
            host=at[0],
            port=at[1],
            user=user,
            password=password,
            database=database,
            autocommit=True,
            connect_timeout=10,
            read_timeout=30,
        )

    yield Database(
        "MYSQL",
        user,
        databases,
        connect,
        lambda password: mariadb.sql(f"ALTER USER '{user}'@'%' IDENTIFIED BY '{password}'"),
        lambda folder, arn: my_proxy_config(mariadb, folder, {}, [{"secret": arn}]),
    )
    for name in databases:
        mariadb.sql(f"DROP DATABASE IF EXISTS `{name}`")
    mariadb.sql(f"DROP USER IF EXISTS '{user}'@'%'")


@pytest.fixture(params=["postgres_side", "mysql_side"])
def side(request: pytest.FixtureRequest) -> Database:
    database: Database = request.getfixturevalue(request.param)
    return database


def passwords(proxy: Any, user: str) -> int:
    """How many passwords dbmux accepts for `user` now."""
    known = proxy.users.get(user)
    return len(known.passwords) if known is not None else 0


def run_one(db: Database, conn: Any) -> None:
    cursor = conn.cursor()
    cursor.execute("SELECT 1")
    assert list(cursor.fetchall()) == [(1,)]


def test_a_rotation_under_load_fails_no_client(
    side: Database, secrets_manager: SecretsManager, tmp_path: Path
) -> None:
    arn = secrets_manager.create(
        f"rotation-{secrets.token_hex(4)}",
        {"username": side.user, "password": "first-password"},
    )
    config = side.config(tmp_path, arn)
    config["secrets"] = {"aws_endpoint_url": secrets_manager.endpoint_url, "refresh_interval": 0.3}
    errors: list[str] = []
    done = [0]
    stop = threading.Event()

    def current_password() -> str:
        return str(secrets_manager.current(arn)["password"])

    with EmbeddedDbmux(config) as dbmux:
        address = dbmux.address()
        proxy = dbmux.proxy()

        def log_in() -> Any:
            """As applications do: with AWSCURRENT, read again if the login is refused
            because the rotation finished between the read and the login (refused with the
            password that is still current, it is a failure)."""
            while True:
                password = current_password()
                try:
                    return side.connect(address, password, side.databases[0])
                except (psycopg.OperationalError, pymysql.err.OperationalError):
                    if current_password() == password:
                        raise

        def worker(n: int) -> None:
            """A kept connection and, every few transactions, a new login."""
            try:
                kept = log_in()
                while not stop.is_set():
                    run_one(side, kept)
                    done[0] += 1
                    if done[0] % 5 == n % 5:
                        with log_in() as c:
                            run_one(side, c)
                kept.close()
            except Exception as error:  # every failure is the test's finding
                errors.append(f"worker {n}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: done[0] > 20 or bool(errors), "the workload runs")
            # createSecret: dbmux reads the pending version within refresh_interval.
            secrets_manager.put_pending(arn, {"username": side.user, "password": "second-password"})
            wait_until(lambda: passwords(proxy, side.user) == 2, "dbmux has read AWSPENDING")
            # setSecret: the database takes only the new password from now on. A new pool's
            # server login tries AWSCURRENT, is refused, and uses AWSPENDING.
            side.set_password("second-password")
            with side.connect(address, "first-password", side.databases[1]) as conn:
                run_one(side, conn)
            # finishSecret: clients now read the new password; both are accepted meanwhile.
            secrets_manager.finish(arn)
            with side.connect(address, "second-password", side.databases[2]) as conn:
                run_one(side, conn)
            wait_until(lambda: passwords(proxy, side.user) == 1, "dbmux has read the rotation")
            with side.connect(address, "second-password", side.databases[3]) as conn:
                run_one(side, conn)
            before = done[0]
            wait_until(lambda: done[0] > before + 20 or bool(errors), "the workload runs on")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert errors == []
        # The old password is no longer accepted once the rotation is finished.
        with pytest.raises((psycopg.OperationalError, pymysql.err.OperationalError)):
            side.connect(address, "first-password", side.databases[0])
