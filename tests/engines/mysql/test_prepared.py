"""Binary-protocol prepared statements without pinning: the proxy gives clients its own
statement ids, prepares lazily on whichever server connection a client borrows, shares
statements by text, and supplies parameter types an execute does not resend."""

from __future__ import annotations

import threading
from collections.abc import Callable

import mysql.connector
import pytest

from dbmux.engines.mysql import handshake, wire
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy


@pytest.fixture
def small(start_my_proxy: Callable[..., MyProxy]) -> MyProxy:
    """A pool of two connections, prepared-statement cache of 3 per connection."""
    return start_my_proxy(pool={"max_connections_percent": 4, "max_prepared_statements": 3})


def test_many_clients_prepare_and_execute_through_two_connections(small: MyProxy) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            conn = small.connector(autocommit=True)
            try:
                cur = conn.cursor(prepared=True)
                for i in range(15):
                    cur.execute(f"SELECT ? + {i % 5}, ?", (n, f"c{n}"))  # 5 texts, cache of 3
                    assert cur.fetchall() == [(n + i % 5, f"c{n}")]
            finally:
                conn.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert small.metrics.pins() == 0
    assert small.pools.budget.open <= 2


def test_the_servers_statements_stay_within_the_cache(small: MyProxy, mariadb) -> None:
    conn = small.connector(autocommit=True)
    try:
        cur = conn.cursor(prepared=True)
        for i in range(10):
            cur.execute(f"SELECT ? * {i}", (2,))
            cur.fetchall()
    finally:
        conn.close()
    count = mariadb.sql("SHOW GLOBAL STATUS LIKE 'Prepared_stmt_count'").split("\t")[1]
    assert int(count) <= 2 * 3  # two connections, three each


async def test_an_execute_that_does_not_resend_types_works_on_another_connection(
    start_my_proxy: Callable[..., MyProxy],
) -> None:
    """The client sends the parameter types once; its next execute (new-params-bound 0)
    lands on a connection whose statement never saw them: the proxy adds them."""
    proxy = start_my_proxy(pool={"max_connections_percent": 4})
    async with (
        await RawMy.connect(proxy.host, proxy.port) as raw,
        await RawMy.connect(proxy.host, proxy.port) as other,
    ):
        assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
        assert (await other.login(MY_USER, MY_PASSWORD, MY_DB))[1][:1] == b"\0"
        raw.command(b"\x16SELECT ? + 1")
        reply = await raw.response(wire.RESPONSE_PREPARE)
        statement = wire.parse_prepare_ok(reply[0]).statement_id
        head = b"\x17" + statement.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
        raw.command(head + b"\0\x01\x08\x00" + (41).to_bytes(8, "little"))  # LONGLONG 41
        first = await raw.response()
        # Keep the first connection busy in a transaction so the next execute moves.
        assert (await other.query("BEGIN"))[0][:1] == b"\0"
        await other.query("SELECT 1")
        raw.command(head + b"\0\x00" + (9).to_bytes(8, "little"))  # types not resent
        second = await raw.response()
        await other.query("COMMIT")
    # A binary row: header, NULL bitmap, then the LONGLONG.
    assert first[-2] == b"\0\0" + (42).to_bytes(8, "little")
    assert second[-2] == b"\0\0" + (10).to_bytes(8, "little"), second
    assert proxy.pools.budget.open == 2  # the second execute ran on the other connection


def test_an_unknown_statement_id_is_an_error_and_the_client_goes_on(my_proxy: MyProxy) -> None:
    conn = my_proxy.connector(autocommit=True)
    try:
        with pytest.raises(mysql.connector.Error) as caught:
            conn.cmd_stmt_execute(12345, (), ())
        assert caught.value.errno == 1243
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
    finally:
        conn.close()


def test_a_statement_that_cannot_be_prepared_reports_the_servers_error(my_proxy: MyProxy):
    conn = my_proxy.connector(autocommit=True)
    try:
        cur = conn.cursor(prepared=True)
        with pytest.raises(mysql.connector.Error) as caught:
            cur.execute("SELECT * FROM no_such_table WHERE id = ?", (1,))
        assert caught.value.errno == 1146
    finally:
        conn.close()


async def test_mariadb_bulk_execute_gets_its_types_on_another_connection_too(
    start_my_proxy: Callable[..., MyProxy],
) -> None:
    """COM_STMT_BULK_EXECUTE (MariaDB): many rows in one command, types sent once."""
    proxy = start_my_proxy(pool={"max_connections_percent": 4})
    bulk_caps = (
        (handshake.SERVER_BASE_CAPABILITIES & ~handshake.CLIENT_LONG_PASSWORD)
        | handshake.MARIADB_CLIENT_STMT_BULK_OPERATIONS
        | handshake.CLIENT_MULTI_RESULTS
    )
    async with (
        await RawMy.connect(proxy.host, proxy.port) as raw,
        await RawMy.connect(proxy.host, proxy.port) as other,
    ):
        # Both clients ask for bulk operations: they share one pool of two connections.
        assert (await raw.login(MY_USER, MY_PASSWORD, MY_DB, bulk_caps))[1][:1] == b"\0"
        assert raw.greeting is not None
        assert raw.greeting.capabilities & handshake.MARIADB_CLIENT_STMT_BULK_OPERATIONS
        assert (await other.login(MY_USER, MY_PASSWORD, MY_DB, bulk_caps))[1][:1] == b"\0"
        raw.command(b"\x16INSERT INTO items (client, note) VALUES (?, ?)")
        statement = wire.parse_prepare_ok((await raw.response(wire.RESPONSE_PREPARE))[0])

        def rows(*values: tuple[int, bytes]) -> bytes:
            return b"".join(
                b"\0" + n.to_bytes(8, "little") + b"\0" + wire.lenenc_str(note)
                for n, note in values
            )

        head = b"\xfa" + statement.statement_id.to_bytes(4, "little")
        types = b"\x08\x00\xfd\x00"  # LONGLONG, VAR_STRING
        raw.command(
            head + (128).to_bytes(2, "little") + types + rows((61_000, b"a"), (61_000, b"b"))
        )
        assert (await raw.response())[0][:1] == b"\0"
        await other.query("BEGIN")  # holds the connection that has the statement
        await other.query("SELECT COUNT(*) FROM items")
        raw.command(head + b"\0\0" + rows((61_000, b"c")))  # no types this time
        assert (await raw.response())[0][:1] == b"\0"
        await other.query("COMMIT")
        reply = await raw.query(
            "SELECT GROUP_CONCAT(note ORDER BY note) FROM items WHERE client = 61000"
        )
    assert b"a,b,c" in reply[-2]
    assert proxy.pools.budget.open == 2  # the second bulk ran on the other connection
