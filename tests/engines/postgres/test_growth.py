"""What one PostgreSQL client can make the proxy hold stays bounded: the spellings of the
startup settings it sends, the SET outcomes the proxy memoizes, statement names for the texts
it prepares, and the owners of server processes. (Pools for the databases it names:
tests/test_session.py, for both engines.)"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from dbmux.engines.postgres import settings
from dbmux.engines.postgres.engine import PgContext
from tests.engines.postgres.test_lifecycle import connect, wait_until


def context(proxy) -> PgContext:
    ctx = proxy.embedded.proxy().engine._context
    assert ctx is not None
    return ctx


async def test_learned_spellings_of_startup_settings_stay_within_their_capacity(proxy) -> None:
    """Without the bound every startup setting value a client invents is remembered for
    the life of the proxy."""
    spellings = context(proxy).canonical
    spellings.capacity = 20  # 1,000 in production
    for n in range(60):
        conn = await connect(proxy, server_settings={"search_path": f"s{n}"})
        try:
            assert await conn.fetchval("SHOW search_path") == f"s{n}"
        finally:
            await conn.close()
        assert len(spellings) <= 20
    assert len(spellings) == 20


async def test_memoized_set_outcomes_stay_within_their_capacity(proxy) -> None:
    """Without the bound every SET text a client invents stays in the memo (the old bound
    forgot all of them at once); texts longer than a real SET are not memoized at all."""
    memo = context(proxy).set_results
    memo.capacity = 20  # 10,000 in production
    conn = await connect(proxy)
    try:
        for n in range(60):
            await conn.execute(f"SET search_path = s{n}")
            assert len(memo) <= 20
        await conn.execute("SET application_name = '" + "x" * 5000 + "'")
        assert all(len(text) <= 4096 for _, text in memo)
        assert await conn.fetchval("SHOW search_path") == "s59"
    finally:
        await conn.close()
    assert len(memo) == 20


async def test_statement_names_stay_within_their_capacity(proxy) -> None:
    """Without the bound the proxy keeps a shared name for every text any client ever
    prepared."""
    names = context(proxy).statement_names
    names.capacity = 20  # 10,000 in production
    conn = await asyncpg.connect(proxy.url())  # asyncpg prepares every query it runs
    try:
        for n in range(60):
            assert await conn.fetchval(f"SELECT $1::int + {n}", 1) == n + 1
            assert len(names.names) <= 20
    finally:
        await conn.close()


async def test_the_owners_of_closed_server_connections_are_forgotten(start_proxy) -> None:
    """Without it the map from server process ids to client process ids (for
    NotificationResponse) keeps an entry for every server connection ever opened."""
    proxy = start_proxy(pool={"idle_server_timeout": 1})
    owners = context(proxy).session_ids
    conns = [await connect(proxy) for _ in range(4)]
    try:
        txs = [c.transaction() for c in conns]
        for tx in txs:
            await tx.start()  # four transactions at once: four server connections
        await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns))
        for tx in txs:
            await tx.commit()
        assert len(owners) >= 4
        await wait_until(lambda: proxy.pools.budget.open == 0, timeout=30)
        assert len(owners) == 0
    finally:
        for c in conns:
            await c.close()


async def test_a_session_carrying_too_many_settings_is_pinned_and_keeps_them(
    proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cap each setting a client sets is carried (and applied on every borrow)
    for good; past it the session keeps its server connection, which holds them."""
    monkeypatch.setattr(settings, "MAX_CARRIED_SETTINGS", 20)  # 1,000 in production
    conn = await connect(proxy)
    try:
        for n in range(60):
            await conn.execute(f"SET myapp.k{n} = '{n}'")
        (client,) = proxy.embedded.proxy().runtime.clients
        assert client.pin_reason == settings.SESSION_STATE_SIZE
        assert len(client.wanted) <= 21
        assert await conn.fetchval("SELECT current_setting('myapp.k0')") == "0"
        assert await conn.fetchval("SELECT current_setting('myapp.k59')") == "59"
    finally:
        await conn.close()


async def test_a_pinned_session_stops_collecting_what_it_sets(proxy) -> None:
    """A pinned session keeps its server connection, so its SETs need no carrying: noting
    every one of them would grow the proxy with each new text for as long as it lives."""
    conn = await asyncpg.connect(proxy.url())
    try:
        await conn.execute("LISTEN pinned_here")
        for n in range(200):
            await conn.execute(f"SET application_name = 'pinned {n}'")
        (session,) = proxy.embedded.proxy().runtime.clients
        assert session.pin_reason == "listen"
        assert len(session.touched) <= 1 and len(session.set_texts) <= 1
        assert await conn.fetchval("SHOW application_name") == "pinned 199"
    finally:
        await conn.close()
