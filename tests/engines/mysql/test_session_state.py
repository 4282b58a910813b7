"""Session state follows each MySQL client from one server connection to the next, and never
reaches another client: system variables, user variables (with their types), the current
schema and LAST_INSERT_ID(), through a pool of one shared connection."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest

from tests.mysql_fixtures import MyProxy


@pytest.fixture
def shared(start_my_proxy: Callable[..., MyProxy]) -> MyProxy:
    """2% of max_connections 50: every client shares one server connection."""
    return start_my_proxy(pool={"max_connections_percent": 2})


def one(conn, sql: str, args: tuple = ()):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def test_a_session_variable_follows_its_client_and_no_other(shared: MyProxy) -> None:
    with shared.connect() as a, shared.connect() as b:
        default = one(b, "SELECT @@time_zone")[0]
        one(a, "SET time_zone = '+05:30'")
        assert one(b, "SELECT @@time_zone") == (default,)
        assert one(a, "SELECT @@time_zone") == ("+05:30",)
        one(b, "SET SESSION sql_mode = 'ANSI_QUOTES'")
        assert one(a, "SELECT @@sql_mode") != ("ANSI_QUOTES",)
        assert one(b, "SELECT @@sql_mode") == ("ANSI_QUOTES",)
    assert shared.metrics.pins() == 0


def test_user_variables_keep_their_values_and_types(shared: MyProxy) -> None:
    with shared.connect() as a, shared.connect() as b:
        one(a, "SET @i = 42, @d = 1.50, @f = 2.5e0, @s = 'héllo', @b = X'00ff', @n = NULL")
        one(b, "SELECT 1")  # the connection serves someone else in between
        assert one(b, "SELECT @i, @s") == (None, None)
        i, d, f, s, b_, n = one(a, "SELECT @i, @d, @f, @s, @b, @n")
        assert (i, d, f, s, b_, n) == (42, Decimal("1.50"), 2.5, "héllo", b"\x00\xff", None)
        assert one(a, "SELECT @i + 1, @s = 'HÉLLO'") == (43, 1)  # integer; case-insensitive
        one(a, "SELECT @counter := 10")
        assert one(a, "SELECT @counter") == (10,)


def test_the_current_schema_follows_use_and_init_db(shared: MyProxy, mariadb) -> None:
    mariadb.sql("CREATE DATABASE IF NOT EXISTS other; GRANT ALL ON other.* TO 'app'@'%'")
    with shared.connect() as a, shared.connect() as b:
        one(a, "USE other")
        assert one(b, "SELECT DATABASE()") == ("app",)
        assert one(a, "SELECT DATABASE()") == ("other",)
        b.select_db("other")  # COM_INIT_DB
        a.select_db("app")
        assert one(b, "SELECT DATABASE()") == ("other",)
        assert one(a, "SELECT DATABASE()") == ("app",)


def test_last_insert_id_is_the_clients_own(shared: MyProxy) -> None:
    with shared.connect() as a, shared.connect() as b:
        with a.cursor() as cur:
            cur.execute("INSERT INTO items (client, note) VALUES (1, 'a')")
            mine = cur.lastrowid
        with b.cursor() as cur:
            cur.execute("INSERT INTO items (client, note) VALUES (2, 'b')")
            theirs = cur.lastrowid
        assert theirs != mine
        assert one(a, "SELECT LAST_INSERT_ID()") == (mine,)
        assert one(b, "SELECT LAST_INSERT_ID()") == (theirs,)


def test_autocommit_off_keeps_the_transaction_on_one_connection(shared: MyProxy) -> None:
    with shared.connect(autocommit=False) as a, shared.connect() as b:
        one(a, "INSERT INTO items (client, note) VALUES (60003, 'uncommitted')")
        # b waits for the pool's only connection, which a's open transaction holds.
        a.rollback()
        assert one(b, "SELECT COUNT(*) FROM items WHERE client = 60003") == (0,)
        assert one(a, "SELECT @@autocommit") == (0,)
        assert one(b, "SELECT @@autocommit") == (1,)


def test_a_failed_set_changes_nothing(shared: MyProxy) -> None:
    import pymysql

    with shared.connect() as a:
        one(a, "SET time_zone = '+01:00'")
        with pytest.raises(pymysql.err.OperationalError):
            one(a, "SET time_zone = 'Not/AZone'")
        assert one(a, "SELECT @@time_zone") == ("+01:00",)


def test_reset_connection_starts_the_session_over(shared: MyProxy) -> None:
    with shared.connect() as a:
        one(a, "SET @x = 5, time_zone = '+02:00'")
        a._execute_command(0x1F, b"")  # COM_RESET_CONNECTION
        a._read_ok_packet()
        assert one(a, "SELECT @x, @@time_zone = @@GLOBAL.time_zone") == (None, 1)


def test_session_state_pin_mode_pins_on_set_as_rds_proxy_does(
    start_my_proxy: Callable[..., MyProxy],
) -> None:
    proxy = start_my_proxy(session_state="pin")
    with proxy.connect() as a:
        one(a, "SET time_zone = '+05:00'")
        assert one(a, "SELECT @@time_zone") == ("+05:00",)
    assert proxy.metrics.pins("set_variable") == 1


def test_the_session_isolation_level_is_carried(shared: MyProxy) -> None:
    with shared.connect() as a, shared.connect() as b:
        one(a, "SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        assert one(b, "SELECT @@tx_isolation") == ("REPEATABLE-READ",)
        assert one(a, "SELECT @@tx_isolation") == ("SERIALIZABLE",)
    assert shared.metrics.pins() == 0
