"""Clients share a small pool per transaction, never see each other, and never exceed it."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from tests.conftest import APP_USER


class PeakSampler:
    """Samples, on a thread, how many connections the app user has that opened after the
    sampler started (backends of earlier tests' proxies may still be exiting)."""

    def __init__(self, pg) -> None:
        self.pg = pg
        self.peak = 0
        self._since = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            count = self.pg.psql(
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE usename = '{APP_USER}' AND backend_start >= '{self._since}'"
            )
            self.peak = max(self.peak, int(count))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakSampler:
        self._since = self.pg.psql("SELECT clock_timestamp()")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_300_asyncpg_clients_share_a_pool_of_10(pg, proxy):
    async def client(n: int) -> int:
        conn = await asyncpg.connect(proxy.url())
        try:
            for i in range(3):
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO items (client, note) VALUES ($1, $2)", n, f"t{i}"
                    )
                    got = await conn.fetchval("SELECT count(*) FROM items WHERE client = $1", n)
                    assert got == i + 1
            return n
        finally:
            await conn.close()

    await asyncio.to_thread(pg.psql, "DELETE FROM items WHERE client >= 1000", "app")
    with PeakSampler(pg) as sampler:
        results = await asyncio.gather(*(client(1000 + n) for n in range(300)))
    assert sorted(results) == [1000 + n for n in range(300)]
    committed = await asyncio.to_thread(
        pg.psql, "SELECT count(*) FROM items WHERE client >= 1000", "app"
    )
    assert int(committed) == 900
    assert proxy.pools.budget.limit == 10
    assert 1 <= sampler.peak <= 10
    assert proxy.pools.budget.open <= 10
    assert proxy.metrics.pins() == 0  # asyncpg's named statements do not pin


async def test_300_psycopg_async_clients_with_zero_errors(pg, proxy):
    async def client(n: int) -> None:
        async with await psycopg.AsyncConnection.connect(proxy.url()) as conn:
            async with conn.transaction():
                cur = await conn.execute("SELECT %s::int + 1", (n,))
                assert (await cur.fetchone())[0] == n + 1

    with PeakSampler(pg) as sampler:
        await asyncio.gather(*(client(n) for n in range(300)))
    assert sampler.peak <= 10


def test_sync_psycopg_threads_are_multiplexed(pg, start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 4})  # a pool of 2
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with psycopg.connect(proxy.url(), autocommit=True) as conn:
                for _ in range(20):
                    with conn.transaction():
                        assert conn.execute("SELECT %s::text", (str(n),)).fetchone()[0] == str(n)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert proxy.pools.budget.limit == 2
    assert proxy.pools.budget.open <= 2


async def test_no_statement_of_another_client_lands_inside_a_transaction(proxy):
    """Each client marks its transaction with SET LOCAL and must read its own mark back on the
    same server backend at every step, while 40 clients share 10 connections."""

    async def client(n: int) -> None:
        conn = await asyncpg.connect(proxy.url())
        try:
            for _ in range(5):
                async with conn.transaction():
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await conn.execute(f"SET LOCAL application_name = 'client-{n}'")
                    for _ in range(3):
                        await asyncio.sleep(0)
                        assert await conn.fetchval("SHOW application_name") == f"client-{n}"
                        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                assert await conn.fetchval("SHOW application_name") != f"client-{n}"
        finally:
            await conn.close()

    await asyncio.gather(*(client(n) for n in range(40)))
    assert proxy.metrics.pins() == 0


async def test_uncommitted_rows_are_invisible_to_other_clients(proxy):
    writer = await asyncpg.connect(proxy.url())
    reader = await asyncpg.connect(proxy.url())
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("INSERT INTO items (client, note) VALUES (7, 'uncommitted')")
        assert await reader.fetchval("SELECT count(*) FROM items WHERE note = 'uncommitted'") == 0
        await tx.rollback()
        assert await writer.fetchval("SELECT count(*) FROM items WHERE note = 'uncommitted'") == 0
    finally:
        await writer.close()
        await reader.close()


async def test_pipelined_extended_queries_are_answered_in_order(proxy):
    """asyncpg's executemany pipelines many Bind/Execute/Sync rounds on one connection."""
    conn = await asyncpg.connect(proxy.url())
    try:
        await conn.executemany(
            "INSERT INTO items (client, note) VALUES ($1, $2)", [(5000, str(i)) for i in range(200)]
        )
        notes = await conn.fetch("SELECT note FROM items WHERE client = 5000 ORDER BY id")
        assert [r["note"] for r in notes] == [str(i) for i in range(200)]
    finally:
        await conn.execute("DELETE FROM items WHERE client = 5000")
        await conn.close()


@pytest.mark.parametrize("rows", [1, 200_000])
async def test_large_results_arrive_complete(proxy, rows):
    conn = await asyncpg.connect(proxy.url())
    try:
        got = await conn.fetch(
            "SELECT g, repeat('x', 100) AS pad FROM generate_series(1, $1::int) g", rows
        )
        assert len(got) == rows
        assert sum(r["g"] for r in got) == rows * (rows + 1) // 2
    finally:
        await conn.close()


async def test_server_parameters_reach_the_client(pg, proxy):
    conn = await asyncpg.connect(proxy.url())
    try:
        settings = conn.get_settings()
        assert settings.server_version.startswith("15")
        assert settings.server_encoding == "UTF8"
        assert settings.client_encoding == "UTF8"
        assert conn.get_server_pid() != 0
    finally:
        await conn.close()
