"""Read-only endpoints on MariaDB (GTID replication): reads go to the replica, a write there
is refused, and a replica whose replication stopped is skipped for the writer, read-only."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pymysql
import pytest

from dbmux.embedded import EmbeddedDbmux
from dbmux.testing import MariaDBServer
from tests.engines.mysql.conftest import MY_DB, MY_PASSWORD, MY_USER, replicated_pair

WAIT = 30.0
READ_ONLY_ERRORS = (1290, 1792)  # --read-only server; READ ONLY transaction


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[MariaDBServer, MariaDBServer]]:
    with replicated_pair() as servers:
        yield servers


@pytest.fixture(scope="module")
def dbmux(pair, tmp_path_factory) -> Iterator[EmbeddedDbmux]:
    primary, replica = pair
    secret = tmp_path_factory.mktemp("my-readers") / "app.json"
    secret.write_text(json.dumps({"username": MY_USER, "password": MY_PASSWORD}))
    endpoint = {"listen": "127.0.0.1:0", "target_role": "READ_ONLY"}
    config = {
        "proxies": [
            {
                "name": "my-readers",
                "engine_family": "MYSQL",
                "listen": "127.0.0.1:0",
                "auth": [{"secret": f"file:{secret}"}],
                "target_group": {
                    "probe_interval": 0.2,
                    "connection_pool_config": {
                        "max_connections_percent": 20,
                        "connection_borrow_timeout": WAIT,
                    },
                    "targets": [
                        {"host": primary.host, "port": primary.port},
                        {"host": replica.host, "port": replica.port},
                    ],
                },
                "endpoints": [
                    {"name": "ro", **endpoint},
                    {
                        "name": "fresh-or-writer",
                        **endpoint,
                        "max_replica_lag": 5,
                        "fallback_to_writer": True,
                    },
                ],
            }
        ]
    }
    with EmbeddedDbmux(config) as running:
        targets = running.proxy().targets
        wait_until(lambda: all(i.role for i in targets.instances), "every target probed")
        yield running


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {WAIT} s: {what}")
        time.sleep(0.05)


def connect(dbmux: EmbeddedDbmux, endpoint: str) -> pymysql.Connection:
    host, port = dbmux.address(endpoint=endpoint)
    return pymysql.connect(
        host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB, autocommit=True
    )


def served_by(conn: pymysql.Connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT @@port")
        return cur.fetchone()[0]


def test_reads_go_to_the_replica_and_a_write_is_refused(dbmux, pair) -> None:
    primary, replica = pair
    with connect(dbmux, "ro") as conn:
        assert served_by(conn) == replica.port
        with pytest.raises(pymysql.MySQLError) as refused, conn.cursor() as cur:
            cur.execute("INSERT INTO writes VALUES (1)")
        assert refused.value.args[0] in READ_ONLY_ERRORS
        assert served_by(conn) == replica.port  # the client goes on
    assert primary.sql("SELECT COUNT(*) FROM writes", MY_DB) == "0"


def test_a_replica_that_stopped_replicating_is_skipped(dbmux, pair) -> None:
    primary, replica = pair
    instance = next(i for i in dbmux.proxy().targets.instances if i.target.port == replica.port)
    wait_until(lambda: instance.lag is not None, "the replica's lag measured")
    with connect(dbmux, "fresh-or-writer") as conn:
        assert served_by(conn) == replica.port
    replica.sql("STOP SLAVE SQL_THREAD")
    try:
        wait_until(lambda: instance.lag is None, "the replica's lag unknown")
        with connect(dbmux, "fresh-or-writer") as conn:
            assert served_by(conn) == primary.port
            with pytest.raises(pymysql.MySQLError) as refused, conn.cursor() as cur:
                cur.execute("INSERT INTO writes VALUES (2)")  # the writer, read-only
            assert refused.value.args[0] in READ_ONLY_ERRORS
            cur = conn.cursor()
            cur.execute("SELECT @@session.tx_read_only")
            assert cur.fetchone() == (1,)
    finally:
        replica.sql("START SLAVE SQL_THREAD")
    assert primary.sql("SELECT COUNT(*) FROM writes", MY_DB) == "0"
