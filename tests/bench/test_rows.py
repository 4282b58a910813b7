"""The targets of the rows with tables of their own: select-1 (what dbmux adds to a round
trip, against what PgBouncer adds) and active-1000 (every client served, fairly)."""

from __future__ import annotations

from typing import Any

from bench.pgbench import PgbenchResult
from bench.postgres import WORKLOADS
from bench.report import RunResult
from bench.rows import verdict

SELECT_1, ACTIVE = (next(w for w in WORKLOADS if w.key == k) for k in ("select-1", "active-1000"))


def run(workload: str, target: str, **numbers: Any) -> tuple[tuple[str, str], RunResult]:
    client = PgbenchResult(command=[], returncode=0, wall_seconds=10.0, cpu_seconds=1.0, **numbers)
    return (workload, target), RunResult(workload, target, client=client)


def round_trips(**latency_ms: tuple[float, float]) -> dict[tuple[str, str], RunResult]:
    """Per target: pgbench's average latency and that of its quietest second."""
    return dict(
        run("select-1", t, latency_ms=avg, latency_best_second_ms=best)
        for t, (avg, best) in latency_ms.items()
    )


def test_select_1_met_within_10_us_of_pgbouncers_added_latency() -> None:
    results = round_trips(direct=(0.150, 0.100), pgbouncer=(0.200, 0.140), dbmux=(0.209, 0.149))
    average, quietest = verdict([SELECT_1], results)
    assert average.startswith("PASS")
    assert "run's average: dbmux adds 59 µs" in average
    assert "PgBouncer 50 µs" in average
    assert average.endswith("(60 µs) met")
    assert quietest.startswith("PASS")
    assert "quietest second: dbmux adds 49 µs" in quietest
    assert quietest.endswith("(50 µs) met")


def test_select_1_missed_beyond_it() -> None:
    results = round_trips(direct=(0.150, 0.100), pgbouncer=(0.200, 0.140), dbmux=(0.215, 0.151))
    average, quietest = verdict([SELECT_1], results)
    assert average.startswith("FAIL")
    assert average.endswith("missed")
    assert quietest.startswith("FAIL")


def test_select_1_needs_direct_access_to_judge() -> None:
    assert verdict([SELECT_1], round_trips(pgbouncer=(0.2, 0.1), dbmux=(0.2, 0.1))) == []


def active(target: str, low: int, median: float, served: int) -> tuple[tuple[str, str], RunResult]:
    spread = {"min": low, "median": median, "max": 2 * median}
    return run("active-1000", target, clients=1000, tx_per_client=spread, clients_served=served)


def test_active_1000_passes_when_every_client_gets_a_fair_share() -> None:
    results = dict([active("dbmux", 10, 20, 1000), active("pgbouncer", 1, 20, 1000)])
    lines = verdict([ACTIVE], results)
    assert lines[0].startswith("PASS")
    assert "served 1000 of 1000, tx per client 10 / 20 / 40" in lines[0]
    assert "pgbouncer served 1000 of 1000, tx per client 1 / 20 / 40" in lines[1]


def test_active_1000_fails_on_a_starved_client() -> None:
    (line,) = verdict([ACTIVE], dict([active("dbmux", 0, 20, 999)]))
    assert line.startswith("FAIL")


def test_active_1000_fails_on_an_unfair_share() -> None:
    (line,) = verdict([ACTIVE], dict([active("dbmux", 9, 20, 1000)]))
    assert line.startswith("FAIL")
