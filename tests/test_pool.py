"""The pool built directly, with no engine: budgets sized from the database's limit, borrow
timeouts, waiters served in turn, idle connections reaped and capped, and a slot taken from
another pool when the target's budget is full.

The connections are a small ServerConnection subclass that only records what the pool did
to it: the pool is engine-agnostic, so nothing here stands in for a database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from dbmux.config import ConnectionPoolConfig
from dbmux.engines.base import Borrower, BorrowTimeout, PoolKey, ServerConnection
from dbmux.metrics import ProxyMetrics, Registry
from dbmux.pool import IDLE_GRACE, PoolSet, TargetBudget
from tests.waiting import eventually

MAX_CONNECTIONS = 10  # the database's max_connections, as a first connection reads it


class FakeServer(ServerConnection):
    """A server connection that only records what the pool asked of it."""

    goodbye = b"bye"

    def __init__(self, number: int, server_limit: tuple[int, int] | None) -> None:
        super().__init__()
        self.number = number
        self.server_limit = server_limit
        self.resets = 0
        self.pings = 0
        self.answers_pings = True
        self.sent = b""
        self.graceful: bool | None = None  # how it was closed

    async def read_server_limit(self) -> None:
        self.server_limit = (MAX_CONNECTIONS, 0)

    async def start_session(self) -> None:
        pass

    async def reset(self) -> None:
        self.resets += 1

    async def ping(self) -> None:
        self.pings += 1
        if not self.answers_pings:
            raise ConnectionError("no answer")

    def write(self, data: bytes) -> None:
        self.sent += data

    def close_transport(self, *, abort: bool = False) -> None:
        self.graceful = not abort and self.sent.endswith(self.goodbye)


@dataclass
class Opener:
    """Opens FakeServers (the first reads the database's limit, as engines do), or fails."""

    reserved: int = 0
    opened: list[FakeServer] = field(default_factory=list)
    failure: Exception | None = None

    async def __call__(self, key: PoolKey, read_limit: bool) -> FakeServer:
        await asyncio.sleep(0)  # opening takes a loop pass, as a real connect does
        if self.failure is not None:
            raise self.failure
        limit = (MAX_CONNECTIONS, self.reserved) if read_limit else None
        conn = FakeServer(len(self.opened), limit)
        self.opened.append(conn)
        return conn


@dataclass
class Pools:
    """One target's PoolSet and what it was built from."""

    pools: PoolSet
    opener: Opener
    troubles: list[None]

    @property
    def budget(self) -> TargetBudget:
        return self.pools.budget


def pools_of(opener: Opener | None = None, **config: float) -> Pools:
    """A target's pools: `config` as connection_pool_config, on a database with
    max_connections MAX_CONNECTIONS (20 % of it by default: a budget of 2)."""
    config.setdefault("max_connections_percent", 20)
    troubles: list[None] = []
    budget = TargetBudget(ConnectionPoolConfig(**config), lambda: troubles.append(None))
    opener = opener or Opener()
    metrics = ProxyMetrics(Registry(), "unit")
    return Pools(PoolSet(opener, metrics, budget), opener, troubles)


class Recorder(Borrower):
    """A borrower that notes what it was given, by name."""

    def __init__(self, name: str, log: list[tuple[str, object]]) -> None:
        self.name = name
        self.log = log

    def on_connection(self, conn: ServerConnection) -> None:
        self.log.append((self.name, conn))

    def on_borrow_failed(self, error: Exception) -> None:
        self.log.append((self.name, error))


async def test_the_budget_is_a_percentage_of_the_databases_max_connections() -> None:
    """Until the first connection has read max_connections one connection at a time is
    opened; then the pool grows to its share, never into the superusers' reserve."""
    target = pools_of(max_connections_percent=50, max_idle_connections_percent=10)
    pool = target.pools.get("app", "app")
    assert target.budget.limit is None
    conns = await asyncio.gather(*(pool.borrow() for _ in range(5)))
    assert target.budget.limit == 5
    assert target.budget.max_idle == 1
    assert len({id(c) for c in conns}) == 5 == target.budget.open

    reserved = pools_of(Opener(reserved=MAX_CONNECTIONS - 1), max_connections_percent=50)
    await reserved.pools.get("app", "app").borrow()
    assert reserved.budget.limit == 1


async def test_pools_waiting_while_the_limit_is_unknown_are_served_once_it_is_known() -> None:
    """Two pools of one target (two users, or MySQL clients with other capabilities) ask
    at once before the database's max_connections is known: one connection is opened for
    one of them; once it has read the limit, the other pool's waiter is served too, not
    left waiting until connection_borrow_timeout."""
    target = pools_of(max_connections_percent=50)
    first, second = target.pools.get("app", "a"), target.pools.get("app", "b")
    got = await asyncio.wait_for(asyncio.gather(first.borrow(), second.borrow()), 10)
    assert len({id(conn) for conn in got}) == 2


async def test_a_borrow_waits_at_most_connection_borrow_timeout() -> None:
    target = pools_of(max_connections_percent=10, connection_borrow_timeout=0.1)  # one
    pool = target.pools.get("app", "app")
    held = await pool.borrow()
    with pytest.raises(BorrowTimeout):
        await asyncio.wait_for(pool.borrow(), 10)
    assert not pool.waiters  # the timed-out borrower is gone from the queue
    pool.release(held)
    assert await asyncio.wait_for(pool.borrow(), 10) is held


async def test_waiters_are_served_first_come_first_served() -> None:
    target = pools_of(max_connections_percent=10)  # one connection
    pool = target.pools.get("app", "app")
    held = await pool.borrow()
    log: list[tuple[str, object]] = []
    for name in "abc":
        assert pool.request(Recorder(name, log)) is None
    withdrawn = Recorder("withdrawn", log)
    pool.request(withdrawn)
    pool.withdraw(withdrawn)
    for name in "abc":  # a clean connection given back goes straight to the next waiter
        pool.release(held)
        assert log[-1] == (name, held)
    pool.release(held)
    assert len(log) == 3 and list(pool.idle) == [held]
    assert target.budget.open == 1


async def test_a_connection_left_dirty_is_reset_before_the_next_borrower_gets_it() -> None:
    target = pools_of()
    pool = target.pools.get("app", "app")
    conn = await pool.borrow()
    pool.release(conn)
    assert (await pool.borrow(), conn.resets) == (conn, 0)  # clean: lent again as it is
    conn.needs_reset = True
    pool.release(conn)
    assert await asyncio.wait_for(pool.borrow(), 10) is conn
    assert (conn.resets, conn.needs_reset) == (1, False)


async def test_connections_idle_past_idle_server_timeout_are_closed() -> None:
    target = pools_of(idle_server_timeout=60, max_idle_connections_percent=20)  # no cap here
    pool = target.pools.get("app", "app")
    old, new = await asyncio.gather(pool.borrow(), pool.borrow())
    pool.release(old)
    pool.release(new)
    old.idle_since -= 61  # idle for longer than idle_server_timeout
    target.pools.sweep()
    assert (old.closed, old.graceful, new.closed) == (True, True, False)
    assert list(pool.idle) == [new]
    assert target.budget.open == 1


async def test_idle_connections_beyond_max_idle_connections_percent_are_closed() -> None:
    """The idle cap closes the longest idle first, and only connections idle for longer than
    IDLE_GRACE (a busy pool's momentarily idle connections stay)."""
    target = pools_of(max_connections_percent=50, max_idle_connections_percent=20)  # cap 2
    pool = target.pools.get("app", "app")
    conns = await asyncio.gather(*(pool.borrow() for _ in range(5)))
    for conn in conns:
        pool.release(conn)
    target.pools.sweep()
    assert target.budget.open == 5  # all idle only just now
    for conn in conns:
        conn.idle_since -= IDLE_GRACE + 1
    target.pools.sweep()
    assert [c for c in conns if not c.closed] == conns[3:]  # the last ones given back
    assert target.budget.open == target.budget.idle_count == 2


async def test_a_full_budget_takes_the_slot_of_another_pools_idle_connection() -> None:
    target = pools_of(max_connections_percent=10)  # one connection for the whole target
    alice, bob = target.pools.get("app", "alice"), target.pools.get("app", "bob")
    conn = await alice.borrow()
    alice.release(conn)
    theirs = await asyncio.wait_for(bob.borrow(), 10)
    assert (conn.closed, conn.graceful) == (True, True)
    assert theirs is not conn and target.budget.open == 1
    assert not alice.idle


async def test_a_slot_freed_in_one_pool_serves_a_waiter_of_another() -> None:
    """Bob waits while Alice's connection is lent (not idle, so not taken); when it closes,
    the slot it frees opens a connection for Bob."""
    target = pools_of(max_connections_percent=10, connection_borrow_timeout=30)
    alice, bob = target.pools.get("app", "alice"), target.pools.get("app", "bob")
    conn = await alice.borrow()
    waiting = asyncio.create_task(bob.borrow())
    await eventually(lambda: bool(bob.waiters), "bob waits")
    assert not conn.closed and target.budget.open == 1
    conn.close()
    theirs = await asyncio.wait_for(waiting, 10)
    assert theirs is not conn and target.budget.open == 1
    assert target.troubles  # a lent connection closing may mean a failover


async def test_an_idle_connection_that_fails_its_health_check_is_never_lent() -> None:
    target = pools_of(idle_check_interval=1)
    pool = target.pools.get("app", "app")
    good, bad = await asyncio.gather(pool.borrow(), pool.borrow())
    bad.answers_pings = False
    for conn in (good, bad):
        pool.release(conn)
        conn.idle_since -= 2
        conn.checked_at -= 2
    target.pools.sweep()
    await eventually(lambda: bad.closed and good.pings == 1 and good in pool.idle, "checked")
    assert list(pool.idle) == [good]
    assert target.budget.open == 1


async def test_a_connection_that_cannot_be_opened_fails_the_borrow_and_frees_its_slot() -> None:
    opener = Opener(failure=ConnectionRefusedError("refused"))
    target = pools_of(opener)
    pool = target.pools.get("app", "app")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(pool.borrow(), 10)
    assert target.budget.open == 0
    assert target.troubles  # the target is probed at once
    opener.failure = None
    assert await asyncio.wait_for(pool.borrow(), 10) is opener.opened[0]


async def test_retired_connections_close_now_if_idle_and_when_given_back_if_lent() -> None:
    """A new writer: connections to the old one are never lent again."""
    target = pools_of()
    pool = target.pools.get("app", "app")
    idle, lent = await asyncio.gather(pool.borrow(), pool.borrow())
    pool.release(idle)
    target.pools.retire(target.budget.generation + 1)
    assert idle.closed and not lent.closed
    pool.release(lent)
    assert lent.closed and target.budget.open == 0
    fresh = await asyncio.wait_for(pool.borrow(), 10)
    assert fresh not in (idle, lent) and fresh.server_limit is not None  # relearns the limit
