"""Connection pools and ORMs, used the way applications use them, through a small dbmux pool:
their prepared statements and settings must neither fail nor pin."""

from __future__ import annotations

import asyncio
import threading

import psycopg_pool
import pytest
from sqlalchemy import Integer, String, create_engine, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

POOL_OF_THREE = {"max_connections_percent": 6}
CLIENTS = 710_000  # the items rows of these tests have client ids from here on


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String)


def test_psycopg_pool_with_prepared_statements_and_settings(start_proxy):
    proxy = start_proxy(pool=POOL_OF_THREE)
    errors: list[BaseException] = []
    with psycopg_pool.ConnectionPool(
        proxy.url(), min_size=8, max_size=8, kwargs={"prepare_threshold": 0, "autocommit": True}
    ) as pool:

        def worker(n: int) -> None:
            try:
                for i in range(15):
                    with pool.connection() as conn:
                        conn.execute(
                            "SELECT set_config('statement_timeout', %s, false)", (f"{n + 1}s",)
                        )
                        with conn.transaction():
                            got = conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone()
                            assert got == (n + i,)
                            assert conn.execute("SHOW statement_timeout").fetchone() == (
                                f"{n + 1}s",
                            )
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert proxy.metrics.pins() == 0
    assert proxy.pools.budget.open <= 3


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_sqlalchemy_async_orm(start_proxy, driver):
    proxy = start_proxy(pool=POOL_OF_THREE)
    url = proxy.url().replace("postgresql://", f"postgresql+{driver}://")
    engine = create_async_engine(url, pool_size=10, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:

        async def worker(n: int) -> None:
            for i in range(5):
                async with sessions() as session, session.begin():
                    session.add(Item(client=CLIENTS + n, note=f"{driver}-{i}"))
                async with sessions() as session:
                    rows = await session.scalars(
                        select(Item).where(Item.client == CLIENTS + n).order_by(Item.id)
                    )
                    assert [item.note for item in rows] == [f"{driver}-{k}" for k in range(i + 1)]

        async with engine.begin() as conn:  # rows of an earlier run of this test
            await conn.execute(text(f"DELETE FROM items WHERE client >= {CLIENTS}"))
        await asyncio.gather(*(worker(n) for n in range(10)))
        async with engine.begin() as conn:
            await conn.execute(text(f"DELETE FROM items WHERE client >= {CLIENTS}"))
    finally:
        await engine.dispose()
    assert proxy.metrics.pins() == 0
    assert proxy.pools.budget.open <= 3


def test_sqlalchemy_sync_core_with_psycopg(start_proxy):
    proxy = start_proxy(pool=POOL_OF_THREE)
    engine = create_engine(proxy.url().replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session(engine) as session, session.begin():
            session.add_all([Item(client=CLIENTS + 500, note=str(k)) for k in range(20)])
        with engine.connect() as conn:
            total = conn.execute(
                text("SELECT count(*) FROM items WHERE client = :c"), {"c": CLIENTS + 500}
            ).scalar_one()
            assert total == 20
            conn.execute(text(f"DELETE FROM items WHERE client >= {CLIENTS}"))
            conn.commit()
    finally:
        engine.dispose()
    assert proxy.metrics.pins() == 0
