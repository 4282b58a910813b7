"""Many MySQL clients share a few server connections, one transaction at a time, through real
drivers (PyMySQL, mysql-connector-python, aiomysql) against a real MariaDB."""

from __future__ import annotations

import asyncio
import threading

import aiomysql
import pymysql
import pytest

from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy, server_connections

POOL = 10  # 20% of the test server's max_connections (50)


def test_a_query_through_the_proxy_reaches_the_database(my_proxy: MyProxy) -> None:
    with my_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT DATABASE(), CURRENT_USER(), 40 + 2")
        database, user, answer = cur.fetchone()
    assert (database, answer) == (MY_DB, 42)
    assert user.startswith(f"{MY_USER}@")


def test_the_client_sees_the_servers_version(my_proxy: MyProxy, mariadb) -> None:
    direct = pymysql.connect(
        host=mariadb.host, port=mariadb.port, user=MY_USER, password=MY_PASSWORD
    )
    with direct, my_proxy.connect() as proxied:
        assert proxied.get_server_info() == direct.get_server_info()


async def test_300_concurrent_aiomysql_clients_share_a_pool_of_10(my_proxy: MyProxy, mariadb):
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await asyncio.to_thread(server_connections, mariadb))
            await asyncio.sleep(0.05)

    async def client(n: int) -> int:
        conn = await aiomysql.connect(
            host=my_proxy.host,
            port=my_proxy.port,
            user=MY_USER,
            password=MY_PASSWORD,
            db=MY_DB,
            autocommit=False,
        )
        try:
            async with conn.cursor() as cur:
                for _ in range(3):
                    await cur.execute("INSERT INTO items (client, note) VALUES (%s, 'x')", (n,))
                    await cur.execute("SELECT COUNT(*) FROM items WHERE client = %s", (n,))
                    (count,) = await cur.fetchone()
                    await conn.commit()
            return count
        finally:
            conn.close()

    watcher = asyncio.create_task(watch())
    counts = await asyncio.gather(*(client(10_000 + n) for n in range(300)))
    stop.set()
    await watcher
    assert counts == [3] * 300
    assert 0 < peak <= POOL
    assert my_proxy.metrics.borrow_timeouts.value == 0


def test_no_statement_of_another_client_lands_inside_a_transaction(my_proxy: MyProxy) -> None:
    """Each client inserts rows inside a transaction and rolls back: if another client's
    statement ran on its connection mid-transaction, that client's rows would vanish too."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with my_proxy.connect(autocommit=False) as conn, conn.cursor() as cur:
                for i in range(20):
                    cur.execute("INSERT INTO items (client, note) VALUES (%s, 'tx')", (n,))
                    cur.execute("SELECT COUNT(*) FROM items WHERE client = %s", (n,))
                    assert cur.fetchone()[0] == 1, "another client's rows or rollback leaked in"
                    conn.rollback() if i % 2 else conn.commit()
                    if not i % 2:
                        cur.execute("DELETE FROM items WHERE client = %s", (n,))
                        conn.commit()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(20_000 + n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.mark.parametrize("use_pure", [True])
def test_mysql_connector_runs_transactions_through_the_proxy(my_proxy: MyProxy, use_pure):
    conn = my_proxy.connector(use_pure=use_pure)
    try:
        cur = conn.cursor()
        cur.execute("INSERT INTO items (client, note) VALUES (%s, %s)", (30_000, "connector"))
        conn.commit()
        cur.execute("SELECT note FROM items WHERE client = %s", (30_000,))
        assert cur.fetchall() == [("connector",)]
    finally:
        conn.close()
