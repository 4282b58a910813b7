"""The failover drill against a real PostgreSQL primary and synchronous replica through an
embedded dbmux: what can go wrong in a failover is checked, never how long it took."""

from __future__ import annotations

import pytest

from dbmux.demo.drill import Drill
from dbmux.demo.drill_pairs import embedded_dbmux, open_pair
from dbmux.demo.drill_result import DrillResult

WRITERS, IDLE = 5, 2


@pytest.fixture(scope="module")
def through_dbmux() -> tuple[DrillResult, int, int | None]:
    """(the drill's result, the replica's port, the port of dbmux's writer afterwards)."""
    result = DrillResult("dbmux", "PostgreSQL", WRITERS, IDLE)
    with open_pair("postgresql", WRITERS + IDLE) as db, embedded_dbmux(db) as mux:
        host, port = mux.address()
        targets = mux.proxy().targets
        run = Drill(
            result,
            db,
            lambda: db.connect(host, port),
            reconnect=False,
            before=0.5,
            after=1.0,
            writer_of=lambda: targets.writer,
        )
        run.run_sync()
        writer = targets.writer.target.port if targets.writer is not None else None
        return result, db.replica[1], writer


def test_the_drill_completes_and_dbmux_follows_the_new_writer(through_dbmux) -> None:
    result, replica_port, writer_port = through_dbmux
    assert result.problem == ""
    assert result.hung_writers == 0
    assert writer_port == replica_port
    assert result.failed_at is not None and result.promoted_at is not None
    assert result.writer_seen_at is not None
    assert result.resumed_at is not None and result.resumed_at > result.failed_at
    after = [t for t in result.ack_times if t > result.promoted_at]
    assert after, "no write was acknowledged after the promotion"


def test_no_commit_is_lost_doubled_or_invented(through_dbmux) -> None:
    result, _, _ = through_dbmux
    assert result.rows_checked
    assert result.acknowledged
    assert result.lost == []
    assert result.duplicated == []
    assert result.unexpected == []
    assert result.rows >= len(result.acknowledged)


def test_no_client_connection_is_dropped(through_dbmux) -> None:
    result, _, _ = through_dbmux
    assert result.dropped_writers == set()
    assert result.reconnects == 0
    assert result.idle_dropped == 0
    # Only statements in flight at the crash may fail: 08006, the server connection lost.
    assert set(result.failures) <= {"08006"}, result.examples


# ------------------------------------------------------------ bookkeeping, no database


def test_longest_gap_and_verdicts() -> None:
    r = DrillResult("dbmux", "PostgreSQL", 2, 1)
    for n, t in enumerate([10.0, 10.1, 10.2, 11.5, 11.6]):
        r.note_ack(n, t)
    r.failed_at, r.promoted_at = 10.25, 10.9
    assert r.longest_gap() == pytest.approx((1.3, 10.2, 11.5))
    assert r.resumed_at is None  # the failure came after these acks were noted
    assert r.promotion == pytest.approx(0.65)
    r.rows_checked = True
    assert dict(r.verdicts()) == {
        "write gap <= promotion + 1 s": True,
        "no idle client connection dropped": True,
        "no lost or duplicated commit": True,
    }
    r.lost = [3]
    r.idle_dropped = 1
    assert not any(met for what, met in r.verdicts() if "gap" not in what)
    r.promoted_at = 10.26
    assert dict(r.verdicts())["write gap <= promotion + 1 s"] is False


def test_writes_resumed_is_the_first_ack_after_the_outage() -> None:
    r = DrillResult("dbmux", "PostgreSQL", 1, 0)
    r.note_ack(1, 1.0, sent=0.99)
    r.failed_at = 1.01
    r.note_ack(2, 1.02, sent=1.0)  # answered before the crash, read just after it
    assert r.resumed_at is None
    r.note_ack(3, 1.05, sent=1.03)  # sent after the crash: the new writer's
    r.note_ack(4, 1.06, sent=1.05)
    assert r.resumed_at == 1.05
    assert [(at, what) for at, what in r.events if "writes resumed" in what] == [
        (1.05, "writes resumed")
    ]
