"""ORMs and drivers used the way applications use them, through a pool far smaller than the
client count: SQLAlchemy over PyMySQL, mysql-connector and aiomysql; large packets; the
commands dbmux answers itself."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy

POOL_OF_THREE = {"max_connections_percent": 6}  # 6% of 50
CLIENTS = 810_000  # the items rows of these tests have client ids from here on


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(200))


def url(proxy: MyProxy, driver: str) -> str:
    return f"mysql+{driver}://{MY_USER}:{MY_PASSWORD}@{proxy.host}:{proxy.port}/{MY_DB}"


@pytest.mark.parametrize("driver", ["pymysql", "mysqlconnector"])
def test_sqlalchemy_orm_with_many_threads(start_my_proxy, driver: str) -> None:
    proxy = start_my_proxy(pool=POOL_OF_THREE)
    engine = create_engine(url(proxy, driver), pool_size=12, max_overflow=0)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        client = CLIENTS + n + (100 if driver == "mysqlconnector" else 0)
        try:
            for i in range(6):
                with Session(engine) as session, session.begin():
                    session.add(Item(client=client, note=f"{driver}-{i}"))
                with Session(engine) as session:
                    notes = session.scalars(
                        select(Item.note).where(Item.client == client).order_by(Item.id)
                    ).all()
                    assert notes == [f"{driver}-{k}" for k in range(i + 1)]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert errors == []
    assert proxy.metrics.pins() == 0
    assert proxy.pools.budget.open <= 3


async def test_sqlalchemy_async_orm_over_aiomysql(start_my_proxy) -> None:
    proxy = start_my_proxy(pool=POOL_OF_THREE)
    engine = create_async_engine(url(proxy, "aiomysql"), pool_size=10, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def worker(n: int) -> None:
        for i in range(5):
            async with sessions() as session, session.begin():
                session.add(Item(client=CLIENTS + 500 + n, note=f"aio-{i}"))
        async with sessions() as session:
            rows = await session.scalars(select(Item).where(Item.client == CLIENTS + 500 + n))
            assert len(rows.all()) == 5

    try:
        await asyncio.gather(*(worker(n) for n in range(10)))
    finally:
        await engine.dispose()
    assert proxy.metrics.pins() == 0


def test_values_of_16_mib_and_more_cross_the_proxy_both_ways(start_my_proxy, mariadb) -> None:
    """Payloads of 16 MiB - 1 and more are split into several packets, in both directions."""
    mariadb.sql("SET GLOBAL max_allowed_packet = 67108864")
    proxy = start_my_proxy()
    big = ("0123456789abcdef" * (1 << 20)) + "tail"  # 16 MiB + 4 bytes
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS blobs (id INT PRIMARY KEY, body LONGTEXT)")
        cur.execute("REPLACE INTO blobs VALUES (1, %s)", (big,))
        cur.execute("SELECT body, LENGTH(body) FROM blobs WHERE id = 1")
        body, length = cur.fetchone()
        assert length == len(big)
        assert body == big
        cur.execute("SELECT 'still in step'")
        assert cur.fetchone() == ("still in step",)


def test_ping_is_answered_without_borrowing(my_proxy: MyProxy) -> None:
    with my_proxy.connect() as conn:
        before = my_proxy.metrics.database_connection_requests.value
        for _ in range(5):
            conn.ping(reconnect=False)
        assert my_proxy.metrics.database_connection_requests.value == before


def test_a_stored_procedure_with_several_result_sets(my_proxy: MyProxy) -> None:
    with my_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE PROCEDURE IF NOT EXISTS two_results()"
            " BEGIN SELECT 1; SET @p = 1; SELECT 2, 3; END"
        )
        cur.execute("CALL two_results()")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset()
        assert cur.fetchall() == ((2, 3),)
        while cur.nextset():
            pass
        cur.execute("SELECT 4")
        assert cur.fetchone() == (4,)
    assert my_proxy.metrics.pins() == 0
