"""Read-only endpoints: a pool per replica, and which replica serves the next transaction.

A read-only endpoint's clients borrow through a ReplicaPool, which asks the endpoint's
ReplicaRoute at every borrow for the usable replica with the fewest busy connections, so
transactions spread over the replicas and leave one as soon as a probe finds it down,
promoted or lagging past `max_replica_lag`. Each replica has its own PoolSet, sized from its
own max_connections. Every session of the endpoint starts read-only by default, so a replica
promoted under a lent connection still takes no write from it. With no usable replica the
endpoint borrows from the writer (`fallback_to_writer`) or waits for a replica, up to
connection_borrow_timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from dbmux.config import Endpoint
from dbmux.engines.base import Borrower, PoolKey, ServerConnection, ServerError
from dbmux.pool import POOL_LINGER, BudgetLender, Pool, PoolSet, TargetBudget
from dbmux.targets import Instance

log = logging.getLogger("dbmux.replicas")


class ReplicaRoute:
    """One read-only endpoint's replicas: their pools and the choice among them."""

    follows_writer = False

    def __init__(
        self,
        endpoint: Endpoint,
        instances: list[Instance],
        replica_pools: Callable[[Instance], PoolSet],
        fallback: PoolSet | None,
        timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self.instances = instances
        self.fallback = fallback
        self.timeout = timeout
        self.replica_pools = replica_pools
        self.sets = {i.name: replica_pools(i) for i in instances}
        self.usable: list[Instance] = []
        self._turn = 0  # where the next choice starts looking among equally busy replicas
        self.pools: dict[PoolKey, ReplicaPool] = {}
        # Borrowers waiting for a usable replica: (deadline, pool, borrower), oldest first.
        self.parked: deque[tuple[float, ReplicaPool, Borrower]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def get(self, database: str, user: str, variant: int = 0) -> ReplicaPool:
        """The pool clients of this (database, user) borrow through; as PoolSet.get."""
        key = PoolKey(database, user, variant)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = ReplicaPool(key, self)
        return pool

    def drop_unused(self, in_use: set[object], now: float) -> None:
        """Janitor pass: forget the (database, user) entries no client has borrowed through
        for POOL_LINGER (they hold no connection: those are in the replicas' PoolSets,
        which drop their own unused pools)."""
        for key, pool in list(self.pools.items()):
            if pool in in_use:
                pool.unused_since = None
            elif pool.unused_since is None:
                pool.unused_since = now
            elif now - pool.unused_since >= POOL_LINGER:
                del self.pools[key]

    def targets_changed(self, added: list[Instance], removed: list[Instance]) -> None:
        """A reload changed the targets: new replicas get pools (used once a probe finds them
        fit); removed ones serve no new transaction, their connections close as they come
        back."""
        for instance in added:
            self.sets[instance.name] = self.replica_pools(instance)
        for instance in removed:
            if instance in self.usable:
                self.usable.remove(instance)
            pools = self.sets.pop(instance.name, None)
            if pools is not None:
                pools.retire(pools.budget.generation + 1)

    def fits(self, instance: Instance) -> bool:
        limit = self.endpoint.max_replica_lag
        if not instance.is_replica:
            return False
        return limit is None or (instance.lag is not None and instance.lag <= limit)

    def instance_probed(self, instance: Instance) -> None:
        """A probe finished: route around a replica that no longer fits; a replica that
        stopped being one (promoted, down) loses its connections."""
        was_usable = instance in self.usable
        usable = self.fits(instance)
        if usable and not was_usable:
            self.usable.append(instance)
            log.info("endpoint %s: replica %s serves reads", self.endpoint.name, instance.name)
            self._serve_parked()
        elif was_usable and not usable:
            self.usable.remove(instance)
            why = instance.description or instance.health.value
            if instance.is_replica:
                lag = "unknown" if instance.lag is None else f"{instance.lag:g} s"
                why = f"replication lag {lag}"
            log.warning("endpoint %s: %s skipped: %s", self.endpoint.name, instance.name, why)
        pools = self.sets.get(instance.name)  # (None: a reload removed it meanwhile)
        if pools is not None and not instance.is_replica and pools.budget.open:
            pools.retire(pools.budget.generation + 1)

    def choose(self, key: PoolKey) -> Pool | None:
        """The pool of the usable replica with the fewest busy connections (ties taken in
        turn, so a light load spreads too); the writer's read-only pool if none is usable
        and the endpoint falls back; else None."""
        usable = self.usable
        best: PoolSet | None = None
        busy = 0
        if usable:
            self._turn = start = (self._turn + 1) % len(usable)
            for instance in usable[start:] + usable[:start]:
                pools = self.sets[instance.name]
                load = pools.lent_count
                if best is None or load < busy:
                    best, busy = pools, load
        if best is None:
            best = self.fallback
        return best.get(key.database, key.user, key.variant) if best is not None else None

    def park(self, pool: ReplicaPool, borrower: Borrower) -> None:
        loop = asyncio.get_running_loop()
        self.parked.append((loop.time() + self.timeout, pool, borrower))
        if self._timer is None:
            self._timer = loop.call_at(self.parked[0][0], self._expire)

    def unpark(self, borrower: Borrower) -> None:
        for entry in self.parked:
            if entry[2] is borrower:
                self.parked.remove(entry)
                return

    def _serve_parked(self) -> None:
        parked, self.parked = self.parked, deque()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, pool, borrower in parked:
            conn = pool.request(borrower)
            if conn is not None:
                borrower.on_connection(conn)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        now = loop.time()
        while self.parked and self.parked[0][0] <= now:
            self.parked.popleft()[2].on_borrow_failed(self.no_replica())
        if self.parked:
            self._timer = loop.call_at(self.parked[0][0], self._expire)

    def no_replica(self) -> ServerError:
        states = "; ".join(
            f"{i.name} {i.role.value if i.role else ''} {i.health.value}"
            + (f" lag {i.lag:g} s" if i.lag is not None else "")
            for i in self.instances
        )
        limit = self.endpoint.max_replica_lag
        return ServerError(
            f"no replica can serve read-only endpoint {self.endpoint.name} "
            f"(max_replica_lag {limit if limit is not None else 'none'}, "
            f"fallback_to_writer off): {states}",
            code="08001",
        )

    def close_all(self) -> None:
        """The proxy stops (its PoolSets, these replicas' among them, close themselves):
        borrowers still waiting for a replica are told."""
        while self.parked:
            self.parked.popleft()[2].on_borrow_failed(
                ConnectionAbortedError("the proxy is shutting down")
            )


class ReplicaPool(BudgetLender):
    """What clients of one (database, user) on a read-only endpoint borrow through: each
    borrow goes to the pool the route chooses at that moment."""

    def __init__(self, key: PoolKey, route: ReplicaRoute) -> None:
        self.key = key
        self.route = route
        self.server_facts: dict[str, str] | None = None
        self._last: Pool | None = None
        self.unused_since: float | None = None  # when the janitor first found it unused

    @property
    def budget(self) -> TargetBudget:
        if self._last is not None:
            return self._last.budget
        return (self.route.fallback or next(iter(self.route.sets.values()))).budget

    def try_borrow(self) -> ServerConnection | None:
        pool = self.route.choose(self.key)
        if pool is None:
            return None
        self._last = pool
        return pool.try_borrow()

    def request(self, borrower: Borrower) -> ServerConnection | None:
        pool = self.route.choose(self.key)
        if pool is None:
            self.route.park(self, borrower)
            return None
        self._last = pool
        return pool.request(borrower)

    def withdraw(self, borrower: Borrower) -> None:
        """The borrower waits in at most one place; look in each."""
        self.route.unpark(borrower)
        candidates = [*self.route.sets.values(), self.route.fallback]
        for pools in candidates:
            pool = pools.pools.get(self.key) if pools is not None else None
            if pool is not None:
                pool.withdraw(borrower)
