"""Target groups: the database instances behind a proxy, their roles and health, and which
one is the writer. The one module where a failover is noticed and waited on.

Every instance is probed on its own schedule (`probe_interval`) with a fresh login and the
engine's role query (PostgreSQL pg_is_in_recovery(), MySQL @@read_only). Trouble seen on the
hot path (a server connection that could not be opened or was lost) asks for a probe at once
instead of waiting for the next tick. When the writer changes, the proxy's pools are retired
(`on_writer_change`) and new transactions go to the new writer; while there is none they
wait for one, up to connection_borrow_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from dbmux.config import Target, TargetRole
from dbmux.engines.base import ErrorKind, ProbeResult, ServerConnection, ServerError
from dbmux.relay import ConnectionClosed

log = logging.getLogger("dbmux.targets")

PROBE_TIMEOUT = 5.0
SUSPECT_GAP = 0.05
# While the writer is lost (for up to FAILOVER_WINDOW seconds), probes come this often.
FAILOVER_PROBE_INTERVAL = 0.25
FAILOVER_WINDOW = 60.0
MAX_EVENTS = 200  # writer and health changes kept for the admin API (the dashboard's timeline)


class TargetHealth(StrEnum):
    """As RDS Proxy's describe-db-proxy-targets reports them."""

    REGISTERING = "REGISTERING"
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"


class HealthReason(StrEnum):
    CONNECTION_FAILED = "CONNECTION_FAILED"
    AUTH_FAILURE = "AUTH_FAILURE"
    UNREACHABLE = "UNREACHABLE"
    INVALID_REPLICATION_STATE = "INVALID_REPLICATION_STATE"
    PENDING_PROXY_CAPACITY = "PENDING_PROXY_CAPACITY"  # no connection slot left for dbmux


class EventKind(StrEnum):
    WRITER = "writer"  # the writer changed, was lost, or was first found
    HEALTH = "health"  # a target's health (or its reason) changed
    ROLE = "role"  # a target turned writer or replica (a promotion, a demotion)


@dataclass(frozen=True)
class Event:
    time: float  # wall clock (time.time()): operators read it next to their other logs
    kind: EventKind
    description: str


class EventLog:
    """The last MAX_EVENTS events of a target group, oldest first. Bounded: a target that
    flaps for days costs no more memory than one that never did."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=limit)

    def add(self, kind: EventKind, description: str) -> None:
        self._events.append(Event(time.time(), kind, description))

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._events))


# Probe one instance's role (and replica lag); raises ServerError/OSError when it cannot.
Probe = Callable[[Target], Awaitable[ProbeResult]]


@dataclass
class Instance:
    """One database instance of the group, as the last probe found it."""

    target: Target
    health: TargetHealth = TargetHealth.REGISTERING
    reason: HealthReason | None = None
    description: str = ""
    role: TargetRole | None = None
    lag: float | None = None  # a replica's replay delay, when some endpoint limits it
    probed_at: float = 0.0  # when the last finished probe began (what it found is that new)
    # AvailabilityPercentage: seconds AVAILABLE before `available_since` (None: not now),
    # out of the time since `watched_since`.
    watched_since: float = field(default_factory=time.monotonic)
    available_seconds: float = 0.0
    available_since: float | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _probed: asyncio.Event = field(default_factory=asyncio.Event)  # set when a probe ends

    @property
    def name(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    @property
    def is_writer(self) -> bool:
        return self.health is TargetHealth.AVAILABLE and self.role is TargetRole.READ_WRITE

    @property
    def is_replica(self) -> bool:
        return self.health is TargetHealth.AVAILABLE and self.role is TargetRole.READ_ONLY

    def availability(self) -> float:
        """Per cent of the time since it was first watched that it was AVAILABLE."""
        now = time.monotonic()
        up = self.available_seconds
        if self.available_since is not None:
            up += now - self.available_since
        elapsed = now - self.watched_since
        return 100.0 * up / elapsed if elapsed > 0 else 0.0


class TargetGroup:
    """The instances of one proxy and the writer among them."""

    def __init__(
        self,
        targets: list[Target],
        probe: Probe,
        classify: Callable[[ServerError], ErrorKind],
        *,
        interval: float,
        on_writer_change: Callable[[Instance | None, Instance | None], None],
        on_probed: Callable[[Instance], None] = lambda instance: None,
        on_failover: Callable[[Instance, float], None] = lambda writer, seconds: None,
    ) -> None:
        self.instances = [Instance(t) for t in targets]
        self.probe = probe
        self.classify = classify  # the engine's reading of its error codes
        self.interval = interval
        self.on_writer_change = on_writer_change
        self.on_probed = on_probed  # after every probe (read-only endpoints re-route)
        # A new writer after a lost one (or instead of one): it, and the seconds without one.
        self.on_failover = on_failover
        self.writer: Instance | None = None
        self.generation = 0  # grows at every writer change
        # Set while there is a writer, or while every instance refuses the proxy's login (a
        # setting to fix, such as a password or target_group.tls, not a failover to wait
        # out): who waits for a writer stops waiting.
        self._settled = asyncio.Event()
        self._changed = asyncio.Event()  # set (and replaced) at every writer change
        self._suspected_at = 0.0
        self._writer_lost_at = 0.0  # when the last writer was lost (0: never)
        self._tasks: dict[Target, asyncio.Task[None]] = {}  # each instance's watch
        self.events = EventLog()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = {i.target: loop.create_task(self._watch(i)) for i in self.instances}

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    def set_targets(self, targets: list[Target]) -> tuple[list[Instance], list[Instance]]:
        """A reload changed the targets: new ones are watched from now on, removed ones no
        longer (if the writer was one, the next writer is chosen among the others). The
        instances list changes in place: read-only endpoints share it. Returns the added
        and the removed instances."""
        current = {i.target: i for i in self.instances}
        added = [Instance(t) for t in targets if t not in current]
        removed = [i for t, i in current.items() if t not in targets]
        fresh = {i.target: i for i in added}
        self.instances[:] = [current.get(t) or fresh[t] for t in targets]
        started = bool(self._tasks)
        for instance in removed:
            task = self._tasks.pop(instance.target, None)
            if task is not None:
                task.cancel()
        if started:
            loop = asyncio.get_running_loop()
            for instance in added:
                self._tasks[instance.target] = loop.create_task(self._watch(instance))
        if self.writer in removed:
            self._choose_writer()
        return added, removed

    @property
    def failing_over(self) -> bool:
        """There was a writer, there is none now, and not for long."""
        lost = self._writer_lost_at
        return self.writer is None and lost > 0 and time.monotonic() - lost < FAILOVER_WINDOW

    def suspect(self) -> None:
        """Something on the hot path went wrong: probe every instance now (at most every
        SUSPECT_GAP seconds, so a client that keeps causing errors cannot cause a login
        storm)."""
        now = time.monotonic()
        if now - self._suspected_at < SUSPECT_GAP:
            return
        self._suspected_at = now
        for instance in self.instances:
            instance._wake.set()

    def credentials_changed(self) -> None:
        """The proxy's credentials changed (a secret read again): targets that refused its
        login may take it now, so probe them all at once, and let who waits for a writer
        wait for those probes rather than fail on the old refusals."""
        if self.writer is None:
            self._settled.clear()
        for instance in self.instances:
            instance._wake.set()

    async def wait_for_writer(self, timeout: float) -> Instance:
        """The writer, waiting for one (a failover in progress) up to `timeout` seconds."""
        if self.writer is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout)
        if self.writer is None:
            raise self.no_writer()
        return self.writer

    def no_writer(self) -> ServerError:
        return ServerError(
            "no writer among the proxy's targets: "
            + "; ".join(f"{i.name} {i.health.value} {i.description}" for i in self.instances),
            code="08001",
        )

    async def any_available(self, timeout: float) -> Target:
        """A target that answers: the writer, else any healthy instance, else the writer
        once there is one."""
        healthy = [i for i in self.instances if i.health is TargetHealth.AVAILABLE]
        instance = self.writer or (healthy[0] if healthy else None)
        if instance is None:
            instance = await self.wait_for_writer(timeout)
        return instance.target

    async def wait_for_change(self, generation: int, timeout: float) -> bool:
        """Wait until the writer is no longer the one of `generation`; False on timeout."""
        if self.generation != generation:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def connect_to_writer(
        self, connect: Callable[[Target], Awaitable[ServerConnection]], timeout: float
    ) -> ServerConnection:
        """A connection to the writer, opened by `connect`. During a failover this waits for
        the next writer; a writer found gone (nothing was sent for a client yet, so trying
        the next one is safe) is probed, and the next writer tried, up to `timeout`
        seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            writer = await self.wait_for_writer(max(0.0, deadline - loop.time()))
            generation = self.generation
            try:
                conn = await connect(writer.target)
            except ServerError as error:
                remaining = deadline - loop.time()
                if self.classify(error) is not ErrorKind.GONE or remaining <= 0:
                    raise
                if await self._still_writer(writer, remaining):
                    raise
                continue
            if generation == self.generation:
                conn.generation = generation
                return conn
            conn.close()  # the writer changed while it logged in: go to the new one

    async def _still_writer(self, instance: Instance, timeout: float) -> bool:
        """Probe `instance` now and tell whether it is still the writer (what to do when a
        connection to it failed: wait for the next writer, or report the failure)."""
        asked = time.monotonic()
        instance._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(timeout, PROBE_TIMEOUT + self.interval)):
                while instance.probed_at < asked:
                    await instance._probed.wait()
        return self.writer is instance

    async def _watch(self, instance: Instance) -> None:
        """Probe every interval, and more often while there is no writer; a lone target
        that is a healthy writer has nothing to fail over to, so it is probed again only
        when trouble is seen (no login a second)."""
        while True:
            try:
                await self._probe(instance)
            except Exception:  # a bug here must not end the watch: the group would freeze
                log.exception("probing target %s failed unexpectedly", instance.name)
            instance._wake.clear()
            if len(self.instances) == 1 and instance.is_writer:
                wait = None
            elif self.failing_over:  # find the new writer sooner
                wait = min(self.interval, FAILOVER_PROBE_INTERVAL)
            else:
                wait = self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(instance._wake.wait(), wait)

    async def _probe(self, instance: Instance) -> None:
        began = time.monotonic()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                found = await self.probe(instance.target)
        except ServerError as error:
            kind = self.classify(error)
            if kind is ErrorKind.BUSY and instance.health is TargetHealth.AVAILABLE:
                return  # full, so alive: its role has not changed by refusing a login
            reason = HealthReason.CONNECTION_FAILED
            if kind is ErrorKind.AUTH:
                reason = HealthReason.AUTH_FAILURE
            elif kind is ErrorKind.BUSY:
                reason = HealthReason.PENDING_PROXY_CAPACITY  # its role is not known yet
            self._mark(instance, TargetHealth.UNAVAILABLE, reason, str(error))
        except ConnectionClosed as error:
            self._mark(
                instance, TargetHealth.UNAVAILABLE, HealthReason.CONNECTION_FAILED, str(error)
            )
        except (OSError, TimeoutError) as error:
            reason = HealthReason.UNREACHABLE
            self._mark(instance, TargetHealth.UNAVAILABLE, reason, str(error) or "timed out")
        else:
            role = TargetRole.READ_WRITE if found.writable else TargetRole.READ_ONLY
            if role is not instance.role and instance.role is not None:
                self.events.add(
                    EventKind.ROLE, f"{instance.name}: {instance.role.value} -> {role.value}"
                )
                log.info("target %s: role %s -> %s", instance.name, instance.role.value, role.value)
            instance.role = role
            instance.lag = found.lag
            self._mark(instance, TargetHealth.AVAILABLE, None, "")
        instance.probed_at = began
        instance._probed.set()
        instance._probed = asyncio.Event()
        self._choose_writer()
        refused = all(i.reason is HealthReason.AUTH_FAILURE for i in self.instances)
        if self.writer is not None or refused:
            self._settled.set()
        else:
            self._settled.clear()
        self.on_probed(instance)

    def _mark(
        self,
        instance: Instance,
        health: TargetHealth,
        reason: HealthReason | None,
        description: str,
    ) -> None:
        if (instance.health, instance.reason) != (health, reason):
            self.events.add(
                EventKind.HEALTH,
                f"{instance.name}: {health.value}" + (f" ({reason.value})" if reason else ""),
            )
            log.info(
                "target %s: %s%s%s",
                instance.name,
                health.value,
                f" ({reason.value})" if reason else "",
                f": {description}" if description else "",
            )
        if (health is TargetHealth.AVAILABLE) != (instance.available_since is not None):
            now = time.monotonic()
            if instance.available_since is None:
                instance.available_since = now
            else:
                instance.available_seconds += now - instance.available_since
                instance.available_since = None
        instance.health, instance.reason, instance.description = health, reason, description

    def _choose_writer(self) -> None:
        """Exactly one writer serves the default endpoint. A second instance that also
        accepts writes (a split brain) is not followed: the current writer stays, and the
        other is reported INVALID_REPLICATION_STATE."""
        writers = [i for i in self.instances if i.is_writer]
        current = self.writer
        if current is not None and current in writers:
            for other in writers:
                if other is not current:
                    self._mark(
                        other,
                        TargetHealth.UNAVAILABLE,
                        HealthReason.INVALID_REPLICATION_STATE,
                        f"accepts writes while {current.name} is the writer",
                    )
            return
        chosen = writers[0] if writers else None
        if chosen is current:
            return
        self.writer = chosen
        self.events.add(EventKind.WRITER, _writer_change(current, chosen))
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()
        now = time.monotonic()
        if chosen is None:
            self._writer_lost_at = now
            log.warning("no writer among the targets; new transactions wait for one")
        else:
            log.info("writer is now %s", chosen.name)
        self.on_writer_change(current, chosen)
        if chosen is not None and current is not None:
            self.on_failover(chosen, 0.0)
        elif chosen is not None and self._writer_lost_at > 0:
            self.on_failover(chosen, now - self._writer_lost_at)


def _writer_change(old: Instance | None, new: Instance | None) -> str:
    if new is None:
        return f"writer {old.name if old else '(none)'} lost; new transactions wait for one"
    return f"writer {old.name} -> {new.name}" if old else f"writer is {new.name}"
