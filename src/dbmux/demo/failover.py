"""The failover phase of ``dbmux demo``: the drill on a PostgreSQL primary and replica behind
dbmux, with a live timeline and a report of what the clients lost (nothing, if all is well)."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from dbmux.demo.drill import PAUSE, Drill
from dbmux.demo.drill_pairs import embedded_dbmux, open_pair
from dbmux.demo.drill_result import DrillResult, Timeline, seconds, summary_rows
from dbmux.demo.report import REPORT_WIDTH, Console, paragraph, tls_note
from dbmux.testing.certs import TestCA

FAILOVER_WRITERS = 50
FAILOVER_IDLE = 5
FAILOVER_BEFORE = 2.0  # seconds of writes before the primary is killed
FAILOVER_AFTER = 3.0  # seconds of writes after they resumed
TIMELINE_STEP = 0.2  # seconds between timeline lines around the failover
TIMELINE_TAIL = 1.0  # seconds of timeline lines after writes resumed


def _timeline_ticker(console: Console, result: DrillResult) -> Callable[[DrillResult], None]:
    """A line every TIMELINE_STEP from the failure until a second after writes resumed (and
    at every event); before and after, a progress line (redrawn on a terminal)."""
    timeline = Timeline(result)
    state = {"last": 0.0, "events": 0}

    def tick(r: DrillResult) -> None:
        now = time.monotonic()
        news = len(r.events) != state["events"]
        window = r.failed_at is not None and (
            r.resumed_at is None or now - r.resumed_at <= TIMELINE_TAIL
        )
        step = TIMELINE_STEP if window else (0.1 if console.tty else 1.0)
        if not news and now - state["last"] < step:
            return
        state["last"], state["events"] = now, len(r.events)
        if window or news:
            console.say(timeline.line())
        else:
            console.progress(timeline.line())

    return tick


def failover_report(
    writers: int = FAILOVER_WRITERS,
    *,
    idle_clients: int = FAILOVER_IDLE,
    before: float = FAILOVER_BEFORE,
    after: float = FAILOVER_AFTER,
    out: TextIO | None = None,
    tls: bool = True,
) -> DrillResult:
    """Start a PostgreSQL primary and synchronous replica and dbmux in front of both, run the
    writers through dbmux, kill the primary, promote the replica, with a live timeline on
    `out`; clean up and return the drill's result. With `tls` the clients use TLS to dbmux,
    checking its certificate against a throwaway CA."""
    console = Console(out if out is not None else sys.stdout)
    console.say(
        paragraph(
            "dbmux demo, failover: a PostgreSQL primary and its streaming replica behind dbmux; "
            f"{writers} writers, each on one long-lived connection, insert numbered rows; the "
            "primary is killed (SIGKILL) and the replica promoted. Direct clients would lose "
            "their connections and have to find the new writer; through dbmux they keep them.",
            indent="",
        )
    )
    console.say()
    t0 = time.monotonic()
    console.say("Starting a PostgreSQL primary and a synchronous streaming replica ...")
    result = DrillResult("dbmux", "PostgreSQL", writers, idle_clients)
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(open_pair("postgresql", writers + idle_clients))
        certificate, client_tls = None, None
        if tls:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="dbmux-demo-"))
            ca = TestCA(Path(folder), name="dbmux demo CA")
            certificate, client_tls = ca.issue("proxy"), ca.client_context()
        mux = stack.enter_context(embedded_dbmux(db, tls=certificate))
        host, port = mux.address()
        targets = mux.proxy().targets
        console.say(
            paragraph(
                f"primary {db.primary[0]}:{db.primary[1]}, replica {db.replica[0]}:"
                f"{db.replica[1]} (synchronous_standby_names = '*': no acknowledged commit may "
                f"be lost), ready in {time.monotonic() - t0:.1f} s; dbmux on {host}:{port} "
                "probes both every 0.2 s",
            )
        )
        console.say()
        console.say(
            paragraph(
                f"{writers} writers (asyncpg, autocommit INSERTs, {PAUSE * 1000:g} ms "
                f"apart) and {idle_clients} idle clients, all through dbmux"
                f"{' on TLS' if tls else ''}; {before:g} s of "
                f"writes, the failover, {after:g} s more. Timeline (t since the writers "
                "started):",
                indent="",
            )
        )
        run = Drill(
            result,
            db,
            lambda: db.connect(host, port, client_tls),
            reconnect=False,
            before=before,
            after=after,
            writer_of=lambda: targets.writer,
            tick=_timeline_ticker(console, result),
            tick_interval=0.05,
        )
        try:
            with _quiet("dbmux.targets", "dbmux.proxy"):
                run.run_sync()
        finally:
            console.end_line()
        metrics = mux.proxy().metrics
        logins = int(metrics.client_connections_setup_succeeded.value)
        console.say(paragraph(tls_note(tls, logins, int(metrics.client_connections_tls.value))))
    return result


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """dbmux warns when its writer goes away; here that is the show, not news for stderr."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def format_failover(result: DrillResult) -> str:
    """The drill's numbers, the targets they meet or miss, and a conclusion."""
    r = result
    rows = summary_rows(r)
    if r.resumed_at is not None and r.failed_at is not None:
        rows.insert(2, ("writes resumed after", seconds(r.resumed_at - r.failed_at)))
    w0 = max(len(k) for k, _ in rows)
    lines = [
        f"Failover results: {r.writers} writers and {r.idle_clients} idle clients through dbmux",
        "",
    ]
    lines += [f"  {k:<{w0}}   {v}" for k, v in rows]
    lines.append("")
    lines.append(
        paragraph(
            "promotion time: from the SIGKILL of the primary until the promoted replica took a "
            "write on a direct connection (measured by the demo, every 10 ms); write gap: the "
            "longest time without any acknowledged write, across all writers."
        )
    )
    for cause, example in r.examples.items():
        lines.append(paragraph(f"failed operations, {cause} x{r.failures[cause]}: {example}"))
    lines.append("")
    lines.append("  Targets:")
    for what, met in r.verdicts():
        lines.append(f"    {what}: {'met' if met else 'NOT MET'}")
    lines.append("")
    lines.append(textwrap.fill(failover_conclusion(r), width=REPORT_WIDTH))
    return "\n".join(lines)


def failover_conclusion(result: DrillResult) -> str:
    r = result
    if r.problem:
        return f"The failover did not complete: {r.problem}."
    lost = len(r.lost) + len(r.duplicated) + len(r.unexpected)
    dropped = len(r.dropped_writers) + r.idle_dropped
    if lost or dropped or r.hung_writers:
        return (
            f"Through dbmux {dropped} connections were dropped, {r.hung_writers} writers hung "
            f"and {lost} commits were lost, doubled or unexpected: a dbmux bug worth reporting."
        )
    return (
        f"Writes stopped for {seconds(r.gap)} while the promotion took {seconds(r.promotion)}; "
        f"no client lost its connection, {r.failed_ops} "
        f"{'statement' if r.failed_ops == 1 else 'statements'} in flight at the crash got "
        f"an error and {'its writer' if r.failed_ops == 1 else 'their writers'} went on, and "
        f"all {len(r.acknowledged)} acknowledged commits are on the new primary, none twice."
    )


def failover_exit_code(result: DrillResult) -> int:
    """0 when the failover dropped no connection and lost or doubled no commit."""
    r = result
    bad = r.problem or r.hung_writers or r.lost or r.duplicated or r.unexpected
    return 1 if bad or r.dropped_writers or r.idle_dropped or not r.rows_checked else 0
