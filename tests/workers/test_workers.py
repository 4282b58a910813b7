"""`dbmux serve` with workers: 2, as operators run it: the workers share one listening port and
ONE connection budget per target, a cancel request or KILL reaches the worker that owns the
client whichever worker it lands on, a worker that dies is started again and the slots it
held return, and one admin API and /metrics speak for all of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import yaml

import dbmux
from dbmux.auth.scram import ScramClient
from dbmux.engines.base import owner_of
from dbmux.testing import MariaDBServer, PostgresCluster
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    group_config,
    proxy_config,
    server_connections,
    wait_until,
)
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, my_proxy_config
from tests.mysql_fixtures import server_connections as my_server_connections
from tests.pgraw import AUTH_SASL, AUTH_SASL_CONTINUE, RawClient, sasl_initial_response

pytestmark = pytest.mark.timeout(180)

WORKERS = 2
POOL = 10  # 20% of the test servers' max_connections (50)
EXIT_WAIT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """A `dbmux serve` supervisor with its workers, in a child process."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    admin_port: int

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, count: int = 1) -> None:
        wait_until(
            lambda: self.text().count(text) >= count or self.process.poll() is not None,
            f"dbmux logs {text!r} {count} times",
        )
        assert self.text().count(text) >= count, self.text()

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = answer.read()
        return json.loads(body) if path.startswith("/api") else body.decode()

    def post(self, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Served]]:
    """serve(config): `dbmux serve` with WORKERS workers and an admin port, until the test
    ends."""
    started: list[Served] = []

    def start(config: dict[str, Any]) -> Served:
        port, admin_port = _free_port(), _free_port()
        config = {**config, "workers": WORKERS, "admin": {"listen": f"127.0.0.1:{admin_port}"}}
        config["proxies"][0]["listen"] = f"127.0.0.1:{port}"
        path = tmp_path / f"dbmux-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = path.with_suffix(".log")
        env = {**os.environ, "PYTHONPATH": str(Path(dbmux.__file__).parents[1])}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "dbmux", "serve", "-c", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        served = Served(process, log, port, admin_port)
        started.append(served)
        served.wait_for("ready")
        assert len(served.worker_pids()) == WORKERS
        return served

    yield start
    for served in started:
        pids = served.worker_pids() if served.process.poll() is None else []
        served.process.send_signal(signal.SIGTERM)
        try:
            assert served.process.wait(EXIT_WAIT) == 0
        finally:
            served.process.kill()
            for pid in pids:  # a worker outliving its supervisor would hold the port
                wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), "worker exits")


def _pg_config(pg: PostgresCluster, tmp_path: Path, **pool: Any) -> dict[str, Any]:
    return proxy_config(pg, tmp_path, {"connection_borrow_timeout": 30, **pool}, [])


def _pg(served: Served, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1",
        port=served.port,
        user=APP_USER,
        password=APP_PASSWORD,
        dbname=APP_DB,
        connect_timeout=30,
        **kwargs,
    )


def test_the_workers_share_one_budget_that_a_storm_never_exceeds(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    """Clients on both workers, far more than the pool, each running transactions that hold
    their server connection a while: the database never sees more than the one pool."""
    served = serve(_pg_config(pg, tmp_path))
    seen: list[int] = []
    owners: set[int] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(server_connections(pg))
            time.sleep(0.02)

    def client(_: int) -> None:
        with _pg(served) as conn:
            owners.add(owner_of(conn.info.backend_pid))
            for _ in range(5):
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.05)")

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            list(pool.map(client, range(80)))
    finally:
        stop.set()
        sampler.join()
    assert owners == set(range(WORKERS)), "every worker served clients"
    assert max(seen) <= POOL, f"at most {POOL} server connections, saw {max(seen)}"
    metrics = served.get("/metrics")
    assert f'dbmux_max_database_connections_allowed{{proxy="test"}} {POOL}' in metrics


def test_a_cancel_request_reaches_the_client_whichever_worker_it_lands_on(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    """libpq sends a cancel on a new connection, which the kernel hands to either worker:
    over a dozen cancels, some land on the other worker (all on the owner: 1 in 4,096) and
    must be forwarded to the owner, or the query runs its 30 s and the test fails."""
    served = serve(_pg_config(pg, tmp_path))
    owners = set()
    for _ in range(12):
        with _pg(served, autocommit=True) as conn:
            owners.add(owner_of(conn.info.backend_pid))
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            timer.join()
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert owners == set(range(WORKERS))


def test_a_worker_that_dies_is_started_again_and_its_share_returns(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    served = serve(_pg_config(pg, tmp_path))
    held = [_pg(served) for _ in range(POOL)]
    for conn in held:  # every slot held: a transaction open on each client
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    victim = served.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    served.wait_for("starting it again")
    served.wait_for("started again")
    assert victim not in served.worker_pids() and len(served.worker_pids()) == WORKERS
    metrics = served.get("/metrics")
    assert "dbmux_worker_restarts_total 1" in metrics
    assert f"dbmux_workers {WORKERS}" in metrics
    for conn in held:
        conn.close()
    # All of the pool again, for clients on both workers: if the dead worker's slots had
    # not come back, the clients beyond what is left would wait out their borrow timeout.
    clients = [_pg(served) for _ in range(2 * POOL)]
    owners = {owner_of(c.info.backend_pid) for c in clients}
    opened = clients[:POOL]
    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(lambda c: (c.execute("BEGIN"), c.execute("SELECT 1")), opened))
    assert server_connections(pg) == POOL
    assert owners == set(range(WORKERS))
    for conn in clients:
        conn.close()


def test_one_admin_api_and_metrics_page_speak_for_every_worker(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    served = serve(_pg_config(pg, tmp_path))
    clients = [_pg(served) for _ in range(8)]
    owners = {owner_of(c.info.backend_pid) for c in clients}
    assert owners == set(range(WORKERS))
    listed = served.get("/api/proxies/test/clients")["Clients"]
    assert len(listed) == len(clients) and len({c["Id"] for c in listed}) == len(clients)
    metrics = served.get("/metrics")
    assert f'dbmux_client_connections{{endpoint="default",proxy="test"}} {len(clients)}' in metrics
    # Closing a client by id finds it on whichever worker has it.
    for row in listed:
        assert served.post(f"/api/proxies/test/clients/{row['Id']}/close")["Closed"] is True
    for conn in clients:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()
    assert served.get("/api/proxies/test/clients")["Clients"] == []


def test_kill_reaches_the_client_on_another_worker(
    mariadb: MariaDBServer, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    """The connection id a client is given names its worker, so a KILL from a client of
    the other worker is carried to it: KILL QUERY stops the query, KILL ends the session,
    and an id nobody holds is refused as MariaDB refuses it."""
    config = my_proxy_config(mariadb, tmp_path, {"connection_borrow_timeout": 30}, [])
    served = serve(config)

    def connect() -> Any:
        return pymysql.connect(
            host="127.0.0.1",
            port=served.port,
            user=MY_USER,
            password=MY_PASSWORD,
            database=MY_DB,
            autocommit=True,
            read_timeout=60,
        )

    victim = connect()
    killers = []
    killer = connect()
    while owner_of(killer.thread_id()) == owner_of(victim.thread_id()):
        killers.append(killer)  # keep it open, so the next lands elsewhere or not at random
        killer = connect()
    outcome: list[Any] = []

    def sleep() -> None:
        try:
            with victim.cursor() as cursor:
                cursor.execute("SELECT SLEEP(30)")
                outcome.append(cursor.fetchone())
        except pymysql.err.OperationalError as error:
            outcome.append(error.args[0])

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    wait_until(
        lambda: "SLEEP(30)" in mariadb.sql("SHOW FULL PROCESSLIST"), "the query runs on MariaDB"
    )
    killer.cursor().execute(f"KILL QUERY {victim.thread_id()}")
    sleeper.join(20)
    assert not sleeper.is_alive(), "KILL QUERY stopped the query"
    assert outcome in ([(1,)], [1317])  # SLEEP's "interrupted", or the query's error
    with victim.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)  # KILL QUERY leaves the session
    killer.cursor().execute(f"KILL {victim.thread_id()}")
    with pytest.raises(pymysql.err.OperationalError):
        victim.cursor().execute("SELECT 1")
    other_worker_id = ((1 - owner_of(killer.thread_id())) << 24) | 0xFFFFF
    with pytest.raises(pymysql.err.OperationalError) as refused:
        killer.cursor().execute(f"KILL QUERY {other_worker_id}")
    assert refused.value.args[0] == 1094
    for conn in [killer, *killers]:
        conn.close()
    wait_until(lambda: my_server_connections(mariadb) <= POOL, "within the pool")


def test_every_worker_follows_a_failover(
    cluster: tuple[PostgresCluster, PostgresCluster],
    tmp_path: Path,
    serve: Callable[[dict[str, Any]], Served],
) -> None:
    """Clients of both workers keep their connections through a failover, and their next
    writes land on the new writer; no acknowledged write is lost."""
    primary, replica = cluster
    served = serve(group_config("POSTGRESQL", cluster, tmp_path, APP_USER, APP_PASSWORD))
    clients = [_pg(served, autocommit=True) for _ in range(6)]
    assert {owner_of(c.info.backend_pid) for c in clients} == set(range(WORKERS))
    acknowledged = []
    for n, conn in enumerate(clients):
        conn.execute("INSERT INTO writes VALUES (%s)", (n,))
        acknowledged.append(n)
    primary.stop()
    replica.promote()
    for n, conn in enumerate(clients, start=len(clients)):
        conn.execute("INSERT INTO writes VALUES (%s)", (n,))
        acknowledged.append(n)
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    committed = replica.psql(
        "SELECT string_agg(n::text, ',' ORDER BY n) FROM writes", dbname=APP_DB
    )
    assert committed == ",".join(map(str, acknowledged))
    targets = served.get("/api/proxies/group/targets")["Targets"]
    writers = [
        t["Port"]
        for t in targets
        if t["Role"] == "READ_WRITE" and t["TargetHealth"]["State"] == "AVAILABLE"
    ]
    assert writers == [replica.port]
    for conn in clients:
        conn.close()


def test_a_name_gets_the_same_salt_whichever_worker_answers(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    """A name's SCRAM salt is fixed, known user or not, so that it tells nothing about who
    exists: the workers share what it is derived from. Over 16 logins per name, both
    workers answer (all on one: 1 in 32,768)."""
    served = serve(_pg_config(pg, tmp_path))

    async def salt(user: str) -> bytes:
        async with await RawClient.connect("127.0.0.1", served.port) as client:
            sasl = await client.start(user, APP_DB)
            assert sasl.kind == b"R" and sasl.auth_code == AUTH_SASL
            await client.send(sasl_initial_response(ScramClient("guess").client_first()))
            cont = await client.read_message()
            assert cont.kind == b"R" and cont.auth_code == AUTH_SASL_CONTINUE
            fields = dict(f.split(b"=", 1) for f in cont.payload[4:].split(b","))
            return fields[b"s"]

    async def salts(user: str) -> set[bytes]:
        return set(await asyncio.gather(*(salt(user) for _ in range(16))))

    assert len(asyncio.run(salts(APP_USER))) == 1
    assert len(asyncio.run(salts("nobody-at-all"))) == 1


def test_a_worker_holding_the_pool_idle_sheds_it_for_another_workers_clients(
    pg: PostgresCluster, tmp_path: Path, serve: Callable[[dict[str, Any]], Served]
) -> None:
    """Worker 0's clients fill the pool and leave it idle there; worker 1's clients then
    get their share at once (worker 0 closes idle connections for them) instead of waiting
    out connection_borrow_timeout while the budget sits idle in another process."""
    served = serve(_pg_config(pg, tmp_path, connection_borrow_timeout=10))
    clients = [_pg(served) for _ in range(4 * POOL)]
    by_worker = {w: [c for c in clients if owner_of(c.info.backend_pid) == w] for w in (0, 1)}
    assert len(by_worker[0]) >= POOL and len(by_worker[1]) >= POOL // 2, "both have clients"

    def begin(conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")

    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(begin, by_worker[0][:POOL]))
    assert server_connections(pg) == POOL
    for conn in by_worker[0][:POOL]:
        conn.execute("COMMIT")  # the whole pool idle, in worker 0
    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(begin, by_worker[1][: POOL // 2]))  # would time out after 10 s
    assert server_connections(pg) <= POOL
    for conn in clients:
        conn.close()
