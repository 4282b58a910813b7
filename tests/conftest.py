"""Shared fixtures: one throwaway PostgreSQL per test session, a fresh dbmux per test."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from dbmux.metrics import ProxyMetrics
from dbmux.pool import PoolSet
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from dbmux.testing.rechunk import Rechunker

# The MySQL side's fixtures (a throwaway MariaDB per test session, a dbmux per test), for the
# MySQL engine's tests and the contract tests both engines share (test_session.py).
pytest_plugins = ["tests.mysql_fixtures"]

APP_USER, APP_PASSWORD, APP_DB = "app", "app-secret", "app"
# 20% (the tests' max_connections_percent) of 50 is a pool of 10.
PG_MAX_CONNECTIONS = 50


# Passwords the tests use. Not one may appear in any log record of the whole suite (at every
# level, exceptions included): checked as each record is emitted, reported at the end.
TEST_PASSWORDS = (
    APP_PASSWORD,
    "first-password",
    "second-password",
    "before-rotation",
    "after-rotation",
    "current-pw",
    "pending-pw",
    "hunter2",
)


class PasswordsInLogs(logging.Handler):
    """Every record the suite logs, searched for the tests' passwords."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if any(password in text for password in TEST_PASSWORDS):
            self.leaks.append(text[:500])


_PASSWORDS_IN_LOGS = PasswordsInLogs()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(_PASSWORDS_IN_LOGS)
    logging.getLogger("dbmux").setLevel(logging.DEBUG)  # every record dbmux makes is searched


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _PASSWORDS_IN_LOGS.leaks:
        leaks = "\n".join(_PASSWORDS_IN_LOGS.leaks[:20])
        sys.stderr.write(f"\nFAILED: a test password appeared in the logs:\n{leaks}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """dbmux keeps what it generates (MySQL proxies' RSA keys) under XDG_STATE_HOME by
    default: the test session's own folder, not the user's."""
    folder = tmp_path_factory.mktemp("state")
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(folder)
    yield folder
    if saved is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(autouse=True)
def no_unhandled_exception_in_the_proxy(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Everywhere: a crash inside the proxy that its client never hears about is a bug even when the
    test's own assertions pass."""
    yield
    logged = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if r.exc_info and r.levelno >= logging.ERROR
    ]
    assert not logged, "unhandled exception in the proxy:\n" + "\n".join(logged)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """PostgreSQL 15 with SCRAM auth and a small max_connections."""
    with PostgresCluster(max_connections=PG_MAX_CONNECTIONS, auth_method="scram-sha-256") as c:
        c.create_user(APP_USER, APP_PASSWORD)
        c.create_database(APP_DB, owner=APP_USER)
        c.psql(
            "CREATE TABLE items (id serial PRIMARY KEY, client int, note text);"
            f"ALTER TABLE items OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        yield c


@pytest.fixture
def cluster() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """A primary (committing synchronously, so a clean stop loses nothing) and its replica."""
    with PostgresCluster(settings={"synchronous_commit": "on"}) as primary:
        primary.create_user(APP_USER, APP_PASSWORD)
        primary.create_database(APP_DB, owner=APP_USER)
        primary.psql(
            f"CREATE TABLE writes (n int PRIMARY KEY); ALTER TABLE writes OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        with primary.replica(settings={"synchronous_commit": "on"}) as replica:
            yield primary, replica


@pytest.fixture
def pg_role(pg: PostgresCluster) -> Iterator[str]:
    """A fresh role name on the session's PostgreSQL, dropped afterwards."""
    name = f"role_{secrets.token_hex(6)}"
    yield name
    pg.psql(f'DROP ROLE IF EXISTS "{name}"')


@dataclass
class RunningProxy:
    """A dbmux in front of the session's PostgreSQL, as a test sees it."""

    embedded: EmbeddedDbmux
    host: str
    port: int

    def url(self, user: str = APP_USER, password: str = APP_PASSWORD, db: str = APP_DB) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{db}"

    @property
    def metrics(self) -> ProxyMetrics:
        return self.embedded.proxy().metrics

    @property
    def pools(self) -> PoolSet:
        return self.embedded.proxy().pools


WAIT = 30.0  # seconds a test waits for something the proxy does in the background


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}")
        time.sleep(0.02)


def writer_port(dbmux: EmbeddedDbmux) -> int | None:
    """The port of the target dbmux currently takes for the writer."""
    writer = dbmux.proxy().targets.writer
    return writer.target.port if writer is not None else None


def group_config(
    engine: str,
    servers: Iterable[Any],
    secrets_dir: Path,
    user: str,
    password: str,
    pool: dict[str, Any] | None = None,
    **proxy: Any,
) -> dict[str, Any]:
    """A proxy in front of a replicated group: every server a target, probed every 0.2 s,
    pools of 20% of max_connections, borrows waiting up to WAIT (unless `pool` says
    otherwise)."""
    secret = secrets_dir / f"{user}-group.json"
    secret.write_text(json.dumps({"username": user, "password": password}))
    return {
        "proxies": [
            {
                "name": "group",
                "engine_family": engine,
                "listen": "127.0.0.1:0",
                "auth": [{"secret": f"file:{secret}"}],
                "target_group": {
                    "probe_interval": 0.2,
                    "connection_pool_config": {
                        "max_connections_percent": 20,
                        "connection_borrow_timeout": WAIT,
                        **(pool or {}),
                    },
                    "targets": [{"host": s.host, "port": s.port} for s in servers],
                },
                **proxy,
            }
        ]
    }


class Address(Protocol):
    """Where a server listens: a throwaway server itself or a relay in front of one."""

    host: str
    port: int


def proxy_config(
    pg: Address,
    secrets_dir: Path,
    pool: dict[str, Any],
    auth: list[dict[str, Any]],
    **proxy: Any,
) -> dict[str, Any]:
    secret = secrets_dir / "app.json"
    secret.write_text(json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
    return {
        "proxies": [
            {
                "name": "test",
                "engine_family": "POSTGRESQL",
                "listen": "127.0.0.1:0",
                "auth": auth or [{"secret": f"file:{secret}"}],
                "target_group": {
                    "connection_pool_config": {"max_connections_percent": 20, **pool},
                    "targets": [{"host": pg.host, "port": pg.port}],
                },
                **proxy,
            }
        ]
    }


@pytest.fixture
def start_proxy(pg: PostgresCluster, tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    """Start a dbmux for this test: start_proxy(pool={...}, auth=[...], **proxy_settings)."""
    started: list[EmbeddedDbmux] = []

    def start(
        pool: dict[str, Any] | None = None,
        auth: list[dict[str, Any]] | None = None,
        **proxy: Any,
    ) -> RunningProxy:
        config = proxy_config(pg, tmp_path, pool or {}, auth or [], **proxy)
        embedded = EmbeddedDbmux(config).start()
        started.append(embedded)
        host, port = embedded.address()
        return RunningProxy(embedded, host, port)

    yield start
    for embedded in started:
        embedded.stop()


@dataclass
class ProxyProcess:
    """`dbmux serve` in a child process: for drivers that block the interpreter, and to run
    the real command line."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, user: str = APP_USER, password: str = APP_PASSWORD, db: str = APP_DB) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{db}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def proxy_process(pg: PostgresCluster, tmp_path: Path) -> Iterator[ProxyProcess]:
    port = _free_port()
    config = proxy_config(pg, tmp_path, {}, [])
    config["proxies"][0]["listen"] = f"127.0.0.1:{port}"
    config["admin"] = {"listen": "127.0.0.1:0"}
    path = tmp_path / "dbmux.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "dbmux.log"
    dbmux = Path(sys.executable).with_name("dbmux")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(dbmux), "serve", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dbmux serve did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield ProxyProcess("127.0.0.1", port, process, log)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """dbmux with a pool of 10 server connections."""
    return start_proxy()


def server_connections(pg: PostgresCluster, user: str = APP_USER) -> int:
    """Connections the database currently has for `user` (as pg_stat_activity shows)."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"))


# The cuts of the re-chunking relay: fixed in CI, any other value to try other cuts (bench.rechunk
# runs many at random); a failure prints the seed that reproduces it.
RECHUNK_SEED = int(os.environ.get("DBMUX_RECHUNK_SEED", "1"))


def pytest_report_header() -> str:
    return f"re-chunking relay seed: DBMUX_RECHUNK_SEED={RECHUNK_SEED}"


@dataclass
class RechunkedProxy(RunningProxy):
    """A dbmux with a re-chunking relay on both sides: host and port are the client side's."""

    client_side: Rechunker
    server_side: Rechunker


@pytest.fixture
def rechunked_pg(pg: PostgresCluster) -> Iterator[Rechunker]:
    """A re-chunking relay straight in front of the session's PostgreSQL (no dbmux)."""
    with Rechunker(pg.host, pg.port, seed=RECHUNK_SEED, name="server") as relay:
        yield relay


@pytest.fixture
def start_rechunked_proxy(
    pg: PostgresCluster, tmp_path: Path
) -> Iterator[Callable[..., RechunkedProxy]]:
    """start_proxy's dbmux, reached through a re-chunking relay and reaching PostgreSQL through
    another: driver -> relay -> dbmux -> relay -> PostgreSQL."""
    with contextlib.ExitStack() as started:

        def start(pool: dict[str, Any] | None = None, **proxy: Any) -> RechunkedProxy:
            server_side = started.enter_context(
                Rechunker(pg.host, pg.port, seed=RECHUNK_SEED, name="server")
            )
            config = proxy_config(server_side, tmp_path, pool or {}, [], **proxy)
            embedded = started.enter_context(EmbeddedDbmux(config))
            client_side = started.enter_context(
                Rechunker(*embedded.address(), seed=RECHUNK_SEED, name="client")
            )
            host, port = client_side.host, client_side.port
            return RechunkedProxy(embedded, host, port, client_side, server_side)

        yield start
