"""The target group's event log (the dashboard's timeline, /api/proxies/{name}/events): a
failover as the probes see it, in order, and a log that stays bounded."""

from __future__ import annotations

from dbmux.engines.base import ServerError
from dbmux.targets import EventKind, EventLog
from tests.test_targets import PRIMARY, REPLICA, SECONDARY, WRITER, Answers, group
from tests.waiting import eventually

P, S = f"127.0.0.1:{PRIMARY}", f"127.0.0.1:{SECONDARY}"


async def test_a_failover_is_logged_as_the_probes_saw_it() -> None:
    async with group(Answers(p1001=WRITER, p1002=REPLICA)) as g:
        g.answers[PRIMARY] = ServerError("the database system is shutting down", code="gone")
        await eventually(lambda: g.targets.writer is None, "the writer lost")
        g.answers[SECONDARY] = WRITER  # promoted
        await eventually(lambda: g.targets.writer is g.instance(SECONDARY), "the new writer")
        logged = [(e.kind, e.description) for e in g.targets.events]
    writers = [d for kind, d in logged if kind is EventKind.WRITER]
    assert writers == [
        f"writer is {P}",
        f"writer {P} lost; new transactions wait for one",
        f"writer is {S}",
    ]
    assert (EventKind.HEALTH, f"{P}: UNAVAILABLE (CONNECTION_FAILED)") in logged
    assert (EventKind.ROLE, f"{S}: READ_ONLY -> READ_WRITE") in logged
    times = [e.time for e in g.targets.events]
    assert times == sorted(times)


def test_the_log_keeps_the_newest_events_only() -> None:
    log = EventLog(limit=3)
    for n in range(5):
        log.add(EventKind.HEALTH, f"event {n}")
    assert [e.description for e in log] == ["event 2", "event 3", "event 4"]
