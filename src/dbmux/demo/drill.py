"""The failover drill: long-lived writers insert numbered rows while the primary dies and a
replica is promoted; afterwards every number is looked up on the new writer.

What users judge a proxy's failover by is what the drill measures: the longest time without a
successful write, next to how long the promotion itself took; the client operations that
failed; the client connections that were dropped; and commits that were acknowledged but lost,
written twice, or written without being sent. ``dbmux demo`` (its failover phase) and the
benchmark (``python -m bench --only failover``) both run it, so they count the same way.

Each writer owns a range of numbers and one connection, and inserts the next number as soon as
the previous insert returned (an autocommit INSERT, so its return is the COMMIT's
acknowledgement). A number whose insert returned OK is *acknowledged* and must be on the new
writer exactly once; one whose insert raised is *uncertain* (it may or may not have
committed) and may be there at most once. The table has no unique key on n, so a commit that
was run twice (a proxy retrying what it should not) shows as a duplicate instead of an error.

Through dbmux a writer keeps its connection and retries after an error; a direct writer must
find the new writer itself: it knows both addresses (the best case for direct access) and,
when its connection is lost or the server says it is read-only, reconnects to whichever one
takes writes (PostgreSQL: libpq-style multi-host with target_session_attrs=read-write;
MariaDB: each host in turn, checking @@read_only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dbmux.demo.drill_pairs import OP_TIMEOUT, Client, Connect, DrillDatabase
from dbmux.demo.drill_result import DrillResult
from dbmux.demo.storm import classify_outcome
from dbmux.eventloop import run

T = TypeVar("T")

RANGE = 10_000_000  # numbers each writer owns: writer w inserts w * RANGE + 1, + 2, ...
RETRY_DELAY = 0.05  # seconds a writer waits after a failed insert before the next one
PAUSE = 0.02  # seconds a writer waits after an acknowledged insert: 50 writers, <= 2,500 writes/s
RECONNECT_DELAY = 0.1  # seconds a direct writer waits between attempts to find the writer
PROBE_INTERVAL = 0.01  # seconds between the drill's own writes to the promoted replica
STOP_TIMEOUT = 30.0  # seconds writers get to finish their last insert once told to stop
RESUME_TIMEOUT = 60.0  # seconds after the failure the drill waits for writes to resume

READ_ONLY = frozenset({"25006", "1290", "1836"})  # "read-only transaction" / --read-only


@dataclass
class _Writer:
    index: int
    client: Client
    busy: bool = False  # inside an insert or connect


class Drill:
    """One run of the drill: writers and idle clients on `connect`, the failover of `db`,
    and the check of the rows on the new writer.

    reconnect: what a writer does when its server says it is read-only: True (direct
    access) closes the connection and looks for the writer with `reconnect_with`; False
    (through a proxy) retries on the same connection. A lost connection is always reopened,
    and counted as dropped.
    """

    def __init__(
        self,
        result: DrillResult,
        db: DrillDatabase,
        connect: Connect,
        *,
        reconnect: bool,
        reconnect_with: Connect | None = None,
        before: float = 2.0,
        after: float = 3.0,
        pause: float = PAUSE,
        writer_of: Callable[[], object] | None = None,
        tick: Callable[[DrillResult], None] | None = None,
        tick_interval: float = 0.2,
    ) -> None:
        """before/after: seconds of writing before the failover and after writes resumed;
        pause: seconds each writer sleeps after an acknowledged insert; writer_of: what the
        proxy takes for the writer now (the drill notes when it changes); tick: called every
        tick_interval seconds while the drill runs (progress display)."""
        self.result = result
        self.db = db
        self.connect = connect
        self.reconnect = reconnect
        self.reconnect_with = reconnect_with or connect
        self.before, self.after, self.pause = before, after, pause
        self.writer_of = writer_of
        self.tick, self.tick_interval = tick, tick_interval
        self.stopping = False
        self._writers: list[_Writer] = []

    async def _open(self, connect: Connect) -> Client:
        async with asyncio.timeout(OP_TIMEOUT):
            return await connect()

    async def _reopen(self, writer: _Writer) -> None:
        """Connect again until it works (or the drill ends), counting each failed attempt."""
        r = self.result
        r.dropped_writers.add(writer.index)
        with contextlib.suppress(Exception):
            await writer.client.close()
        while not self.stopping:
            try:
                writer.client = await self._open(self.reconnect_with)
                r.reconnects += 1
                return
            except Exception as error:
                r.note_failure(error, connect=True)
                await asyncio.sleep(RECONNECT_DELAY)

    async def _write(self, writer: _Writer) -> None:
        r = self.result
        n = writer.index * RANGE
        while not self.stopping:
            n += 1
            writer.busy = True
            sent = time.monotonic()
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    acked = await writer.client.insert(n, writer.index)
            except Exception as error:
                r.uncertain.add(n)
                r.note_failure(error)
                lost = writer.client.closed or isinstance(error, TimeoutError)
                if lost or (self.reconnect and classify_outcome(error) in READ_ONLY):
                    await self._reopen(writer)
                else:
                    await asyncio.sleep(RETRY_DELAY)
            else:
                r.note_ack(n, acked, sent)
                if self.pause:
                    await asyncio.sleep(self.pause)
            finally:
                writer.busy = False

    async def _probe_promotion(self, client: Client) -> None:
        """Write to the replica directly until it takes the write: the promotion's end."""
        r = self.result
        while True:
            try:
                if client.closed:
                    client = await self._open(lambda: self.db.connect(*self.db.replica))
                await client.probe()
            except Exception:
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            r.promoted_at = r.event("the replica takes writes (direct probe)")
            await client.close()
            return

    async def _watch(self) -> None:
        """Progress ticks, and the moment the proxy changes its writer."""
        r = self.result
        seen = self.writer_of() if self.writer_of else None
        last_tick = 0.0
        while True:
            if self.writer_of is not None:
                now = self.writer_of()
                if now is not seen and r.failed_at is not None:
                    if now is None:
                        r.event("dbmux: no writer, transactions wait")
                    elif r.writer_seen_at is None:
                        r.writer_seen_at = r.event("dbmux: new writer chosen")
                    seen = now
            if self.tick is not None and time.monotonic() - last_tick >= self.tick_interval:
                last_tick = time.monotonic()
                self.tick(r)
            await asyncio.sleep(0.01)

    def run_sync(self) -> DrillResult:
        """run() on an event loop of its own (uvloop where installed)."""
        return run(self.run())

    async def run(self) -> DrillResult:
        """Connect, write, fail over, write on, stop, check; the result is also self.result."""
        r = self.result
        r.failover = self.db.failover
        t0 = time.monotonic()
        clients = await asyncio.gather(
            *(self._open(self.connect) for _ in range(r.writers + r.idle_clients))
        )
        r.event(f"connected in {time.monotonic() - t0:.2f} s", t0)
        self._writers = [_Writer(i + 1, c) for i, c in enumerate(clients[: r.writers])]
        idle = list(clients[r.writers :])
        probe = await self._open(lambda: self.db.connect(*self.db.replica))
        watching = asyncio.create_task(self._watch())
        tasks = [asyncio.create_task(self._write(w)) for w in self._writers]
        r.started = r.event("writers started")
        try:
            await asyncio.sleep(self.before)
            await self._fail_over(probe)
            deadline = r.failed_at + RESUME_TIMEOUT if r.failed_at else time.monotonic()
            while r.resumed_at is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if r.resumed_at is None:
                r.problem = f"writes did not resume within {RESUME_TIMEOUT:g} s of the failure"
            else:
                await asyncio.sleep(self.after)
        finally:
            self.stopping = True
            r.ended = r.event("writers told to stop")
            _done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            r.hung_writers = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            watching.cancel()
            with contextlib.suppress(BaseException):
                await watching
            if self.tick is not None:
                self.tick(r)
        for client in idle:
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await client.ping()
            except Exception:
                r.idle_dropped += 1
            else:
                r.idle_dropped += client.closed
        await asyncio.gather(
            *(c.close() for c in [*idle, *(w.client for w in self._writers)]),
            return_exceptions=True,
        )
        if r.resumed_at is None and (found := r.longest_gap()) and r.failed_at:
            r.resumed_at = found[2] if found[2] > r.failed_at else None
        await asyncio.to_thread(self._check_rows)
        return r

    async def _fail_over(self, probe: Client) -> None:
        r = self.result

        def at() -> None:
            r.failed_at = r.event(
                "primary killed" if self.db.family == "POSTGRESQL" else "primary read-only"
            )

        probing: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(self.db.fail_primary, at)
            if self.db.family != "POSTGRESQL":
                r.event("primary stopped")
            probing = asyncio.create_task(self._probe_promotion(probe))
            await asyncio.to_thread(self.db.promote_replica)
            r.event("promotion command returned")
            async with asyncio.timeout(RESUME_TIMEOUT):
                await probing
        finally:
            if probing is not None and not probing.done():
                probing.cancel()

    def _check_rows(self) -> None:
        r = self.result
        counts = self.db.row_counts()
        r.rows = counts.total()
        present = set(counts)
        r.lost = sorted(r.acknowledged - present)
        r.duplicated = sorted(n for n, c in counts.items() if c > 1)
        r.unexpected = sorted(present - r.acknowledged - r.uncertain)
        r.rows_checked = True
