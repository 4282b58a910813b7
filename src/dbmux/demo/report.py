"""What ``dbmux demo`` prints about its storms: the live progress line and the report that
compares the direct storm with the one through dbmux, checked by its own numbers."""

from __future__ import annotations

import shutil
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from dbmux.demo.storm import TIMEOUT, PhaseResult

POOL_PERCENT = 20  # dbmux's max_connections_percent in the demo
REPORT_WIDTH = 92

TOO_MANY_CLIENTS = "53300"  # PostgreSQL's SQLSTATE for a login beyond max_connections
TOO_MANY_CONNECTIONS = "1040"  # MySQL's error code (ER_CON_COUNT_ERROR) for the same
# How a failure cause reads in the progress line and the report.
CAUSE_NAMES = {
    TOO_MANY_CLIENTS: "too many clients",
    TOO_MANY_CONNECTIONS: "too many connections",
    TIMEOUT: "timed out",
    "2003": "could not connect",
    "2013": "lost connection",
}


@dataclass
class DemoReport:
    clients: int
    invocations: int  # per phase
    max_connections: int
    reserved_connections: int  # superuser_reserved_connections
    server_version: str
    direct: PhaseResult
    dbmux: PhaseResult
    pool_size: int | None = None  # dbmux's server-connection limit, known after first use
    dbmux_counters: dict[str, int] = field(default_factory=dict)
    pin_reasons: Counter[str] = field(default_factory=Counter)
    database: str = "PostgreSQL"
    refused: str = TOO_MANY_CLIENTS  # the cause of a login refused for want of slots
    tls: bool = False  # the clients used TLS (verify-full), with the database and with dbmux

    @property
    def phases(self) -> tuple[PhaseResult, PhaseResult]:
        return self.direct, self.dbmux

    def label(self, phase: PhaseResult) -> str:
        return f"straight at {self.database}" if phase.name == "direct" else "through dbmux"

    @property
    def complete(self) -> bool:
        return all(p.done == p.invocations and p.stopped is None for p in self.phases)

    @property
    def exit_code(self) -> int:
        """0 when every invocation through dbmux succeeded, 1 otherwise."""
        ok = self.complete and self.dbmux.failed == 0 and self.dbmux.succeeded == self.invocations
        return 0 if ok else 1


def cause_name(cause: str) -> str:
    if cause in CAUSE_NAMES:
        return CAUSE_NAMES[cause]
    return cause


# ----------------------------------------------------------------------------- output


class Console:
    """Where the demo writes: a progress line redrawn in place on a terminal, periodic lines
    otherwise (a pipe, a log file, a test's StringIO)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._live = False  # a progress line is on screen without its newline

    def say(self, text: str = "") -> None:
        self.end_line()
        self.out.write(text + "\n")
        self.out.flush()

    @property
    def width(self) -> int | None:
        """Columns a progress line may use; None when lines never get redrawn."""
        if not self.tty:
            return None
        return max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def progress(self, text: str) -> None:
        width = self.width
        if width is not None:
            self.out.write("\r" + text[:width].ljust(width))
            self._live = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end_line(self) -> None:
        if self._live:
            self.out.write("\n")
            self._live = False


def _bar(done: int, total: int, width: int = 10) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _failure_summary(failures: Counter[str], counts: bool = True) -> str:
    if not counts and len(failures) == 1:
        return cause_name(next(iter(failures)))
    return ", ".join(f"{n} {cause_name(c)}" for c, n in failures.most_common(3))


def progress_line(
    phase: PhaseResult, server_now: int, max_connections: int, width: int | None = None
) -> str:
    """`direct [####------]  800/2000  ok 120  failed 680 (too many clients)  db ...`; on a
    narrow terminal the failure causes go first, so that the line never wraps."""
    total = phase.invocations
    core = (
        f"{phase.name:<7}{_bar(phase.done, total)} {phase.done:>{len(str(total))}}/{total}"
        f"  ok {phase.succeeded}  failed {phase.failed}"
    )
    causes = f" ({_failure_summary(phase.failures, counts=False)})" if phase.failed else ""
    if phase.finished:
        db = f"  db connections peak {phase.peak_server_connections}/{max_connections}"
    else:
        db = f"  db connections {server_now}/{max_connections}"
    line = core + causes + db
    if width is not None and len(line) > width:
        line = core + db
    return line


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def paragraph(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, width=REPORT_WIDTH, initial_indent=indent, subsequent_indent=indent)


def format_report(report: DemoReport) -> str:
    """The comparison table, notes that check the numbers, and a conclusion drawn from them."""
    d, p = report.direct, report.dbmux
    rows: list[tuple[str, str, str]] = [
        ("invocations", str(d.done), str(p.done)),
        ("succeeded", str(d.succeeded), str(p.succeeded)),
    ]
    causes = sorted(set(d.failures) | set(p.failures), key=lambda c: -d.failures[c] - p.failures[c])
    if not causes:
        rows.append(("failed", "0", "0"))
    for cause in causes:
        name = cause_name(cause)
        if cause == report.refused:
            name += f" ({cause})"
        rows.append((f"failed: {name}", str(d.failures[cause]), str(p.failures[cause])))
    rows += [
        (
            "latency p50 / p95 / p99 (ms)",
            " / ".join(_ms(d.latency(q)) for q in (0.5, 0.95, 0.99)),
            " / ".join(_ms(p.latency(q)) for q in (0.5, 0.95, 0.99)),
        ),
        ("succeeded per second", f"{d.throughput:.0f}", f"{p.throughput:.0f}"),
        ("wall time (s)", f"{d.elapsed:.1f}", f"{p.elapsed:.1f}"),
        (
            "peak server connections",
            f"{d.peak_server_connections} of {report.max_connections}",
            f"{p.peak_server_connections} of {report.max_connections}",
        ),
        ("rows committed", str(d.rows_committed), str(p.rows_committed)),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(report.label(d)), *(len(r[1]) for r in rows))
    w2 = max(len(report.label(p)), *(len(r[2]) for r in rows))
    lines = [
        f"Results: {report.invocations} invocations, {report.clients} at a time, "
        f"against max_connections = {report.max_connections}",
        "",
        f"  {'':<{w0}}   {report.label(d):>{w1}}   {report.label(p):>{w2}}",
    ]
    lines += [f"  {a:<{w0}}   {b:>{w1}}   {c:>{w2}}" for a, b, c in rows]
    lines.append("")
    lines += [paragraph(note) for note in notes(report)]
    lines.append("")
    lines.append(textwrap.fill(conclusion(report), width=REPORT_WIDTH))
    return "\n".join(lines)


def notes(report: DemoReport) -> list[str]:
    """What the table's numbers mean, and the checks that back them."""
    d, p = report.direct, report.dbmux
    pool = f"its {report.pool_size}" if report.pool_size else "its"
    out = [
        "Latency is connect + transaction + disconnect of the successful invocations; through "
        f"dbmux it includes waiting for one of {pool} server connections. The clients and dbmux "
        "share this one Python process."
    ]
    counters = report.dbmux_counters
    logins, on_tls = counters.get("client_logins", 0), counters.get("client_logins_tls", 0)
    out.append(tls_note(report.tls, logins, on_tls))
    if all(phase.rows_committed == phase.committed for phase in report.phases):
        out.append(
            "Rows committed: the orders table holds exactly one row for each invocation whose "
            "COMMIT was acknowledged, in both storms."
        )
    else:
        out.append(
            f"Rows committed DO NOT match the acknowledged COMMITs: {d.rows_committed} rows for "
            f"{d.committed} commits {report.label(d)}, {p.rows_committed} rows for "
            f"{p.committed} commits {report.label(p)}."
        )
    if report.pool_size is not None:
        out.append(
            f"dbmux's pool limit was {report.pool_size} server connections "
            f"(max_connections_percent = {POOL_PERCENT}); it had at most {p.peak_pool_open} "
            f"open, {report.dbmux_counters.get('server_connections_opened', 0)} opened in all."
        )
    pinned = report.dbmux_counters.get("pinned", 0)
    if pinned:
        reasons = report.pin_reasons
        why = (
            "asyncpg's named prepared statements"
            if reasons and all("prepared_statement" in r for r in reasons)
            else ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        )
        out.append(
            f"dbmux pinned {pinned} client sessions to a server connection until they "
            f"disconnected ({why}); harmless here, as each client runs one transaction and "
            "leaves."
        )
    for phase in report.phases:
        for cause, message in phase.examples.items():
            if cause != report.refused:
                out.append(f"{report.label(phase)}, {cause_name(cause)}, for example: {message}")
    return out


def tls_note(tls: bool, logins: int, on_tls: int) -> str:
    """Whether the clients were on TLS, with dbmux's own count of its TLS logins."""
    if not tls:
        return f"TLS was off (--no-tls): dbmux counted {on_tls} of {logins} client logins on TLS."
    return (
        "TLS: every client connected with TLS, "
        "checking the server's certificate against the demo's throwaway CA; dbmux counted "
        f"{on_tls} of {logins} client logins on TLS (ClientConnectionsTLS)."
    )


def conclusion(report: DemoReport) -> str:
    d, p = report.direct, report.dbmux
    if not report.complete:
        why = "; ".join(f"{report.label(ph)}: {ph.stopped}" for ph in report.phases if ph.stopped)
        return (
            f"The storms did not both finish ({why or 'interrupted'}); these numbers are partial."
        )
    refused = d.failures[report.refused]
    straight = f"Straight at {report.database}"
    if refused:
        direct_part = (
            f"{straight}, {refused} of {d.invocations} invocations "
            f"({100 * refused / d.invocations:.0f}%) were refused with "
            f'"{cause_name(report.refused)}"'
        )
        others = Counter({c: n for c, n in d.failures.items() if c != report.refused})
        if others:
            direct_part += f" and {others.total()} more failed ({_failure_summary(others)})"
    elif d.failed:
        direct_part = f"{straight}, {d.failed} of {d.invocations} invocations failed"
    else:
        direct_part = (
            f"{straight}, all {d.invocations} invocations succeeded this time "
            "(try more --clients for a bigger storm)"
        )
    if p.failed == 0:
        dbmux_part = (
            f"through dbmux all {p.invocations} succeeded, while the database never saw more "
            f"than {p.peak_server_connections} connections from them."
        )
    else:
        dbmux_part = (
            f"through dbmux {p.failed} of {p.invocations} failed "
            f"({_failure_summary(p.failures)}), which is a dbmux bug worth reporting."
        )
    return f"{direct_part}; {dbmux_part}"
