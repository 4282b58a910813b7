"""Session settings follow each client across server connections instead of pinning."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.engines.postgres.test_lifecycle import connect

POOL_OF_THREE = {"max_connections_percent": 6}  # 6% of max_connections 50


async def test_each_client_keeps_its_own_settings_on_a_shared_pool(start_proxy):
    proxy = start_proxy(pool=POOL_OF_THREE)

    async def client(n: int) -> set[int]:
        conn = await connect(proxy)
        backends = set()
        try:
            await conn.execute(f"SET statement_timeout = '{n + 1}s'")
            await conn.execute(f"SELECT set_config('myapp.client', '{n}', false)")
            for _ in range(8):
                async with conn.transaction():
                    backends.add(await conn.fetchval("SELECT pg_backend_pid()"))
                    assert await conn.fetchval("SHOW statement_timeout") == f"{n + 1}s"
                    assert await conn.fetchval("SELECT current_setting('myapp.client')") == str(n)
                await asyncio.sleep(0)
            return backends
        finally:
            await conn.close()

    seen = await asyncio.gather(*(client(n) for n in range(12)))
    assert proxy.metrics.pins() == 0
    assert proxy.pools.budget.open <= 3
    assert any(len(backends) > 1 for backends in seen)  # clients really moved between servers


async def test_a_client_without_settings_never_sees_another_clients(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})  # one server connection
    setter, plain = await connect(proxy), await connect(proxy)
    try:
        await setter.execute("SET work_mem = '8MB'")
        await setter.execute("SET search_path = pg_catalog, public")
        await setter.execute("SET TIME ZONE 'Asia/Tokyo'")
        assert await plain.fetchval("SHOW work_mem") == "4MB"
        assert await plain.fetchval("SHOW search_path") == '"$user", public'
        assert await plain.fetchval("SHOW TimeZone") != "Asia/Tokyo"
        assert await setter.fetchval("SHOW work_mem") == "8MB"
        assert await setter.fetchval("SHOW search_path") == "pg_catalog, public"
        assert await setter.fetchval("SHOW TimeZone") == "Asia/Tokyo"
        assert proxy.metrics.pins() == 0
    finally:
        await setter.close()
        await plain.close()


async def test_settings_of_a_rolled_back_transaction_are_not_kept(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})
    conn, other = await connect(proxy), await connect(proxy)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SET statement_timeout = '9s'")
        await tx.rollback()
        await other.fetchval("SELECT 1")  # the connection serves someone else in between
        assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await conn.close()
        await other.close()


async def test_reset_and_reset_all_go_back_to_the_defaults(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})
    conn, other = await connect(proxy), await connect(proxy)
    try:
        await conn.execute("SET work_mem = '16MB'; SET statement_timeout = '3s'")
        await conn.execute("RESET work_mem")
        await other.fetchval("SELECT 1")
        assert await conn.fetchval("SHOW work_mem") == "4MB"
        assert await conn.fetchval("SHOW statement_timeout") == "3s"
        await conn.execute("RESET ALL")
        await other.fetchval("SELECT 1")
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert conn._protocol  # still connected
        assert proxy.metrics.pins() == 0
    finally:
        await conn.close()
        await other.close()


async def test_a_rejected_set_changes_nothing(proxy):
    conn = await connect(proxy)
    try:
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("SET statement_timeout = 'soon'")
        assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await conn.close()


async def test_reported_settings_reach_the_driver_on_every_connection(start_proxy):
    """asyncpg decodes timestamptz with the TimeZone the server reported."""
    proxy = start_proxy(pool={"max_connections_percent": 2})
    conn, other = await connect(proxy), await connect(proxy)
    try:
        await conn.execute("SET TIME ZONE 'America/New_York'")
        await other.execute("SET TIME ZONE 'UTC'")
        assert await conn.fetchval("SHOW TimeZone") == "America/New_York"
        assert await other.fetchval("SHOW TimeZone") == "UTC"
    finally:
        await conn.close()
        await other.close()


async def test_exclude_variable_sets_in_pin_mode_neither_pins_nor_carries(start_proxy):
    proxy = start_proxy(
        session_state="pin", pool={"session_pinning_filters": ["EXCLUDE_VARIABLE_SETS"]}
    )
    conn = await connect(proxy)
    try:
        await conn.execute("SET statement_timeout = '4s'")
        assert proxy.metrics.pins() == 0
    finally:
        await conn.close()


async def test_a_repeated_set_is_learned_once_and_still_followed(start_proxy):
    proxy = start_proxy(pool={"max_connections_percent": 2})
    a, b = await connect(proxy), await connect(proxy)
    try:
        for value in ("3s", "4s", "3s", "4s"):
            await a.execute(f"SET statement_timeout = '{value}'")
            assert await b.fetchval("SHOW statement_timeout") == "0"
            assert await a.fetchval("SHOW statement_timeout") == value
        with pytest.raises(asyncpg.PostgresError):
            await a.execute("SET statement_timeout = 'never'")
        assert await a.fetchval("SHOW statement_timeout") == "4s"
        tx = a.transaction()
        await tx.start()
        await a.execute("SET statement_timeout = '3s'")
        await tx.rollback()
        assert await a.fetchval("SHOW statement_timeout") == "4s"
        context = proxy.embedded.proxy()
        assert context.metrics.pins() == 0
    finally:
        await a.close()
        await b.close()
