"""Engine-agnostic connection pool: borrow/release, limits, borrow timeout, idle reaping.

Every server connection is in exactly one container of its pool (`idle`, `lent`), or is
being opened (`opening`); metrics and limits read those containers. A connection goes back
in exactly one place, `Pool.release`, which resets it only when the borrower dirtied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable

from dbmux.config import ConnectionPoolConfig
from dbmux.engines.base import Borrower, BorrowTimeout, Lender, PoolKey, ServerConnection
from dbmux.metrics import ProxyMetrics

log = logging.getLogger("dbmux.pool")

IDLE_GRACE = 5.0  # seconds a connection must sit idle before it counts towards the idle cap
# Seconds a pool with no connection, no waiter and no client is kept before it is dropped (a
# client reconnecting at once finds what the pool learned of the server).
POOL_LINGER = 5.0
PING_TIMEOUT = 5.0  # seconds an idle connection's health check may take


Opener = Callable[[PoolKey, bool], Awaitable[ServerConnection]]


class BudgetShare(ABC):
    """Where a budget's slots come from when several worker processes share one budget per
    target (config: workers). The share grants slots later, through `TargetBudget.grant`,
    and may ask for some back (`TargetBudget.shed`) for a worker whose clients wait."""

    @abstractmethod
    def ask(self, count: int) -> None:
        """`count` more slots are wanted."""

    @abstractmethod
    def give(self, count: int) -> None:
        """`count` slots are no longer used."""

    @abstractmethod
    def learned(self, limit: int) -> None:
        """The budget's size, as the database's max_connections gave it."""


# What makes a budget's share, given the budget's name (proxy, target) and the budget.
ShareFactory = Callable[[tuple[str, str], "TargetBudget"], BudgetShare]


class TargetBudget:
    """The connections one database instance may have from this proxy, shared by its pools.

    The limit is a percentage of the database's own max_connections, which is only known
    after the first connection has asked; until then one connection at a time is opened.
    With a `share` (several workers), the slots this process may use are those granted.
    """

    def __init__(self, config: ConnectionPoolConfig, on_trouble: Callable[[], None]) -> None:
        self.config = config
        self.limit: int | None = None
        self.max_idle = 0
        self.open = 0
        self.share: BudgetShare | None = None  # set by the proxy, with several workers
        self.granted = 0  # slots the share gave this process (open <= granted)
        self.asked = 0  # slots asked of the share and not yet granted
        self.owed = 0  # slots the share wants back: connections close instead of being lent
        self.pools: list[Pool] = []
        self._wake_scheduled = False
        # Connections of an older generation (another writer) are closed, never lent again.
        self.generation = 0
        self.relearn = False  # the next connection reads the (new) writer's max_connections
        # Called when a connection cannot be opened or closes while lent: the instance may
        # have failed over, so its role is probed at once (TargetGroup.suspect).
        self.on_trouble = on_trouble
        # Paused (PgBouncer's PAUSE): nothing is lent; requests are held, without a
        # deadline, until resume.
        self.paused = False
        self.held: deque[tuple[Pool, Borrower]] = deque()
        self.max_connections: tuple[int, int] | None = None  # as learned, to size again

    def reconfigure(self, config: ConnectionPoolConfig) -> None:
        """A reload changed the pool settings: they apply from now on (the size at once)."""
        self.config = config
        if self.max_connections is not None:
            self.learn_server_limit(*self.max_connections)
            for pool in self.pools:
                pool.grow()

    def pause(self) -> None:
        """Lend nothing from now on; who waits for a connection waits until resume."""
        self.paused = True
        for pool in self.pools:
            while (entry := pool._next_waiter()) is not None:
                self.held.append((pool, entry[1]))

    def resume(self) -> None:
        """Lend again: the held requests first, in the order they came."""
        self.paused = False
        held, self.held = self.held, deque()
        for pool, borrower in held:
            conn = pool.request(borrower)
            if conn is not None:
                borrower.on_connection(conn)

    def learn_server_limit(self, max_connections: int, reserved: int) -> None:
        """Size the budget as a percentage of the database's max_connections, never more than
        the connections it leaves to non-superusers."""
        self.relearn = False
        self.max_connections = (max_connections, reserved)
        usable = max(1, max_connections - reserved)
        percent = self.config.max_connections_percent
        self.limit = max(1, min(usable, math.floor(max_connections * percent / 100)))
        idle_percent = self.config.max_idle_connections_percent or 0
        self.max_idle = min(self.limit, math.floor(max_connections * idle_percent / 100))
        if self.share is not None:
            self.share.learned(self.limit)

    @property
    def allowed(self) -> int:
        """How many connections this process may have open now."""
        if self.share is not None:
            return self.granted
        return 1 if self.limit is None else self.limit  # one at a time until it is known

    def try_reserve(self, requester: Pool) -> bool:
        """Take a slot for a new connection, closing another pool's idle one if that frees
        one; failing that, ask the share (if any) for more."""
        if self.open < self.allowed:
            self.open += 1
            return True
        for pool in self.pools:
            if pool is not requester and pool.idle:
                pool.idle.popleft().close(graceful=True)  # frees a slot through Pool.remove
                self.open += 1
                return True
        if self.share is not None:
            unserved = self.unserved - self.asked
            if unserved > 0:
                self.asked += unserved
                self.share.ask(unserved)
        return False

    @property
    def unserved(self) -> int:
        """Waiters that no connection being opened will serve."""
        return sum(max(0, len(p.waiters) - p.opening) for p in self.pools)

    def give_back(self) -> None:
        """A slot became free: let pools with waiting clients use it, on the next loop pass
        so that a close inside `try_reserve` never re-enters `Pool.grow`. With a share, a
        slot nobody here waits for (or that the share asked back) goes back to it."""
        self.open -= 1
        if self.share is not None and (self.owed or not self.unserved):
            self.owed = max(0, self.owed - 1)
            self.granted -= 1
            self.share.give(1)
            return
        if not self._wake_scheduled and any(p.waiters for p in self.pools):
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        for pool in self.pools:
            if pool.waiters:
                pool.grow()

    def grant(self, count: int) -> None:
        """The share gave `count` slots: open connections for who waits, and give back at
        once what nobody waits for any more."""
        self.granted += count
        self.asked = max(0, self.asked - count)
        self._wake()
        spare = self.granted - self.open
        if spare > 0 and self.share is not None and not self.unserved:
            self.granted -= spare
            self.share.give(spare)

    def spare(self, count: int) -> int:
        """Close up to `count` idle connections (the oldest first) for another worker's
        waiting clients; their slots go back to the share. Returns how many closed."""
        closed = 0
        while closed < count:
            pools = [p for p in self.pools if p.idle]
            if not pools:
                break
            oldest = min(pools, key=lambda p: p.idle[0].idle_since)
            oldest.idle.popleft().close(graceful=True)  # give_back gives its slot
            closed += 1
        return closed

    def shed(self, count: int) -> None:
        """The share wants `count` slots back for another worker's waiting clients: idle
        connections close now, lent ones as they come back (Pool._hand_over)."""
        self.owed += count
        self.spare(self.owed)  # each close pays one slot back (give_back)

    @property
    def idle_count(self) -> int:
        return sum(len(p.idle) for p in self.pools)


class BudgetLender(Lender):
    """A Lender whose connections come from a TargetBudget (the one last borrowed from,
    for a read-only endpoint's choice among replicas)."""

    @property
    @abstractmethod
    def budget(self) -> TargetBudget: ...

    @property
    def timeout(self) -> float:
        return self.budget.config.connection_borrow_timeout

    def borrow_hint(self) -> str:
        return (
            f"connection_borrow_timeout is {self.timeout:g} s; the pool holds "
            f"{self.budget.limit} connections (max_connections_percent "
            f"{self.budget.config.max_connections_percent})"
        )


class Pool(BudgetLender):
    """The server connections of one (database, user) on one target."""

    def __init__(
        self, key: PoolKey, budget: TargetBudget, opener: Opener, metrics: ProxyMetrics
    ) -> None:
        self.key = key
        self._budget = budget
        self.opener = opener
        self.metrics = metrics
        self.idle: deque[ServerConnection] = deque()  # oldest on the left; borrow from the right
        self.lent: set[ServerConnection] = set()
        self.opening = 0
        # FIFO of (deadline, borrower); one timer, armed for the oldest, expires them all.
        self.waiters: deque[tuple[float, Borrower]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when it fires
        self.loop = asyncio.get_running_loop()
        # The borrow latency histogram's first bucket, bound for the hot path (try_borrow).
        self._lent_at_once = metrics.borrow_latency.counts
        self.server_facts: dict[str, str] | None = None
        self.unused_since: float | None = None  # when the janitor first found it unused
        budget.pools.append(self)

    @property
    def empty(self) -> bool:
        """No connection (idle, lent or being opened) and nobody waiting for one."""
        return not (self.idle or self.lent or self.opening or self.waiters)

    @property
    def budget(self) -> TargetBudget:
        return self._budget

    def try_borrow(self) -> ServerConnection | None:
        if self.idle and not self.waiters and not self._budget.paused:
            conn = self.idle.pop()
            self.lent.add(conn)
            self.metrics.database_connection_requests.value += 1
            self._lent_at_once[0] += 1  # DatabaseConnectionsBorrowLatency: no wait, no clock
            return conn
        return None

    def request(self, borrower: Borrower) -> ServerConnection | None:
        conn = self.try_borrow()
        if conn is not None:
            return conn
        budget = self._budget
        if budget.paused:
            budget.held.append((self, borrower))
            return None
        self.metrics.database_connection_requests.value += 1
        deadline = self.loop.time() + budget.config.connection_borrow_timeout
        self.waiters.append((deadline, borrower))
        if deadline < self._timer_at:  # (a reload may have shortened the timeout)
            self._arm(deadline)
        if len(self.waiters) > self.opening:
            self.grow()
        return None

    def withdraw(self, borrower: Borrower) -> None:
        for entry in self.waiters:
            if entry[1] is borrower:
                self.waiters.remove(entry)
                return
        held = self._budget.held
        for pair in held:
            if pair[1] is borrower:
                held.remove(pair)
                return

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """The timer: fail the waiters whose deadline passed, then wait for the oldest left.
        It stays armed when the queue empties (most waits end in a lend, and arming and
        cancelling a timer for each would cost more than this spare call)."""
        self._timer, self._timer_at = None, math.inf
        now = self.loop.time()
        waiters = self.waiters
        while waiters and waiters[0][0] <= now:
            waiters.popleft()[1].on_borrow_failed(BorrowTimeout())
        if waiters:
            self._arm(waiters[0][0])

    def _next_waiter(self) -> tuple[float, Borrower] | None:
        """The oldest waiter, out of the queue: (its deadline, itself)."""
        return self.waiters.popleft() if self.waiters else None

    def _lend_to_waiter(self, conn: ServerConnection) -> bool:
        """Lend `conn` to the oldest waiter, timing its wait; False if nobody waits."""
        entry = self._next_waiter()
        if entry is None:
            return False
        deadline, borrower = entry
        timeout = self._budget.config.connection_borrow_timeout  # (self.timeout, inlined)
        self.metrics.borrow_latency.observe(self.loop.time() - deadline + timeout)
        self.lent.add(conn)
        borrower.on_connection(conn)
        return True

    def grow(self) -> None:
        """Open connections for waiters that no connection being opened will serve."""
        wanted = len(self.waiters) - self.opening
        budget = self._budget
        while wanted > 0 and budget.try_reserve(self):
            self.opening += 1
            wanted -= 1
            self.loop.create_task(self._open())

    async def _open(self) -> None:
        read_limit = self.budget.limit is None or self.budget.relearn
        try:
            conn = await self.opener(self.key, read_limit)
        except Exception as error:
            self.opening -= 1
            self.metrics.database_connections_setup_failed.value += 1
            log.warning("cannot open a server connection for %s: %s", self._label, error)
            self.budget.on_trouble()
            entry = self._next_waiter()
            if entry is not None:
                entry[1].on_borrow_failed(error)
            self.budget.give_back()
            return
        self.opening -= 1
        self.metrics.database_connections_setup_succeeded.value += 1
        conn.pool = self
        limit = conn.server_limit
        if limit is not None:
            self.budget.learn_server_limit(*limit)
        self._hand_over(conn)
        # Open for the rest; once the limit is known, for every pool of the target that waits.
        for pool in self.budget.pools if limit is not None else (self,):
            pool.grow()

    def _hand_over(self, conn: ServerConnection) -> None:
        if self._budget.owed:
            conn.close(graceful=True)  # its slot goes to another worker (TargetBudget.shed)
            return
        if self._lend_to_waiter(conn):
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def release(self, conn: ServerConnection) -> None:
        """The one place a lent connection comes back: reset if dirty, then reuse."""
        self.lent.discard(conn)
        if conn.closed:
            return
        if conn.generation != self._budget.generation:
            conn.close(graceful=True)  # opened to a writer that is no longer the writer
            return
        if conn.needs_reset or conn.cancels_in_flight:
            self.loop.create_task(self._clean_then_hand_over(conn))
            return
        self._hand_over(conn)

    async def _clean_then_hand_over(self, conn: ServerConnection) -> None:
        self.lent.add(conn)  # still counted as in use while being cleaned
        try:
            if conn.cancels_done is not None:
                await conn.cancels_done.wait()
            if conn.needs_reset:
                await conn.reset()
                conn.needs_reset = False
        except Exception as error:
            log.info("closing a server connection that failed its reset: %s", error)
            conn.close()
            return
        finally:
            self.lent.discard(conn)
        if not conn.closed:
            self._hand_over(conn)

    def remove(self, conn: ServerConnection) -> None:
        """Called once by a closing connection: drop it from every container."""
        if conn in self.lent or conn.lost_by_peer:
            self.budget.on_trouble()
        self.lent.discard(conn)
        with contextlib.suppress(ValueError):  # not idle
            self.idle.remove(conn)
        self.budget.give_back()

    def check_idle(self, now: float) -> None:
        """Ping connections idle past idle_check_interval, each out of `idle` meanwhile so
        nobody is lent one whose peer may be gone."""
        interval = self.budget.config.idle_check_interval
        for conn in [c for c in self.idle if now - max(c.idle_since, c.checked_at) > interval]:
            self.idle.remove(conn)
            self.lent.add(conn)  # in use by the check
            self.loop.create_task(self._check(conn, min(interval, PING_TIMEOUT)))

    async def _check(self, conn: ServerConnection, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await conn.ping()
        except Exception as error:  # no answer, or a wrong one: it cannot be lent
            log.info("closing an idle server connection that failed its check: %s", error)
            conn.close()
            return
        finally:
            self.lent.discard(conn)
        if conn.closed:
            return
        if conn.generation != self.budget.generation:
            conn.close(graceful=True)  # the writer changed during the check
            return
        conn.checked_at = time.monotonic()
        if not self._lend_to_waiter(conn):
            self.idle.appendleft(conn)  # still among the longest idle

    def reap_idle(self, now: float) -> None:
        """Close connections idle past idle_server_timeout (oldest first)."""
        limit = self.budget.config.idle_server_timeout
        while self.idle and now - self.idle[0].idle_since > limit:
            self.idle.popleft().close(graceful=True)

    @property
    def _label(self) -> str:
        return f"database={self.key.database} user={self.key.user}"

    def close_all(self) -> None:
        for conn in [*self.idle, *self.lent]:
            conn.close(graceful=conn in self.idle)
        held = [b for pool, b in self._budget.held if pool is self]
        self._budget.held = deque(pair for pair in self._budget.held if pair[0] is not self)
        for borrower in [*(b for _, b in self.waiters), *held]:
            borrower.on_borrow_failed(ConnectionAbortedError("the proxy is shutting down"))
        self.waiters.clear()


class PoolSet:
    """All pools of one target, keyed by (database, user), sharing one budget (which a
    second PoolSet, with other sessions to the same target, may share)."""

    def __init__(
        self,
        opener: Opener,
        metrics: ProxyMetrics,
        budget: TargetBudget,
        *,
        follows_writer: bool = True,
        owns_budget: bool = True,
    ) -> None:
        self.budget = budget
        self.owns_budget = owns_budget  # the owner sweeps all the budget's pools
        # Its connections go to the writer (a read-only endpoint's replicas have their own).
        self.follows_writer = follows_writer
        self.opener = opener
        self.metrics = metrics
        self.pools: dict[PoolKey, Pool] = {}

    def get(self, database: str, user: str, variant: int = 0) -> Pool:
        key = PoolKey(database, user, variant)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(key, self.budget, self.opener, self.metrics)
        return pool

    def sweep(self) -> None:
        """Janitor pass: idle timeout per pool, then the idle cap across the target. Only
        connections unused for IDLE_GRACE count as surplus, so a busy pool does not churn
        connections that happened to be idle at the moment of the sweep."""
        if not self.owns_budget:
            return
        now = time.monotonic()
        pools = self.budget.pools
        for pool in pools:
            pool.reap_idle(now)
            pool.check_idle(now)
        excess = self.budget.idle_count - self.budget.max_idle
        while excess > 0 and self.budget.limit is not None:
            oldest = min((p for p in pools if p.idle), key=lambda p: p.idle[0].idle_since)
            if now - oldest.idle[0].idle_since < IDLE_GRACE:
                break
            oldest.idle.popleft().close(graceful=True)
            excess -= 1

    def drop_unused(self, in_use: set[object], now: float) -> None:
        """Janitor pass: forget pools that stayed empty, with no client (`in_use`: what
        clients borrow from), for POOL_LINGER. Clients choose databases, users and variants,
        so without this every name a client ever tried would keep a pool."""
        for key, pool in list(self.pools.items()):
            if pool in in_use or not pool.empty:
                pool.unused_since = None
            elif pool.unused_since is None:
                pool.unused_since = now
            elif now - pool.unused_since >= POOL_LINGER:
                del self.pools[key]
                self.budget.pools.remove(pool)

    def retire(self, generation: int) -> None:
        """The target changed (a new writer, a replica that is no longer one): idle
        connections close now, lent ones when they come back; the pool size is learned
        again from the target's next connection."""
        self.budget.generation = generation
        self.budget.relearn = True
        for pool in self.budget.pools:
            while pool.idle:
                pool.idle.popleft().close(graceful=True)

    @property
    def lent_count(self) -> int:
        return sum(len(p.lent) for p in self.pools.values())

    @property
    def idle_count(self) -> int:
        return self.budget.idle_count

    def close_all(self) -> None:
        for pool in self.pools.values():
            pool.close_all()
