"""What one side of the failover drill saw (DrillResult), checked against the drill's
targets, and how the demo and the benchmark print it (Timeline, summary_rows)."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dbmux.demo.storm import classify_outcome

# Targets the drill reports against (README: the failover drill).
GAP_OVER_PROMOTION = 1.0  # seconds the write gap through dbmux may exceed the promotion


@dataclass
class DrillResult:
    """One side of the drill (direct or through dbmux) on one fresh primary and replica.

    Times are time.monotonic(); `started` is when the writers began.
    """

    name: str  # "direct" or "dbmux"
    database: str  # "PostgreSQL" or "MariaDB"
    writers: int
    idle_clients: int
    failover: str = ""  # how the primary was failed, for the report
    started: float = 0.0
    failed_at: float | None = None  # the primary stopped taking writes (SIGKILL, read_only)
    promoted_at: float | None = None  # the replica took a write on a direct connection
    writer_seen_at: float | None = None  # dbmux chose the new writer (when observable)
    resumed_at: float | None = None  # the first acknowledged write after the outage
    ended: float = 0.0  # writers told to stop
    ack_times: list[float] = field(default_factory=list)  # every acknowledged insert
    acknowledged: set[int] = field(default_factory=set)
    uncertain: set[int] = field(default_factory=set)
    failure_times: list[float] = field(default_factory=list)  # failed inserts and connects
    failed_writes: int = 0
    failed_connects: int = 0  # a direct writer looking for the new writer, say
    failures: Counter[str] = field(default_factory=Counter)  # cause -> failed operations
    examples: dict[str, str] = field(default_factory=dict)  # cause -> first message
    dropped_writers: set[int] = field(default_factory=set)  # lost or had to reconnect
    reconnects: int = 0
    idle_dropped: int = 0  # idle clients whose connection did not live through it
    hung_writers: int = 0  # writers still inside an operation STOP_TIMEOUT after the end
    events: list[tuple[float, str]] = field(default_factory=list)  # for the timeline
    rows_checked: bool = False
    rows: int = 0  # rows on the new writer
    lost: list[int] = field(default_factory=list)  # acknowledged, not on the new writer
    duplicated: list[int] = field(default_factory=list)  # on the new writer more than once
    unexpected: list[int] = field(default_factory=list)  # on the new writer, never sent
    problem: str = ""  # why the drill did not complete

    @property
    def failed_ops(self) -> int:
        return self.failed_writes + self.failed_connects

    @property
    def promotion(self) -> float | None:
        """Seconds from the primary's failure until the replica took a direct write."""
        if self.failed_at is None or self.promoted_at is None:
            return None
        return self.promoted_at - self.failed_at

    def longest_gap(self) -> tuple[float, float, float] | None:
        """(seconds, from, to): the longest time between two acknowledged writes of any
        writers, over the whole drill (None with fewer than two)."""
        times = sorted(self.ack_times)
        if len(times) < 2:
            return None
        gap, at = max((b - a, i) for i, (a, b) in enumerate(itertools.pairwise(times)))
        return gap, times[at], times[at + 1]

    @property
    def gap(self) -> float | None:
        found = self.longest_gap()
        return None if found is None else found[0]

    def event(self, what: str, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        self.events.append((at, what))
        return at

    def note_ack(self, n: int, at: float, sent: float | None = None) -> None:
        """Insert n, sent at `sent`, acknowledged at `at`. The first write sent after the
        failure and acknowledged is where writes resumed: it cannot have been the old
        primary's (an ack read just after the failure can be)."""
        self.ack_times.append(at)
        self.acknowledged.add(n)
        sent = at if sent is None else sent
        if self.resumed_at is None and self.failed_at is not None and sent > self.failed_at:
            self.resumed_at = at
            self.event("writes resumed", at)

    def note_failure(self, error: BaseException, *, connect: bool = False) -> None:
        self.failure_times.append(time.monotonic())
        if connect:
            self.failed_connects += 1
        else:
            self.failed_writes += 1
        cause = classify_outcome(error)
        self.failures[cause] += 1
        self.examples.setdefault(cause, f"{type(error).__name__}: {error}".strip())

    def verdicts(self) -> list[tuple[str, bool]]:
        """(what, met) for each target that applies to this side."""
        out: list[tuple[str, bool]] = []
        if self.name == "dbmux":
            gap, promotion = self.gap, self.promotion
            met = (
                gap is not None and promotion is not None and gap <= promotion + GAP_OVER_PROMOTION
            )
            out.append((f"write gap <= promotion + {GAP_OVER_PROMOTION:g} s", met))
            out.append(("no idle client connection dropped", self.idle_dropped == 0))
        out.append(
            ("no lost or duplicated commit", self.rows_checked and not self.lost + self.duplicated)
        )
        return out

    def to_json(self) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.started, 4)

        found = self.longest_gap()
        return {
            "side": self.name,
            "database": self.database,
            "writers": self.writers,
            "idle_clients": self.idle_clients,
            "failover": self.failover,
            "failed_at": rel(self.failed_at),
            "promoted_at": rel(self.promoted_at),
            "writer_seen_at": rel(self.writer_seen_at),
            "resumed_at": rel(self.resumed_at),
            "ended": rel(self.ended),
            "promotion_seconds": None if self.promotion is None else round(self.promotion, 4),
            "longest_gap_seconds": None if found is None else round(found[0], 4),
            "longest_gap_from": None if found is None else rel(found[1]),
            "acknowledged": len(self.acknowledged),
            "uncertain": len(self.uncertain),
            "failed_writes": self.failed_writes,
            "failed_connects": self.failed_connects,
            "failures": dict(self.failures),
            "examples": self.examples,
            "dropped_writers": len(self.dropped_writers),
            "reconnects": self.reconnects,
            "idle_dropped": self.idle_dropped,
            "hung_writers": self.hung_writers,
            "rows": self.rows,
            "lost": self.lost[:100],
            "duplicated": self.duplicated[:100],
            "unexpected": self.unexpected[:100],
            "events": [(rel(t), what) for t, what in self.events],
            "problem": self.problem,
            "verdicts": dict(self.verdicts()),
        }


class Timeline:
    """Lines of a live timeline: writes and failures per interval, and what happened."""

    def __init__(self, result: DrillResult) -> None:
        self.result = result
        self._acks = 0
        self._failures = 0
        self._events = 0
        self._at = 0.0

    def line(self) -> str:
        """`+2.40 s  writes/s  1840  failed  0  | primary killed` since the previous line."""
        r = self.result
        now = time.monotonic()
        start = r.started or now
        span = now - self._at if self._at else 0.0
        acks, failures = len(r.ack_times), len(r.failure_times)
        rate = (acks - self._acks) / span if span > 0 else 0.0
        failed = failures - self._failures
        news = [w for _, w in sorted(r.events[self._events :]) if w != "writers started"]
        self._acks, self._failures, self._events, self._at = acks, failures, len(r.events), now
        line = f"  +{now - start:5.2f} s  writes/s {rate:6.0f}  failed {failed:4d}"
        if news:
            line += "  | " + "; ".join(news)
        return line


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def summary_rows(result: DrillResult) -> list[tuple[str, str]]:
    """(what, value) pairs of one side, as the reports print them."""
    r = result
    found = r.longest_gap()
    failed = f"{r.failed_ops}"
    if r.failed_connects:
        failed += f" ({r.failed_writes} writes, {r.failed_connects} connects)"
    dropped = f"{len(r.dropped_writers)} of {r.writers}"
    idle = f"{r.idle_dropped} of {r.idle_clients}"

    def count(items: list[int]) -> str:
        if not r.rows_checked:
            return "not checked"
        return str(len(items)) + (f" (e.g. {items[0]})" if items else "")

    rows = [
        ("promotion time", seconds(r.promotion)),
        ("longest write gap", seconds(None if found is None else found[0])),
        ("failed client operations", failed),
        ("writer connections dropped", dropped),
        ("idle connections dropped", idle),
        ("acknowledged commits", str(len(r.acknowledged))),
        ("lost commits", count(r.lost)),
        ("duplicated commits", count(r.duplicated)),
        ("rows never sent", count(r.unexpected)),
    ]
    if r.writer_seen_at is not None and r.failed_at is not None:
        rows.insert(1, ("dbmux saw the new writer after", seconds(r.writer_seen_at - r.failed_at)))
    if r.hung_writers:
        rows.append(("writers hung at the end", str(r.hung_writers)))
    return rows
