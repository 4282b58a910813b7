"""transaction_replay on MariaDB: a transaction whose server connection died runs again on the
new writer when it cannot have committed and sees what the client saw; otherwise the client
gets the error it would have had without replay."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from dbmux.engines.mysql import wire
from dbmux.engines.mysql.replay import may_run_again
from dbmux.testing import MariaDBServer
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import WAIT, wait_until
from tests.mysql_fixtures import (
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    dbmux_in_front,
    replicated_pair,
)

Pair = tuple[MariaDBServer, MariaDBServer]


@pytest.fixture
def pair() -> Iterator[Pair]:
    with replicated_pair() as servers:
        yield servers


@pytest.fixture
def dbmux(pair, tmp_path: Path) -> Iterator[EmbeddedDbmux]:
    with dbmux_in_front(pair, tmp_path, transaction_replay=True) as running:
        targets = running.proxy().targets
        wait_until(lambda: targets.writer is not None, "a writer")
        yield running


def connect(dbmux: EmbeddedDbmux, autocommit: bool = False) -> pymysql.Connection:
    host, port = dbmux.address()
    return pymysql.connect(
        host=host,
        port=port,
        user=MY_USER,
        password=MY_PASSWORD,
        database=MY_DB,
        autocommit=autocommit,
    )


def switch_over(pair: Pair) -> None:
    """The replica has all the primary committed; then the primary stops and it takes over."""
    primary, replica = pair
    replica.wait_caught_up(primary)
    primary.stop()
    replica.promote()


def crash(pair: Pair) -> None:
    primary, replica = pair
    replica.wait_caught_up(primary)
    primary.kill()
    replica.promote()


def rows(server: MariaDBServer) -> str:
    return server.sql("SELECT GROUP_CONCAT(n ORDER BY n) FROM writes", MY_DB)


def test_an_open_transaction_goes_on_on_the_new_writer(dbmux, pair) -> None:
    _, replica = pair
    metrics = dbmux.proxy().metrics
    with connect(dbmux) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM writes")
        assert cur.fetchone() == (0,)
        cur.execute("INSERT INTO writes VALUES (1)")
        switch_over(pair)  # the uncommitted insert is lost with the old primary
        cur.execute("INSERT INTO writes VALUES (2)")  # no error: replayed first
        cur.execute("SELECT @@port")
        assert cur.fetchone() == (replica.port,)
        conn.commit()
    assert rows(replica) == "1,2"
    assert (metrics.transaction_replays.value, metrics.transaction_replays_failed.value) == (1, 0)


def test_a_transaction_that_would_see_other_data_is_not_replayed(dbmux, pair) -> None:
    primary, replica = pair
    metrics = dbmux.proxy().metrics
    with connect(dbmux) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM writes")
        assert cur.fetchone() == (0,)
        primary.sql("INSERT INTO writes VALUES (7)", MY_DB)  # another client's commit
        switch_over(pair)
        with pytest.raises(pymysql.OperationalError) as lost:
            cur.execute("INSERT INTO writes VALUES (8)")
        assert lost.value.args[0] == 2013
        assert "result differs" in lost.value.args[1]
        cur.execute("INSERT INTO writes VALUES (9)")  # the client goes on
        conn.commit()
    assert rows(replica) == "7,9"
    assert (metrics.transaction_replays.value, metrics.transaction_replays_failed.value) == (1, 1)


def test_a_read_in_flight_is_answered_by_the_new_writer(dbmux, pair) -> None:
    with connect(dbmux, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO writes VALUES (3)")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = pool.submit(cur.execute, "SELECT SLEEP(2), COUNT(*) FROM writes")
            wait_until(lambda: busy_sessions(pair[0]) == 1, "the read running")
            crash(pair)
            read.result(timeout=WAIT)  # no error
        assert cur.fetchone() == (0, 1)


def test_a_write_in_flight_with_autocommit_is_not_replayed(dbmux, pair) -> None:
    """Its outcome is unknown (it may have committed): the client is told, as without
    replay."""
    _, replica = pair
    with connect(dbmux, autocommit=True) as conn, conn.cursor() as cur:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            write = pool.submit(
                cur.execute, "INSERT INTO writes SELECT 4 FROM (SELECT SLEEP(2)) AS s"
            )
            wait_until(lambda: busy_sessions(pair[0]) == 1, "the write running")
            crash(pair)
            with pytest.raises(pymysql.OperationalError) as lost:
                write.result(timeout=WAIT)
        assert lost.value.args[0] == 2013
    assert rows(replica) is None or "4" not in rows(replica)


def busy_sessions(server: MariaDBServer) -> int:
    """Sessions on `server` (other than this one) running a SLEEP(2)."""
    query = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
        " AND COMMAND = 'Query' AND INFO LIKE '%SLEEP(2)%'"
    )
    return int(server.sql(query))


def test_prepared_statements_of_the_transaction_are_replayed_too(dbmux, pair) -> None:
    _, replica = pair
    host, port = dbmux.address()
    conn = mysql.connector.connect(
        host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=MY_DB, use_pure=True
    )
    cur = conn.cursor(prepared=True)
    cur.execute("SELECT COUNT(*) FROM writes WHERE n > ?", (0,))
    assert cur.fetchall() == [(0,)]
    cur.execute("INSERT INTO writes VALUES (?)", (5,))
    switch_over(pair)
    cur.execute("INSERT INTO writes VALUES (?)", (6,))
    conn.commit()
    conn.close()
    assert rows(replica) == "5,6"
    assert dbmux.proxy().metrics.transaction_replays_failed.value == 0


AUTOCOMMIT, IN_TRANSACTION = wire.SERVER_STATUS_AUTOCOMMIT, wire.SERVER_STATUS_IN_TRANS


@pytest.mark.parametrize(
    ("sql", "status", "may"),
    [
        ("SELECT COUNT(*) FROM writes WHERE n IN (1, 2)", AUTOCOMMIT, True),
        ("/* report */ WITH w AS (SELECT n FROM writes) SELECT MAX(n) FROM w", AUTOCOMMIT, True),
        ("SELECT add_row(1)", AUTOCOMMIT, False),  # a stored function may write and commit
        ("SELECT add_row(1)", AUTOCOMMIT | IN_TRANSACTION, True),  # ...uncommitted here
        ("INSERT INTO writes VALUES (1)", AUTOCOMMIT, False),  # it is its own commit
        ("INSERT INTO writes VALUES (1)", AUTOCOMMIT | IN_TRANSACTION, True),
        ("UPDATE writes SET n = 2", 0, True),  # autocommit off: nothing commits by itself
        ("COMMIT", AUTOCOMMIT | IN_TRANSACTION, False),
        ("CREATE TABLE t (n INT)", AUTOCOMMIT | IN_TRANSACTION, False),  # an implicit commit
        ("CALL procedure_that_may_commit()", AUTOCOMMIT | IN_TRANSACTION, False),
        ("SELECT * FROM writes INTO OUTFILE '/tmp/x'", AUTOCOMMIT | IN_TRANSACTION, False),
    ],
)
def test_which_command_in_flight_may_run_again(sql: str, status: int, may: bool) -> None:
    request = (bytes((wire.COM_QUERY,)) + sql.encode(), None, None, None)
    assert may_run_again(request, status) is may


def test_a_select_that_calls_a_stored_function_is_not_replayed(dbmux, pair) -> None:
    """With autocommit on, the function may have written and committed before the crash."""
    primary, _ = pair
    for server in pair:
        server.sql("SET GLOBAL log_bin_trust_function_creators = 1")
    primary.sql(
        "DELIMITER //\nCREATE FUNCTION add_row(v INT) RETURNS INT MODIFIES SQL DATA"
        " BEGIN INSERT INTO writes VALUES (v); DO SLEEP(2); RETURN v; END //",
        MY_DB,
    )
    with connect(dbmux, autocommit=True) as conn, conn.cursor() as cur:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(cur.execute, "SELECT add_row(11)")
            wait_until(lambda: busy_sessions(primary) == 1, "the function running")
            crash(pair)
            with pytest.raises(pymysql.OperationalError) as lost:
                call.result(timeout=WAIT)
        assert lost.value.args[0] == 2013
    assert dbmux.proxy().metrics.transaction_replays.value == 0
