"""``dbmux demo``: serverless-style connection storms, straight at a database and through dbmux.

A throwaway database with a small max_connections gets hit by many short-lived clients at
once, each doing what a serverless function invocation does: connect, run one short
transaction, disconnect. First the clients go straight to the database, which refuses those
beyond its connection slots (PostgreSQL: "sorry, too many clients already", SQLSTATE 53300;
MariaDB: "Too many connections", error 1040); then the same workload goes through dbmux, which
accepts every client and multiplexes their transactions over a small pool of server
connections. A report compares the two runs. ``dbmux demo`` storms PostgreSQL with asyncpg
clients, then MariaDB with PyMySQL clients, each blocking on a thread of its own as a Lambda
function would.

Then a failover: a PostgreSQL primary and its synchronous streaming replica behind dbmux, many
writers on long-lived connections, the primary killed (SIGKILL) and the replica promoted, with
a live timeline of the writes and a summary: how long writes stopped next to how long the
promotion took, and whether any connection was dropped or any acknowledged commit lost
(dbmux.drill, which the benchmark runs too).

`storm_report()` does the work for one database and returns a `DemoReport` (the tests inspect
it); `failover_report()` runs the failover and returns the drill's `DrillResult`; `run_demo()`
is what ``dbmux demo`` calls: it prints the reports and returns the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dbmux.drill import DrillResult
from dbmux.storm import (
    CONNECT_TIMEOUT,
    TIMEOUT,
    Invocation,
    PhaseResult,
    pymysql_invocations,
    run_clients,
)

APP_USER = "app"
APP_DB = "app"
POOL_PERCENT = 20  # dbmux's max_connections_percent in the demo
INVOCATIONS_PER_CLIENT = 5
PHASE_TIMEOUT = 120.0  # seconds for one storm, so that a hang cannot make the demo hang
SAMPLE_INTERVAL = 0.1  # seconds between samples of the app's server connections
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


class UsageError(Exception):
    """Arguments the demo cannot work with."""


# ----------------------------------------------------------------------------- results


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


# ----------------------------------------------------------------------------- the storm


class Sampler:
    """Counts the app's server connections over an admin connection made before the storm.

    The admin is a superuser, and superusers have connection slots of their own (PostgreSQL's
    superuser_reserved_connections, MariaDB's one connection beyond max_connections for
    SUPER), so the sampler never takes one of the slots the storm competes for.
    """

    def __init__(self, count: Callable[[], Awaitable[int]]) -> None:
        self.count = count
        self.now = 0
        self.peak = 0

    async def sample(self) -> int:
        self.now = await self.count()
        self.peak = max(self.peak, self.now)
        return self.now

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def wait_for_zero(self, timeout: float = 15.0) -> None:
        """Let the previous storm's server connections end before the next one is measured."""
        deadline = time.monotonic() + timeout
        while await self.sample() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def _storm(
    phase: PhaseResult,
    invocation: Invocation,
    sampler: Sampler,
    show: Callable[[], None],
    console: Console,
    pool_open: Callable[[], int] | None,
) -> None:
    """Run the phase's invocations, `phase.clients` at a time, with progress on the console."""

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
        async with asyncio.timeout(PHASE_TIMEOUT):
            await run_clients(phase, invocation)
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


# ------------------------------------------------------------------------- the databases


class _Database:
    """A throwaway database to storm: how to start it, how its clients run the storm's
    invocation, and an admin connection that counts the app's connections and rows."""

    name: str  # as the report names it
    family: str  # dbmux's engine_family
    refused: str  # the failure cause of a login refused for want of connection slots
    client: str  # how the storm's clients connect, for the storm's description
    host: str
    port: int
    version: str
    reserved = 0  # connections of max_connections only superusers may use
    slots_note = ""  # what the setup line says about the connection slots

    def start(self, resources: contextlib.ExitStack, max_connections: int, password: str) -> None:
        """Start the server (cleaned up by `resources`) with the app's user, database and an
        orders table."""
        raise NotImplementedError

    def invocations(
        self, host: str, port: int, password: str, clients: int
    ) -> AbstractContextManager[Invocation]:
        raise NotImplementedError

    async def open_admin(self) -> None:
        raise NotImplementedError

    async def connections(self) -> int:
        """The app user's server connections now."""
        raise NotImplementedError

    async def rows(self, phase: str) -> int:
        """Rows the phase left in the orders table."""
        raise NotImplementedError

    async def close_admin(self) -> None:
        raise NotImplementedError


class _Postgres(_Database):
    name = "PostgreSQL"
    family = "POSTGRESQL"
    refused = TOO_MANY_CLIENTS
    client = "asyncpg with its default settings"

    def start(self, resources: contextlib.ExitStack, max_connections: int, password: str) -> None:
        from dbmux.testing import PostgresCluster

        self._superuser_password = secrets.token_urlsafe(16)
        cluster = resources.enter_context(
            PostgresCluster(
                max_connections=max_connections,
                auth_method="scram-sha-256",
                password=self._superuser_password,
            )
        )
        cluster.create_user(APP_USER, password)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.psql(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, phase text NOT NULL,"
            " invocation int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());"
            f"ALTER TABLE orders OWNER TO {APP_USER}",
            dbname=APP_DB,
        )
        self.cluster = cluster
        self.host, self.port = cluster.host, cluster.port
        self.version = cluster.psql("SHOW server_version").split()[0]
        self.reserved = int(cluster.psql("SHOW superuser_reserved_connections"))
        self.slots_note = (
            f"; {self.reserved} of its {max_connections} connections are reserved for superusers"
        )

    @contextlib.contextmanager
    def invocations(
        self, host: str, port: int, password: str, clients: int
    ) -> Iterator[Invocation]:
        import asyncpg

        async def invocation(phase: PhaseResult, number: int) -> None:
            conn = await asyncpg.connect(
                host=host,
                port=port,
                user=APP_USER,
                password=password,
                database=APP_DB,
                timeout=CONNECT_TIMEOUT,
            )
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO orders (phase, invocation) VALUES ($1, $2)", phase.name, number
                    )
                    await conn.fetchval("SELECT count(*) FROM orders WHERE phase = $1", phase.name)
                phase.committed += 1
                await conn.close()
            except BaseException:  # also on cancellation (Ctrl-C)
                conn.terminate()
                raise

        yield invocation

    async def open_admin(self) -> None:
        import asyncpg

        self._admin = await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.cluster.superuser,
            password=self._superuser_password,
            database=APP_DB,
            timeout=CONNECT_TIMEOUT,
        )

    async def connections(self) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
        return int(await self._admin.fetchval(sql, APP_USER))

    async def rows(self, phase: str) -> int:
        return int(
            await self._admin.fetchval("SELECT count(*) FROM orders WHERE phase = $1", phase)
        )

    async def close_admin(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin.close(timeout=5)


def _orders_transaction(cursor: Any, phase: str, number: int) -> None:
    """The storm's transaction for PyMySQL (between its BEGIN and COMMIT)."""
    cursor.execute("INSERT INTO orders (phase, invocation) VALUES (%s, %s)", (phase, number))
    cursor.execute("SELECT count(*) FROM orders WHERE phase = %s", (phase,))
    cursor.fetchone()


class _MariaDB(_Database):
    name = "MariaDB"
    family = "MYSQL"
    refused = TOO_MANY_CONNECTIONS
    client = (
        "PyMySQL with its default settings but TLS, which these servers do not offer, each "
        "client blocking on a thread of its own as a Lambda function would"
    )
    slots_note = "; one more connection is kept for a user with SUPER"

    def start(self, resources: contextlib.ExitStack, max_connections: int, password: str) -> None:
        from dbmux.testing import MariaDBServer

        self._root_password = secrets.token_urlsafe(16)
        server = resources.enter_context(
            MariaDBServer(max_connections=max_connections, root_password=self._root_password)
        )
        server.create_user(APP_USER, password)
        server.create_database(APP_DB, owner=APP_USER)
        server.sql(
            "CREATE TABLE orders (id bigint AUTO_INCREMENT PRIMARY KEY,"
            " phase varchar(16) NOT NULL, invocation int NOT NULL,"
            " created_at timestamp(6) NOT NULL DEFAULT current_timestamp(6), KEY (phase))",
            APP_DB,
        )
        self.host, self.port = server.host, server.port
        self.version = server.sql("SELECT VERSION()").split("-")[0]
        # One thread for the admin connection: PyMySQL connections are not thread-safe, and
        # a sample cancelled by the end of a storm may still be running when the next starts.
        self._admin_thread = resources.enter_context(ThreadPoolExecutor(max_workers=1))

    def invocations(
        self, host: str, port: int, password: str, clients: int
    ) -> AbstractContextManager[Invocation]:
        connect = {"host": host, "port": port, "user": APP_USER, "password": password}
        connect["database"] = APP_DB
        return pymysql_invocations(connect, _orders_transaction, clients)

    async def _admin_call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._admin_thread, fn)

    async def _count(self, sql: str, arg: str) -> int:
        def run() -> int:
            with self._admin.cursor() as cursor:
                cursor.execute(sql, (arg,))
                return int(cursor.fetchone()[0])

        return int(await self._admin_call(run))

    async def open_admin(self) -> None:
        import pymysql

        self._admin = await self._admin_call(
            lambda: pymysql.connect(
                host=self.host,
                port=self.port,
                user="root",
                password=self._root_password,
                database=APP_DB,
                autocommit=True,  # every count sees the rows committed so far
                connect_timeout=CONNECT_TIMEOUT,
            )
        )

    async def connections(self) -> int:
        sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = %s"
        return await self._count(sql, APP_USER)

    async def rows(self, phase: str) -> int:
        return await self._count("SELECT count(*) FROM orders WHERE phase = %s", phase)

    async def close_admin(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin_call(self._admin.close)


DATABASES: dict[str, type[_Database]] = {"postgresql": _Postgres, "mysql": _MariaDB}
# The client driver each database's storm needs (all come with dbmux[demo]).
DRIVERS = {"postgresql": "asyncpg", "mysql": "pymysql"}


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
    database: str = "postgresql",
) -> DemoReport:
    """Start the database ("postgresql" or "mysql") and dbmux, run both storms with progress
    on `out`, clean up, report.

    KeyboardInterrupt propagates (after cleanup); setup problems raise ServerError and friends.
    """
    from dbmux.embedded import EmbeddedDbmux

    if database not in DATABASES:
        raise UsageError(f"unknown database {database!r}; choose from {', '.join(DATABASES)}")
    if clients < 1:
        raise UsageError("--clients must be at least 1")
    if max_connections < 10:
        raise UsageError("--max-connections must be at least 10")
    db = DATABASES[database]()
    invocations = invocations or clients * INVOCATIONS_PER_CLIENT
    console = Console(out if out is not None else sys.stdout)
    _raise_fd_limit(2 * clients + max_connections + 200, console)

    app_password = secrets.token_urlsafe(16)
    resources = contextlib.ExitStack()
    try:
        t0 = time.monotonic()
        console.say(
            _paragraph(
                f"dbmux demo: a serverless-style connection storm against a small {db.name}, "
                "first straight at the database, then through dbmux.",
                indent="",
            )
        )
        console.say()
        console.say(f"Starting a throwaway {db.name} (max_connections = {max_connections}) ...")
        db.start(resources, max_connections, app_password)
        console.say(
            _paragraph(
                f"{db.name} {db.version} on {db.host}:{db.port}, ready in "
                f"{time.monotonic() - t0:.1f} s{db.slots_note}",
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
                    "engine_family": db.family,
                    "listen": "127.0.0.1:0",
                    "auth": [{"secret": f"file:{secret}"}],
                    "target_group": {
                        "connection_pool_config": {"max_connections_percent": POOL_PERCENT},
                        "targets": [{"host": db.host, "port": db.port}],
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
                f"COMMIT, and disconnects ({db.client}).",
                indent="",
            )
        )
        console.say()

        report = DemoReport(
            clients=clients,
            invocations=invocations,
            max_connections=max_connections,
            reserved_connections=db.reserved,
            server_version=db.version,
            direct=PhaseResult("direct", invocations, clients),
            dbmux=PhaseResult("dbmux", invocations, clients),
            database=db.name,
            refused=db.refused,
        )

        async def main() -> None:
            await db.open_admin()
            sampler = Sampler(db.connections)
            try:
                targets = [
                    (report.direct, db.host, db.port, None),
                    (report.dbmux, proxy_host, proxy_port, lambda: budget.open),
                ]
                for phase, host, port, pool_open in targets:

                    def show(phase: PhaseResult = phase) -> None:
                        console.progress(
                            progress_line(phase, sampler.now, max_connections, console.width)
                        )

                    with db.invocations(host, port, app_password, clients) as invocation:
                        await _storm(phase, invocation, sampler, show, console, pool_open)
                    phase.rows_committed = await db.rows(phase.name)
            finally:
                await db.close_admin()

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


# ------------------------------------------------------------------------- the failover

FAILOVER_WRITERS = 50
FAILOVER_IDLE = 5
FAILOVER_BEFORE = 2.0  # seconds of writes before the primary is killed
FAILOVER_AFTER = 3.0  # seconds of writes after they resumed
TIMELINE_STEP = 0.2  # seconds between timeline lines around the failover
TIMELINE_TAIL = 1.0  # seconds of timeline lines after writes resumed


def _timeline_ticker(console: Console, result: DrillResult) -> Callable[[DrillResult], None]:
    """A line every TIMELINE_STEP from the failure until a second after writes resumed (and
    at every event); before and after, a progress line (redrawn on a terminal)."""
    from dbmux.drill import Timeline

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
) -> DrillResult:
    """Start a PostgreSQL primary and synchronous replica and dbmux in front of both, run the
    writers through dbmux, kill the primary, promote the replica, with a live timeline on
    `out`; clean up and return the drill's result."""
    from dbmux import drill

    console = Console(out if out is not None else sys.stdout)
    console.say(
        _paragraph(
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
    with (
        drill.open_pair("postgresql", writers + idle_clients) as db,
        drill.embedded_dbmux(db) as mux,
    ):
        host, port = mux.address()
        targets = mux.proxy().targets
        console.say(
            _paragraph(
                f"primary {db.primary[0]}:{db.primary[1]}, replica {db.replica[0]}:"
                f"{db.replica[1]} (synchronous_standby_names = '*': no acknowledged commit may "
                f"be lost), ready in {time.monotonic() - t0:.1f} s; dbmux on {host}:{port} "
                "probes both every 0.2 s",
            )
        )
        console.say()
        console.say(
            _paragraph(
                f"{writers} writers (asyncpg, autocommit INSERTs, {drill.PAUSE * 1000:g} ms "
                f"apart) and {idle_clients} idle clients, all through dbmux; {before:g} s of "
                f"writes, the failover, {after:g} s more. Timeline (t since the writers "
                "started):",
                indent="",
            )
        )
        run = drill.Drill(
            result,
            db,
            lambda: db.connect(host, port),
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
    from dbmux.drill import seconds, summary_rows

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
        _paragraph(
            "promotion time: from the SIGKILL of the primary until the promoted replica took a "
            "write on a direct connection (measured by the demo, every 10 ms); write gap: the "
            "longest time without any acknowledged write, across all writers."
        )
    )
    for cause, example in r.examples.items():
        lines.append(_paragraph(f"failed operations, {cause} x{r.failures[cause]}: {example}"))
    lines.append("")
    lines.append("  Targets:")
    for what, met in r.verdicts():
        lines.append(f"    {what}: {'met' if met else 'NOT MET'}")
    lines.append("")
    lines.append(textwrap.fill(failover_conclusion(r), width=REPORT_WIDTH))
    return "\n".join(lines)


def failover_conclusion(result: DrillResult) -> str:
    from dbmux.drill import seconds

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


def run_demo(
    clients: int = 400, max_connections: int = 100, *, mysql: bool = True, failover: bool = True
) -> int:
    """``dbmux demo``: storm PostgreSQL, then MariaDB unless `mysql` is False, and print each
    comparison; then the failover unless `failover` is False. 0 if dbmux failed no client."""
    console = Console(sys.stdout)
    databases = ["postgresql", "mysql"] if mysql else ["postgresql"]
    missing = [DRIVERS[d] for d in databases if importlib.util.find_spec(DRIVERS[d]) is None]
    if missing:
        console.say(
            f"dbmux demo drives client drivers that are not installed ({', '.join(missing)}): "
            "pip install 'dbmux[demo]' (make demo does this for you)."
        )
        return 1
    from dbmux.testing import CommandError, ServerError

    started = time.monotonic()
    code = 0
    for database in databases:
        if database != databases[0]:
            console.say()
            console.say("-" * REPORT_WIDTH)
            console.say()
        try:
            report = storm_report(clients, max_connections, database=database)
        except KeyboardInterrupt:
            console.say("Interrupted; the throwaway database and dbmux have been shut down.")
            return 130
        except (ServerError, CommandError) as error:
            name = DATABASES[database].name
            skip = " (dbmux demo --skip-mysql leaves it out)" if database == "mysql" else ""
            console.say(f"dbmux demo: could not set up the throwaway {name}{skip}:\n{error}")
            code = 1
            continue
        except UsageError as error:
            console.say(f"dbmux demo: {error}")
            return 1
        console.say()
        console.say(format_report(report))
        code = max(code, report.exit_code)
    if failover:
        console.say()
        console.say("-" * REPORT_WIDTH)
        console.say()
        try:
            result = failover_report()
        except KeyboardInterrupt:
            console.say("Interrupted; the throwaway databases and dbmux have been shut down.")
            return 130
        except (ServerError, CommandError, RuntimeError) as error:
            console.say(f"dbmux demo: the failover could not be set up:\n{error}")
            return 1
        console.say()
        console.say(format_failover(result))
        code = max(code, failover_exit_code(result))
    console.say()
    console.say(f"(demo took {time.monotonic() - started:.0f} s; everything it started is gone)")
    return code
