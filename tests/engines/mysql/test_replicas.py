"""Read-only endpoints on MariaDB (GTID replication): reads go to the replica, a write there
is refused, and a replica whose replication stopped is skipped for the writer, read-only."""

from __future__ import annotations

from collections.abc import Iterator

import pymysql
import pytest

from dbmux.testing import MariaDBServer
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import wait_until
from tests.mysql_fixtures import (
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    dbmux_in_front,
    replicated_pair,
)

READ_ONLY_ERRORS = (1290, 1792)  # --read-only server; READ ONLY transaction


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[MariaDBServer, MariaDBServer]]:
    with replicated_pair() as servers:
        yield servers


@pytest.fixture(scope="module")
def dbmux(pair, tmp_path_factory) -> Iterator[EmbeddedDbmux]:
    read_only = {"listen": "127.0.0.1:0", "target_role": "READ_ONLY"}
    endpoints = [
        {"name": "ro", **read_only},
        {"name": "fresh-or-writer", **read_only, "max_replica_lag": 5, "fallback_to_writer": True},
    ]
    secrets_dir = tmp_path_factory.mktemp("my-readers")
    with dbmux_in_front(pair, secrets_dir, endpoints=endpoints) as running:
        targets = running.proxy().targets
        wait_until(lambda: all(i.role for i in targets.instances), "every target probed")
        yield running


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


def test_with_no_replica_fit_a_read_fails_after_the_borrow_timeout_naming_why(
    pair, tmp_path
) -> None:
    _, replica = pair
    fresh = {"name": "fresh", "listen": "127.0.0.1:0", "target_role": "READ_ONLY"}
    endpoints = [{**fresh, "max_replica_lag": 5}]
    pool = {"connection_borrow_timeout": 1}
    with dbmux_in_front(pair, tmp_path, pool=pool, endpoints=endpoints) as dbmux:
        instance = next(i for i in dbmux.proxy().targets.instances if i.target.port == replica.port)
        replica.sql("STOP SLAVE SQL_THREAD")
        try:
            wait_until(lambda: instance.is_replica and instance.lag is None, "lag unknown")
            with pytest.raises(pymysql.MySQLError) as refused:  # at login or at the query
                with connect(dbmux, "fresh") as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
            assert "no replica can serve read-only endpoint fresh" in str(refused.value)
            assert "max_replica_lag 5" in str(refused.value)
        finally:
            replica.sql("START SLAVE SQL_THREAD")
