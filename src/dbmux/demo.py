"""``dbmux demo``: a serverless-style connection storm, straight at PostgreSQL and through dbmux.

A throwaway PostgreSQL cluster with a small max_connections gets hit by many short-lived
clients at once, each doing what a serverless function invocation does: connect, run one short
transaction, disconnect. First the clients go straight to the database, which refuses those
beyond its connection slots ("sorry, too many clients already", SQLSTATE 53300); then the same
workload goes through dbmux, which accepts every client and multiplexes their transactions over
a small pool of server connections. A report compares the two runs.

`storm_report()` does the work and returns a `DemoReport` (the test inspects it);
`run_demo()` is what ``dbmux demo`` calls: it prints the report and returns the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

APP_USER = "app"
APP_DB = "app"
POOL_PERCENT = 20  # dbmux's max_connections_percent in the demo
INVOCATIONS_PER_CLIENT = 5
CONNECT_TIMEOUT = 20.0  # seconds asyncpg may take to connect and log in
INVOCATION_TIMEOUT = 30.0  # seconds for a whole invocation (connect + transaction + close)
PHASE_TIMEOUT = 120.0  # seconds for one storm, so that a hang cannot make the demo hang
SAMPLE_INTERVAL = 0.1  # seconds between pg_stat_activity samples
REPORT_WIDTH = 92

TOO_MANY_CLIENTS = "53300"
TIMEOUT = "timeout"
# How a failure cause reads in the progress line and the report.
CAUSE_NAMES = {TOO_MANY_CLIENTS: "too many clients", TIMEOUT: "timed out"}

PHASES = {"direct": "straight at PostgreSQL", "dbmux": "through dbmux"}


class UsageError(Exception):
    """Arguments the demo cannot work with."""


# ----------------------------------------------------------------------------- results


@dataclass
class PhaseResult:
    """One storm: the same workload either straight at the database or through dbmux."""

    name: str  # "direct" or "dbmux"
    invocations: int  # planned
    clients: int  # invocations in flight at once
    started: float = 0.0  # time.monotonic()
    elapsed: float = 0.0  # seconds, first connect to last disconnect
    done: int = 0  # invocations that finished, one way or the other
    succeeded: int = 0  # committed and disconnected cleanly
    committed: int = 0  # COMMIT acknowledged (a failed disconnect after it still counts here)
    failures: Counter[str] = field(default_factory=Counter)  # cause -> invocations
    examples: dict[str, str] = field(default_factory=dict)  # cause -> first error message
    latencies: list[float] = field(default_factory=list)  # seconds, successful invocations
    peak_server_connections: int = 0  # the app's backends, sampled from pg_stat_activity
    peak_pool_open: int = 0  # dbmux phase: server connections dbmux had open, sampled
    rows_committed: int = 0  # rows of this phase in the table afterwards
    finished: bool = False  # the storm is over, completed or not
    stopped: str | None = None  # why it ended before all invocations ran

    @property
    def label(self) -> str:
        return PHASES[self.name]

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def throughput(self) -> float:
        """Successful invocations per second."""
        return self.succeeded / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, quantile: float) -> float | None:
        """Latency quantile (0..1) of successful invocations in seconds, None without any."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(quantile * len(ordered)) - 1)]


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

    @property
    def phases(self) -> tuple[PhaseResult, PhaseResult]:
        return self.direct, self.dbmux

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


def _paragraph(text: str, indent: str = "  ") -> str:
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
        if cause == TOO_MANY_CLIENTS:
            name += f" ({TOO_MANY_CLIENTS})"
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
    w1 = max(len(d.label), *(len(r[1]) for r in rows))
    w2 = max(len(p.label), *(len(r[2]) for r in rows))
    lines = [
        f"Results: {report.invocations} invocations, {report.clients} at a time, "
        f"against max_connections = {report.max_connections}",
        "",
        f"  {'':<{w0}}   {d.label:>{w1}}   {p.label:>{w2}}",
    ]
    lines += [f"  {a:<{w0}}   {b:>{w1}}   {c:>{w2}}" for a, b, c in rows]
    lines.append("")
    lines += [_paragraph(note) for note in notes(report)]
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
    if all(phase.rows_committed == phase.committed for phase in report.phases):
        out.append(
            "Rows committed: the orders table holds exactly one row for each invocation whose "
            "COMMIT was acknowledged, in both storms."
        )
    else:
        out.append(
            f"Rows committed DO NOT match the acknowledged COMMITs: {d.rows_committed} rows for "
            f"{d.committed} commits {d.label}, {p.rows_committed} rows for {p.committed} "
            f"commits {p.label}."
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
            if cause != TOO_MANY_CLIENTS:
                out.append(f"{phase.label}, {cause_name(cause)}, for example: {message}")
    return out


def conclusion(report: DemoReport) -> str:
    d, p = report.direct, report.dbmux
    if not report.complete:
        why = "; ".join(f"{ph.label}: {ph.stopped}" for ph in report.phases if ph.stopped)
        return (
            f"The storms did not both finish ({why or 'interrupted'}); these numbers are partial."
        )
    refused = d.failures[TOO_MANY_CLIENTS]
    if refused:
        direct_part = (
            f"Straight at PostgreSQL, {refused} of {d.invocations} invocations "
            f'({100 * refused / d.invocations:.0f}%) were refused with "too many clients"'
        )
    elif d.failed:
        direct_part = f"Straight at PostgreSQL, {d.failed} of {d.invocations} invocations failed"
    else:
        direct_part = (
            f"Straight at PostgreSQL, all {d.invocations} invocations succeeded this time "
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


# ----------------------------------------------------------------------------- the storm


def _classify(error: BaseException) -> str:
    """The failure cause: a SQLSTATE for server errors, "timeout", or the exception's class."""
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return TIMEOUT
    return type(error).__name__


class Sampler:
    """Counts the app's server connections via a superuser connection made before the storm.

    Superusers have connection slots of their own (superuser_reserved_connections), so the
    sampler never takes one of the slots the storm competes for.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.now = 0
        self.peak = 0

    async def sample(self) -> int:
        self.now = int(
            await self.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", APP_USER
            )
        )
        self.peak = max(self.peak, self.now)
        return self.now

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def wait_for_zero(self, timeout: float = 15.0) -> None:
        """Let the previous storm's backends exit before the next one is measured."""
        deadline = time.monotonic() + timeout
        while await self.sample() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def _invoke(
    asyncpg: Any, phase: PhaseResult, number: int, host: str, port: int, password: str
) -> None:
    """One serverless-style invocation: connect, one short transaction, disconnect."""
    started = time.perf_counter()
    conn = None
    try:
        async with asyncio.timeout(INVOCATION_TIMEOUT):
            conn = await asyncpg.connect(
                host=host,
                port=port,
                user=APP_USER,
                password=password,
                database=APP_DB,
                timeout=CONNECT_TIMEOUT,
            )
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO orders (phase, invocation) VALUES ($1, $2)", phase.name, number
                )
                await conn.fetchval("SELECT count(*) FROM orders WHERE phase = $1", phase.name)
            phase.committed += 1
            await conn.close()
            conn = None
    except Exception as error:  # every failure is counted by its cause
        cause = _classify(error)
        phase.failures[cause] += 1
        phase.examples.setdefault(cause, f"{type(error).__name__}: {error}".strip())
        phase.done += 1
    else:
        phase.succeeded += 1
        phase.latencies.append(time.perf_counter() - started)
        phase.done += 1
    finally:  # also on cancellation (Ctrl-C), which is not counted as an outcome
        if conn is not None:
            conn.terminate()


async def _storm(
    asyncpg: Any,
    phase: PhaseResult,
    host: str,
    port: int,
    password: str,
    sampler: Sampler,
    show: Callable[[], None],
    console: Console,
    pool_open: Callable[[], int] | None,
) -> None:
    """Keep `phase.clients` invocations in flight until `phase.invocations` have run."""
    numbers = itertools.count()

    async def client() -> None:
        while (number := next(numbers)) < phase.invocations:
            await _invoke(asyncpg, phase, number, host, port, password)

    async def display() -> None:
        interval = 0.1 if console.tty else 3.0
        last = 0.0 if console.tty else time.monotonic()  # a pipe gets no 0/N line
        while True:
            if pool_open is not None:
                phase.peak_pool_open = max(phase.peak_pool_open, pool_open())
            if time.monotonic() - last >= interval:
                show()
                last = time.monotonic()
            await asyncio.sleep(0.02)

    await sampler.wait_for_zero()
    sampler.peak = 0
    sampling = asyncio.create_task(sampler.run())
    displaying = asyncio.create_task(display())
    phase.started = time.monotonic()
    try:
        async with asyncio.timeout(PHASE_TIMEOUT), asyncio.TaskGroup() as group:
            for _ in range(phase.clients):
                group.create_task(client())
    except TimeoutError:
        phase.stopped = f"did not finish within {PHASE_TIMEOUT:.0f} s"
    except BaseException:
        phase.stopped = "interrupted"
        raise
    finally:
        phase.elapsed = time.monotonic() - phase.started
        sampling.cancel()
        displaying.cancel()
        with contextlib.suppress(BaseException):
            await sampling
        with contextlib.suppress(BaseException):
            await displaying
        if pool_open is not None:
            phase.peak_pool_open = max(phase.peak_pool_open, pool_open())
        with contextlib.suppress(Exception):
            await sampler.sample()
        phase.peak_server_connections = sampler.peak
        phase.finished = True
        show()
        console.end_line()


# ----------------------------------------------------------------------------- setup


def _raise_fd_limit(needed: int, console: Console) -> None:
    """Every client is a socket here and, in the dbmux phase, another one in dbmux itself."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        console.say(
            f"warning: this process may open only {soft} files but the storm needs about "
            f"{needed}; expect OSError failures (raise it with `ulimit -n {needed}`)."
        )


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def storm_report(
    clients: int = 400,
    max_connections: int = 100,
    *,
    invocations: int | None = None,
    out: TextIO | None = None,
) -> DemoReport:
    """Start a cluster and dbmux, run both storms with progress on `out`, clean up, report.

    KeyboardInterrupt propagates (after cleanup); setup problems raise ServerError and friends.
    """
    import asyncpg

    from dbmux.embedded import EmbeddedDbmux
    from dbmux.testing import PostgresCluster

    if clients < 1:
        raise UsageError("--clients must be at least 1")
    if max_connections < 10:
        raise UsageError("--max-connections must be at least 10")
    invocations = invocations or clients * INVOCATIONS_PER_CLIENT
    console = Console(out if out is not None else sys.stdout)
    _raise_fd_limit(2 * clients + max_connections + 200, console)

    app_password = secrets.token_urlsafe(16)
    superuser_password = secrets.token_urlsafe(16)
    resources = contextlib.ExitStack()
    try:
        t0 = time.monotonic()
        console.say(
            _paragraph(
                "dbmux demo: a serverless-style connection storm against a small PostgreSQL, "
                "first straight at the database, then through dbmux.",
                indent="",
            )
        )
        console.say()
        console.say(f"Starting a throwaway PostgreSQL (max_connections = {max_connections}) ...")
        cluster = resources.enter_context(
            PostgresCluster(
                max_connections=max_connections,
                auth_method="scram-sha-256",
                password=superuser_password,
            )
        )
        cluster.create_user(APP_USER, app_password)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.psql(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, phase text NOT NULL,"
            " invocation int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());"
            f"ALTER TABLE orders OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        version = cluster.psql("SHOW server_version").split()[0]
        reserved = int(cluster.psql("SHOW superuser_reserved_connections"))
        console.say(
            _paragraph(
                f"PostgreSQL {version} on {cluster.host}:{cluster.port}, ready in "
                f"{time.monotonic() - t0:.1f} s; {reserved} of its {max_connections} "
                "connections are reserved for superusers",
                indent="  ",
            )
        )

        secret_dir = Path(
            resources.enter_context(tempfile.TemporaryDirectory(prefix="dbmux-demo-"))
        )
        secret = secret_dir / "app.json"
        secret.write_text(json.dumps({"username": APP_USER, "password": app_password}))
        secret.chmod(0o600)
        config = {
            "proxies": [
                {
                    "name": "demo",
                    "engine_family": "POSTGRESQL",
                    "listen": "127.0.0.1:0",
                    "auth": [{"secret": f"file:{secret}"}],
                    "target_group": {
                        "connection_pool_config": {"max_connections_percent": POOL_PERCENT},
                        "targets": [{"host": cluster.host, "port": cluster.port}],
                    },
                }
            ]
        }
        dbmux = resources.enter_context(EmbeddedDbmux(config))
        proxy_host, proxy_port = dbmux.address()
        budget = dbmux.proxy().pools.budget
        console.say(
            f"  dbmux on {proxy_host}:{proxy_port} in front of it, with a pool of at most "
            f"{POOL_PERCENT}% of max_connections"
        )
        console.say()
        console.say(
            _paragraph(
                f"The storm: {invocations} invocations, {clients} at a time. Each one, like a "
                "serverless function, connects, runs BEGIN; INSERT one row; SELECT count(*); "
                "COMMIT, and disconnects (asyncpg with its default settings).",
                indent="",
            )
        )
        console.say()

        report = DemoReport(
            clients=clients,
            invocations=invocations,
            max_connections=max_connections,
            reserved_connections=reserved,
            server_version=version,
            direct=PhaseResult("direct", invocations, clients),
            dbmux=PhaseResult("dbmux", invocations, clients),
        )

        async def main() -> None:
            sampler_conn = await asyncpg.connect(
                host=cluster.host,
                port=cluster.port,
                user=cluster.superuser,
                password=superuser_password,
                database=APP_DB,
                timeout=CONNECT_TIMEOUT,
            )
            sampler = Sampler(sampler_conn)
            try:
                targets = [
                    (report.direct, cluster.host, cluster.port, None),
                    (report.dbmux, proxy_host, proxy_port, lambda: budget.open),
                ]
                for phase, host, port, pool_open in targets:

                    def show(phase: PhaseResult = phase) -> None:
                        console.progress(
                            progress_line(phase, sampler.now, max_connections, console.width)
                        )

                    await _storm(
                        asyncpg,
                        phase,
                        host,
                        port,
                        app_password,
                        sampler,
                        show,
                        console,
                        pool_open,
                    )
                    phase.rows_committed = int(
                        await sampler_conn.fetchval(
                            "SELECT count(*) FROM orders WHERE phase = $1", phase.name
                        )
                    )
            finally:
                with contextlib.suppress(Exception):
                    await sampler_conn.close(timeout=5)

        try:
            _run_async(main())
        finally:
            report.pool_size = budget.limit
            metrics = dbmux.proxy().metrics
            report.dbmux_counters = {
                "client_logins": int(metrics.client_connections_setup_succeeded.value),
                "queries": int(metrics.query_requests.value),
                "server_connections_opened": int(
                    metrics.database_connections_setup_succeeded.value
                ),
                "borrow_timeouts": int(metrics.borrow_timeouts.value),
                "pinned": int(metrics.pins()),
            }
            pinned = metrics.registry.metrics.get("DatabaseConnectionsSessionPinned")
            for labels, value in pinned.samples() if pinned else ():
                reason = dict(labels).get("reason", "?")
                if dict(labels).get("proxy") == "demo" and value:
                    report.pin_reasons[reason] += int(value)
        return report
    finally:
        console.end_line()
        with _no_interrupts():
            resources.close()


def run_demo(clients: int = 400, max_connections: int = 100) -> int:
    """``dbmux demo``: run both storms, print the comparison; 0 if dbmux failed no client."""
    console = Console(sys.stdout)
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        console.say(
            "dbmux demo drives the asyncpg client driver, which is not installed: "
            "pip install 'dbmux[demo]' (make demo does this for you)."
        )
        return 1
    from dbmux.testing import CommandError, ServerError

    started = time.monotonic()
    try:
        report = storm_report(clients, max_connections)
    except KeyboardInterrupt:
        console.say("Interrupted; the throwaway database and dbmux have been shut down.")
        return 130
    except (ServerError, CommandError) as error:
        console.say(f"dbmux demo: could not set up the throwaway database:\n{error}")
        return 1
    except UsageError as error:
        console.say(f"dbmux demo: {error}")
        return 1
    console.say()
    console.say(format_report(report))
    console.say()
    console.say(f"(demo took {time.monotonic() - started:.0f} s; everything it started is gone)")
    return report.exit_code
