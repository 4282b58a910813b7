"""`dbmux serve` as operators run it: SIGHUP reloads, SIGTERM drains and exits 0, JSON log
lines, and a restart (a second process on the same port, SO_REUSEPORT) with no transaction
lost."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

import dbmux
from dbmux.testing import PostgresCluster
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, proxy_config, wait_until

EXIT_WAIT = 60.0
WORKERS = 2  # seconds a drained process may take to exit; only a broken build waits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Serve:
    """`python -m dbmux serve` in a child process, its log in a file."""

    process: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for(self, text: str, count: int = 1) -> None:
        wait_until(
            lambda: self.log.read_text().count(text) >= count or self.process.poll() is not None,
            f"dbmux logs {text!r} {count} times",
        )
        assert self.log.read_text().count(text) >= count, self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(EXIT_WAIT)


@dataclass
class Serving:
    config: Path
    port: int
    started: list[Serve] = field(default_factory=list)

    def start(self, *extra: str) -> Serve:
        log = self.config.with_name(f"dbmux-{len(self.started)}.log")
        env = {**os.environ, "PYTHONPATH": str(Path(dbmux.__file__).parents[1])}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "dbmux", "serve", "-c", str(self.config), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        serve = Serve(process, log)
        self.started.append(serve)
        serve.wait_for("ready")
        return serve

    def url(self) -> str:
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.port}/{APP_DB}"


@pytest.fixture
def serving(pg: PostgresCluster, tmp_path: Path) -> Iterator[Serving]:
    port = _free_port()
    config = proxy_config(pg, tmp_path, {}, [])
    config["proxies"][0]["listen"] = f"127.0.0.1:{port}"
    config["shutdown_timeout"] = 30
    config["workers"] = WORKERS  # as the default (a worker per core) is on a 2-core machine
    path = tmp_path / "dbmux.yaml"
    path.write_text(yaml.safe_dump(config))
    running = Serving(path, port)
    yield running
    for serve in running.started:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait(EXIT_WAIT)


def test_sigterm_lets_a_transaction_commit_then_exits_0_logging_json(
    serving: Serving, pg: PostgresCluster
) -> None:
    serve = serving.start("--log-format", "json")
    marker = -secrets.randbelow(1 << 30) - 100
    with psycopg.connect(serving.url(), autocommit=True) as client:
        client.execute("BEGIN")
        client.execute("INSERT INTO items (client, note) VALUES (%s, 'sigterm')", (marker,))
        serve.process.send_signal(signal.SIGTERM)
        serve.wait_for("drains", count=WORKERS)  # whichever worker the client is on
        client.execute("COMMIT")
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")  # told 57P01 once between transactions, or gone
    assert serve.process.wait(EXIT_WAIT) == 0
    assert pg.psql(f"SELECT count(*) FROM items WHERE client = {marker}", dbname=APP_DB) == "1"
    records = [json.loads(line) for line in serve.lines()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("drained" in r["message"] and r["logger"] == "dbmux.proxy" for r in records)


def test_sighup_reloads_the_config_file(serving: Serving) -> None:
    serve = serving.start()
    with psycopg.connect(serving.url(), autocommit=True) as client:
        config = yaml.safe_load(serving.config.read_text())
        config["proxies"][0]["idle_client_timeout"] = 123
        serving.config.write_text(yaml.safe_dump(config))
        serve.process.send_signal(signal.SIGHUP)
        serve.wait_for("configuration reloaded")
        assert "idle_client_timeout" in serve.log.read_text()
        serving.config.write_text("proxies: [")
        serve.process.send_signal(signal.SIGHUP)
        serve.wait_for("reload refused")
        assert client.execute("SELECT 1").fetchone() == (1,)
    assert serve.stop() == 0


@dataclass
class Workload:
    """Clients doing transactions in a loop, some on a new connection each, some on one
    they keep. A client may be disconnected between transactions (57P01) or fail to
    connect, and then connects again; an error once a transaction has begun is a failure."""

    url: str
    marker: int
    committed: int = 0
    failed: list[str] = field(default_factory=list)
    reconnects: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _connect(self) -> psycopg.Connection[Any]:
        while not self.stop.is_set():
            try:
                return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError:
                with self.lock:
                    self.reconnects += 1
                time.sleep(0.01)
        raise TimeoutError("stopped")

    def _transaction(self, conn: psycopg.Connection[Any]) -> bool:
        """One transaction; False if the connection ended before it began."""
        try:
            conn.execute("BEGIN")
        except psycopg.OperationalError:
            with self.lock:
                self.reconnects += 1
            return False
        try:
            conn.execute("INSERT INTO items (client, note) VALUES (%s, 'restart')", (self.marker,))
            conn.execute("SELECT pg_sleep(0.005)")
            conn.execute("COMMIT")
        except psycopg.Error as error:
            with self.lock:
                self.failed.append(repr(error))
            return False
        with self.lock:
            self.committed += 1
        return True

    def short_lived(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self._connect()
            except TimeoutError:
                return
            with conn:
                self._transaction(conn)

    def long_lived(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            if conn is None:
                try:
                    conn = self._connect()
                except TimeoutError:
                    return
            if not self._transaction(conn):
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_a_restart_loses_no_transaction(serving: Serving, pg: PostgresCluster) -> None:
    """Process B starts on A's port (SO_REUSEPORT), A gets SIGTERM and drains: its clients
    finish their transactions and reconnect between them, to B."""
    old = serving.start()
    work = Workload(serving.url(), -secrets.randbelow(1 << 30) - 100)
    threads = [
        threading.Thread(target=run, daemon=True)
        for run in [work.short_lived] * 3 + [work.long_lived] * 3
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: work.committed >= 30, "transactions through process A")
        new = serving.start()
        assert old.stop() == 0
        after = work.committed
        wait_until(lambda: work.committed >= after + 30, "transactions through process B")
    finally:
        work.stop.set()
        for thread in threads:
            thread.join(EXIT_WAIT)
    assert work.failed == []
    assert work.reconnects > 0  # A's long-lived clients were told to go, between transactions
    count = pg.psql(f"SELECT count(*) FROM items WHERE client = {work.marker}", dbname=APP_DB)
    assert int(count) == work.committed
    assert new.stop() == 0
