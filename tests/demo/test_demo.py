"""`dbmux demo`: small storms against a real throwaway PostgreSQL and MariaDB, checked by their
report data."""

from __future__ import annotations

import io
import re
from collections import Counter

import pytest

from dbmux.demo.drill_result import DrillResult
from dbmux.demo.failover import failover_exit_code, failover_report, format_failover
from dbmux.demo.report import (
    TOO_MANY_CLIENTS,
    TOO_MANY_CONNECTIONS,
    DemoReport,
    conclusion,
    format_report,
    progress_line,
)
from dbmux.demo.run import run_demo, storm_report
from dbmux.demo.storm import PhaseResult

CLIENTS, MAX_CONNECTIONS = 120, 30


# The database each storm runs against, and how it refuses logins beyond max_connections.
REFUSED = {"postgresql": TOO_MANY_CLIENTS, "mysql": TOO_MANY_CONNECTIONS}


@pytest.fixture(scope="module", params=["postgresql", "mysql"])
def demo(request: pytest.FixtureRequest) -> tuple[DemoReport, str]:
    out = io.StringIO()
    report = storm_report(
        clients=CLIENTS, max_connections=MAX_CONNECTIONS, out=out, database=request.param
    )
    assert report.refused == REFUSED[request.param]
    return report, out.getvalue()


def test_direct_storm_is_refused_for_want_of_slots(demo: tuple[DemoReport, str]) -> None:
    report, _ = demo
    direct = report.direct
    assert direct.done == direct.invocations == CLIENTS * 5
    assert direct.failures[report.refused] > 0
    assert direct.succeeded + direct.failed == direct.invocations
    assert direct.peak_server_connections <= MAX_CONNECTIONS


def test_dbmux_storm_has_no_failures(demo: tuple[DemoReport, str]) -> None:
    report, _ = demo
    through = report.dbmux
    assert through.done == through.invocations == CLIENTS * 5
    assert through.failed == 0, (through.failures, through.examples)
    assert through.succeeded == through.invocations
    assert len(through.latencies) == through.succeeded
    assert report.exit_code == 0
    assert report.dbmux_counters["client_logins"] >= through.invocations


def test_rows_committed_equal_successful_invocations(demo: tuple[DemoReport, str]) -> None:
    report, _ = demo
    for phase in report.phases:
        assert phase.rows_committed == phase.committed == phase.succeeded, phase.name


def test_dbmux_stays_within_its_pool(demo: tuple[DemoReport, str]) -> None:
    report, _ = demo
    assert report.pool_size is not None
    assert 1 <= report.pool_size < MAX_CONNECTIONS
    assert 1 <= report.dbmux.peak_server_connections <= report.pool_size
    assert 1 <= report.dbmux.peak_pool_open <= report.pool_size


def test_clients_use_tls_by_default(demo: tuple[DemoReport, str]) -> None:
    """Every client requires TLS and checks the certificate against the demo's CA: the
    direct storm's successes went over TLS to the database, and dbmux counted every login
    of its storm as a TLS one."""
    report, progress = demo
    assert report.tls
    assert report.direct.succeeded > 0
    counters = report.dbmux_counters
    assert counters["client_logins_tls"] == counters["client_logins"] >= report.invocations
    assert "Every client uses TLS" in " ".join(progress.split())
    text = " ".join(format_report(report).split())
    logins = f"{counters['client_logins']} of {counters['client_logins']} client logins on TLS"
    assert logins in text


def test_no_tls_storms_in_plaintext() -> None:
    report = storm_report(
        clients=20, max_connections=10, invocations=40, out=io.StringIO(), tls=False
    )
    assert not report.tls
    assert report.dbmux.failed == 0, report.dbmux.examples
    assert report.dbmux_counters["client_logins"] >= 40
    assert report.dbmux_counters["client_logins_tls"] == 0
    assert "TLS was off (--no-tls)" in " ".join(format_report(report).split())


def test_output_shows_progress_and_the_comparison(demo: tuple[DemoReport, str]) -> None:
    report, progress = demo
    assert "direct " in progress and "dbmux  " in progress
    assert "\r" not in progress  # not a terminal: plain lines
    text = format_report(report)
    assert f"straight at {report.database}" in text and "through dbmux" in text
    name = "too many clients" if report.refused == TOO_MANY_CLIENTS else "too many connections"
    assert f"{name} ({report.refused})" in text
    assert f"{report.dbmux.peak_server_connections} of {MAX_CONNECTIONS}" in text
    assert "DOES NOT match" not in text
    assert f"through dbmux all {report.invocations} succeeded" in " ".join(text.split())


# ------------------------------------------------------------ the failover phase


@pytest.fixture(scope="module")
def failover() -> tuple[DrillResult, str]:
    out = io.StringIO()
    result = failover_report(writers=5, idle_clients=2, before=0.5, after=1.0, out=out)
    return result, out.getvalue()


def test_failover_keeps_every_connection_and_commit(failover: tuple[DrillResult, str]) -> None:
    result, _ = failover
    assert result.problem == "" and result.hung_writers == 0
    assert result.rows_checked and result.acknowledged
    assert result.lost == result.duplicated == result.unexpected == []
    assert result.dropped_writers == set() and result.idle_dropped == 0
    assert result.promoted_at is not None and result.writer_seen_at is not None
    assert result.resumed_at is not None and result.failed_at is not None
    assert result.resumed_at > result.failed_at
    assert failover_exit_code(result) == 0


def test_failover_clients_use_tls_by_default(failover: tuple[DrillResult, str]) -> None:
    """The writers and idle clients (5 + 2) logged into dbmux over TLS, and only so."""
    _, progress = failover
    text = " ".join(progress.split())
    assert "all through dbmux on TLS" in text
    counted = re.search(r"dbmux counted (\d+) of (\d+) client logins on TLS", text)
    assert counted is not None, text
    assert int(counted[1]) == int(counted[2]) >= 7


def test_failover_timeline_and_summary(failover: tuple[DrillResult, str]) -> None:
    result, progress = failover
    assert "\r" not in progress  # not a terminal: plain lines
    for event in ("primary killed", "dbmux: new writer chosen", "writes resumed"):
        assert event in progress, event
    assert "writes/s" in progress
    text = format_failover(result)
    for row in ("promotion time", "longest write gap", "lost commits", "duplicated commits"):
        assert row in text, row
    assert "no idle client connection dropped: met" in text
    assert "no lost or duplicated commit: met" in text
    assert f"all {len(result.acknowledged)} acknowledged commits" in " ".join(text.split())


# ------------------------------------------------------------ report logic, no database


def _phase(name: str, succeeded: int, failures: dict[str, int]) -> PhaseResult:
    phase = PhaseResult(name, invocations=100, clients=50)
    phase.done = succeeded + sum(failures.values())
    phase.succeeded = phase.committed = phase.rows_committed = succeeded
    phase.failures = Counter(failures)
    phase.latencies = [0.01 * (i + 1) for i in range(succeeded)]
    phase.elapsed = 2.0
    phase.finished = True
    return phase


def _report(direct: PhaseResult, through: PhaseResult) -> DemoReport:
    return DemoReport(
        clients=50,
        invocations=100,
        max_connections=20,
        reserved_connections=3,
        server_version="15",
        direct=direct,
        dbmux=through,
        pool_size=4,
    )


def test_failures_through_dbmux_make_exit_code_1_and_are_named() -> None:
    report = _report(
        _phase("direct", 40, {TOO_MANY_CLIENTS: 60}),
        _phase("dbmux", 97, {"08006": 2, "timeout": 1}),
    )
    report.dbmux.examples["08006"] = "ConnectionFailureError: server lost"
    assert report.exit_code == 1
    text = format_report(report)
    assert "60 of 100 invocations (60%)" in " ".join(text.split())
    assert "through dbmux 3 of 100 failed" in " ".join(text.split())
    assert "ConnectionFailureError: server lost" in text


def test_conclusion_counts_other_direct_failures_besides_refusals() -> None:
    report = _report(
        _phase("direct", 40, {TOO_MANY_CLIENTS: 50, "timeout": 10}), _phase("dbmux", 100, {})
    )
    text = " ".join(conclusion(report).split())
    assert '50 of 100 invocations (50%) were refused with "too many clients"' in text
    assert "and 10 more failed (10 timed out)" in text


def test_conclusion_when_the_database_coped() -> None:
    report = _report(_phase("direct", 100, {}), _phase("dbmux", 100, {}))
    assert report.exit_code == 0
    assert "all 100 invocations succeeded this time" in conclusion(report)


def test_unfinished_storm_is_reported_as_partial() -> None:
    through = _phase("dbmux", 50, {})
    through.stopped = "did not finish within 120 s"
    report = _report(_phase("direct", 40, {TOO_MANY_CLIENTS: 60}), through)
    assert report.exit_code == 1
    assert "partial" in conclusion(report)


def test_latency_quantiles_and_progress_line() -> None:
    phase = _phase("direct", 100, {})
    assert phase.latency(0.5) == pytest.approx(0.50)
    assert phase.latency(0.99) == pytest.approx(0.99)
    assert PhaseResult("dbmux", 10, 5).latency(0.5) is None
    phase = _phase("direct", 30, {TOO_MANY_CLIENTS: 20})
    phase.finished = False
    line = progress_line(phase, server_now=17, max_connections=20)
    assert "50/100" in line and "failed 20 (too many clients)" in line
    assert line.endswith("db connections 17/20")
    narrow = progress_line(phase, server_now=17, max_connections=20, width=70)
    assert "(" not in narrow and narrow.endswith("db connections 17/20")
    phase.failures["timeout"] = 2
    assert "(20 too many clients, 2 timed out)" in progress_line(phase, 0, 20)


def test_failover_with_a_lost_commit_is_a_failure() -> None:
    result = DrillResult("dbmux", "PostgreSQL", 5, 2)
    for n, t in enumerate([1.0, 1.1, 1.5, 1.6], start=1):
        result.note_ack(n, t)
    result.failed_at, result.promoted_at = 1.15, 1.3
    result.rows_checked, result.lost = True, [2]
    assert failover_exit_code(result) == 1
    text = " ".join(format_failover(result).split())
    assert "no lost or duplicated commit: NOT MET" in text
    assert "a dbmux bug worth reporting" in text


def test_run_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(clients=10, max_connections=3) == 1
    assert "--max-connections must be at least 10" in capsys.readouterr().out
