"""The MySQL engine follows a MariaDB failover (GTID replication, the replica promoted):
clients keep their connections and their next transactions run on the new writer."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from dbmux.config import TargetRole
from dbmux.targets import TargetHealth
from dbmux.testing import MariaDBServer
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import WAIT, wait_until, writer_port
from tests.mysql_fixtures import (
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    dbmux_in_front,
    replicated_pair,
)


@pytest.fixture
def pair() -> Iterator[tuple[MariaDBServer, MariaDBServer]]:
    with replicated_pair() as servers:
        yield servers


@pytest.fixture
def dbmux(pair, tmp_path: Path) -> Iterator[EmbeddedDbmux]:
    with dbmux_in_front(pair, tmp_path) as running:
        yield running


def test_a_client_lives_through_a_switchover(dbmux: EmbeddedDbmux, pair) -> None:
    primary, replica = pair
    targets = dbmux.proxy().targets
    wait_until(lambda: all(i.health is TargetHealth.AVAILABLE for i in targets.instances), "probed")
    roles = {i.target.port: i.role for i in targets.instances}
    assert roles == {primary.port: TargetRole.READ_WRITE, replica.port: TargetRole.READ_ONLY}
    host, port = dbmux.address()
    conn = pymysql.connect(
        host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB, autocommit=True
    )
    acknowledged = []
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO writes VALUES (0)")
        acknowledged.append(0)
        replica.wait_caught_up(primary)
        primary.stop()
        replica.promote()
        for n in range(1, 11):  # no reconnect: the proxy found the new writer
            cur.execute("INSERT INTO writes VALUES (%s)", (n,))
            acknowledged.append(n)
        cur.execute("SELECT @@port")
        assert cur.fetchone() == (replica.port,)
    rows = replica.sql("SELECT GROUP_CONCAT(n ORDER BY n) FROM writes", MY_DB)
    assert rows == ",".join(map(str, acknowledged))
    assert targets.writer is not None and targets.writer.target.port == replica.port


def test_a_write_refused_by_a_writer_turned_read_only_runs_on_the_next_writer(
    dbmux: EmbeddedDbmux, pair
) -> None:
    """A switchover begins with the old primary read-only: a write it refuses (1290, before
    running it) waits for the promoted replica instead of failing."""
    primary, replica = pair
    targets = dbmux.proxy().targets
    wait_until(lambda: targets.writer is not None, "a writer")
    host, port = dbmux.address()
    conn = pymysql.connect(
        host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB, autocommit=True
    )
    with conn, conn.cursor() as cur, concurrent.futures.ThreadPoolExecutor(1) as pool:
        cur.execute("INSERT INTO writes VALUES (1)")
        primary.sql("SET GLOBAL read_only = 1")
        write = pool.submit(cur.execute, "INSERT INTO writes VALUES (2)")
        wait_until(lambda: targets.writer is None, "the read-only writer noticed")
        assert not write.done(), "the refused write was answered before a new writer came"
        replica.wait_caught_up(primary)
        replica.promote()
        write.result(timeout=WAIT)  # no error: it ran on the new writer
        cur.execute("SELECT @@port")
        assert cur.fetchone() == (replica.port,)
    assert replica.sql("SELECT GROUP_CONCAT(n ORDER BY n) FROM writes", MY_DB) == "1,2"


def test_a_write_refused_inside_a_transaction_is_reported(dbmux: EmbeddedDbmux, pair) -> None:
    """Inside a transaction the refusal is the client's to handle: what ran before it in the
    transaction is on the old writer only."""
    primary, _ = pair
    targets = dbmux.proxy().targets
    wait_until(lambda: targets.writer is not None, "a writer")
    host, port = dbmux.address()
    conn = pymysql.connect(host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB)
    with conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT COUNT(*) FROM writes")
        primary.sql("SET GLOBAL read_only = 1")
        with pytest.raises(pymysql.MySQLError) as refused:
            cur.execute("INSERT INTO writes VALUES (3)")
        assert refused.value.args[0] == 1290
    primary.sql("SET GLOBAL read_only = 0")


def test_the_old_writer_back_as_a_replica_joins_the_read_only_side(pair, tmp_path) -> None:
    primary, replica = pair
    read_only = {"name": "ro", "listen": "127.0.0.1:0", "target_role": "READ_ONLY"}
    with dbmux_in_front(pair, tmp_path, endpoints=[read_only]) as dbmux:
        targets = dbmux.proxy().targets
        wait_until(lambda: all(i.role for i in targets.instances), "every target probed")
        host, port = dbmux.address(endpoint="ro")

        def served_by_ro() -> int:
            with (
                pymysql.connect(
                    host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB
                ) as conn,
                conn.cursor() as cur,
            ):
                cur.execute("SELECT @@port")
                return cur.fetchone()[0]

        assert served_by_ro() == replica.port
        replica.wait_caught_up(primary)
        primary.stop()
        replica.promote()

        wait_until(lambda: writer_port(dbmux) == replica.port, "the promoted replica as writer")
        primary.start()  # back, and (for now) writable: a split brain dbmux does not follow
        primary.sql("SET GLOBAL read_only = 1")
        primary.replicate_from(replica)
        wait_until(lambda: served_by_ro() == primary.port, "the old writer serving reads")
        assert writer_port(dbmux) == replica.port
