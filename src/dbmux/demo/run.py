"""``dbmux demo``: serverless-style connection storms, straight at a database and through dbmux.

A throwaway database with a small max_connections gets hit by many short-lived clients at
once, each doing what a serverless function invocation does: connect, run one short
transaction, disconnect. First the clients go straight to the database, which refuses those
beyond its connection slots (PostgreSQL: "sorry, too many clients already", SQLSTATE 53300;
MariaDB: "Too many connections", error 1040); then the same workload goes through dbmux, which
accepts every client and multiplexes their transactions over a small pool of server
connections. A report compares the two runs. ``dbmux demo`` storms PostgreSQL with asyncpg
clients, then MariaDB with PyMySQL clients, each blocking on a thread of its own as a Lambda
function would. The clients are on TLS unless ``--no-tls``: the database and dbmux offer
certificates of a throwaway CA, which every client checks (verify-full).

Then a failover: a PostgreSQL primary and its synchronous streaming replica behind dbmux, many
writers on long-lived connections, the primary killed (SIGKILL) and the replica promoted, with
a live timeline of the writes and a summary: how long writes stopped next to how long the
promotion took, and whether any connection was dropped or any acknowledged commit lost
(dbmux.demo.drill, which the benchmark runs too).

`storm_report()` does the work for one database and returns a `DemoReport` (the tests inspect
it); `failover_report()` (dbmux.demo.failover) runs the failover and returns the drill's
`DrillResult`; `run_demo()` is what ``dbmux demo`` calls: it prints the reports and returns the
exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TextIO

from dbmux.demo.databases import APP_USER, DATABASES, DRIVERS
from dbmux.demo.failover import failover_exit_code, failover_report, format_failover
from dbmux.demo.report import (
    POOL_PERCENT,
    REPORT_WIDTH,
    Console,
    DemoReport,
    format_report,
    paragraph,
    progress_line,
)
from dbmux.demo.storm import Invocation, PhaseResult, run_clients
from dbmux.eventloop import run
from dbmux.testing.certs import TestCA

INVOCATIONS_PER_CLIENT = 5
PHASE_TIMEOUT = 120.0  # seconds for one storm, so that a hang cannot make the demo hang
SAMPLE_INTERVAL = 0.1  # seconds between samples of the app's server connections


class UsageError(Exception):
    """Arguments the demo cannot work with."""


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


# ----------------------------------------------------------------------------- setup


def _tls_note(tls: bool) -> str:
    if not tls:
        return "TLS is off (--no-tls): every client connects in plaintext."
    return (
        "Every client uses TLS, with the database and with dbmux alike, and checks the "
        "server's certificate against the demo's throwaway CA (verify-full); dbmux talks to "
        "the database in plaintext."
    )


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


def storm_report(
    clients: int = 400,
    max_connections: int = 100,
    *,
    invocations: int | None = None,
    out: TextIO | None = None,
    database: str = "postgresql",
    tls: bool = True,
) -> DemoReport:
    """Start the database ("postgresql" or "mysql") and dbmux, run both storms with progress
    on `out`, clean up, report. With `tls`, the database and dbmux offer TLS with
    certificates of a throwaway CA and every client uses TLS, checking the certificate
    against that CA and the name against the address (verify-full); dbmux talks to the
    database in plaintext.

    KeyboardInterrupt propagates (after cleanup); setup problems raise ServerStartError and friends.
    """
    from dbmux.testing.embedded import EmbeddedDbmux

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
            paragraph(
                f"dbmux demo: a serverless-style connection storm against a small {db.name}, "
                "first straight at the database, then through dbmux.",
                indent="",
            )
        )
        console.say()
        console.say(f"Starting a throwaway {db.name} (max_connections = {max_connections}) ...")
        secret_dir = Path(
            resources.enter_context(tempfile.TemporaryDirectory(prefix="dbmux-demo-"))
        )
        ca = TestCA(secret_dir / "tls", name="dbmux demo CA") if tls else None
        db.start(resources, max_connections, app_password, ca.issue("database") if ca else None)
        console.say(
            paragraph(
                f"{db.name} {db.version} on {db.host}:{db.port}, ready in "
                f"{time.monotonic() - t0:.1f} s{db.slots_note}",
                indent="  ",
            )
        )

        secret = secret_dir / "app.json"
        secret.write_text(json.dumps({"username": APP_USER, "password": app_password}))
        secret.chmod(0o600)
        config = {
            "state_dir": str(secret_dir),  # MySQL's RSA key: throwaway, not the user's
            "proxies": [
                {
                    "name": "demo",
                    "engine_family": db.family,
                    "listen": "127.0.0.1:0",
                    **({"require_tls": True, "tls": ca.issue("proxy").as_tls()} if ca else {}),
                    "auth": [{"secret": f"file:{secret}"}],
                    "target_group": {
                        "connection_pool_config": {"max_connections_percent": POOL_PERCENT},
                        "targets": [{"host": db.host, "port": db.port}],
                    },
                }
            ],
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
            paragraph(
                f"The storm: {invocations} invocations, {clients} at a time. Each one, like a "
                "serverless function, connects, runs BEGIN; INSERT one row; SELECT count(*); "
                f"COMMIT, and disconnects ({db.client}). {_tls_note(ca is not None)}",
                indent="",
            )
        )
        console.say()
        # Built once per storm, as a function keeps its context between invocations.
        client_tls = ca.client_context() if ca else None

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
            tls=ca is not None,
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

                    with db.invocations(
                        host, port, app_password, clients, client_tls
                    ) as invocation:
                        await _storm(phase, invocation, sampler, show, console, pool_open)
                    phase.rows_committed = await db.rows(phase.name)
            finally:
                await db.close_admin()

        try:
            run(main())
        finally:
            report.pool_size = budget.limit
            metrics = dbmux.proxy().metrics
            report.dbmux_counters = {
                "client_logins": int(metrics.client_connections_setup_succeeded.value),
                "client_logins_tls": int(metrics.client_connections_tls.value),
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


def run_demo(
    clients: int = 400,
    max_connections: int = 100,
    *,
    mysql: bool = True,
    failover: bool = True,
    tls: bool = True,
) -> int:
    """``dbmux demo``: storm PostgreSQL, then MariaDB unless `mysql` is False, and print each
    comparison, the clients on TLS unless `tls` is False; then the failover unless `failover`
    is False. 0 if dbmux failed no client. Every dbmux it starts serves the live dashboard at
    one address, printed first."""
    from dbmux.testing.embedded import admin_for_every_dbmux, dashboard_admin

    admin = dashboard_admin()
    Console(sys.stdout).say(
        f"dashboard: http://{admin.listen}/ (live while the demo runs, from when dbmux starts)"
    )
    with admin_for_every_dbmux(admin):
        return _run_demo(clients, max_connections, mysql=mysql, failover=failover, tls=tls)


def _run_demo(clients: int, max_connections: int, *, mysql: bool, failover: bool, tls: bool) -> int:
    console = Console(sys.stdout)
    databases = ["postgresql", "mysql"] if mysql else ["postgresql"]
    missing = [DRIVERS[d] for d in databases if importlib.util.find_spec(DRIVERS[d]) is None]
    if missing:
        console.say(
            f"dbmux demo drives client drivers that are not installed ({', '.join(missing)}): "
            "pip install 'dbmux[demo]' (make demo does this for you)."
        )
        return 1
    from dbmux.testing import CommandError, ServerStartError

    started = time.monotonic()
    code = 0
    for database in databases:
        if database != databases[0]:
            console.say()
            console.say("-" * REPORT_WIDTH)
            console.say()
        try:
            report = storm_report(clients, max_connections, database=database, tls=tls)
        except KeyboardInterrupt:
            console.say("Interrupted; the throwaway database and dbmux have been shut down.")
            return 130
        except (ServerStartError, CommandError) as error:
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
            result = failover_report(tls=tls)
        except KeyboardInterrupt:
            console.say("Interrupted; the throwaway databases and dbmux have been shut down.")
            return 130
        except (ServerStartError, CommandError, RuntimeError) as error:
            console.say(f"dbmux demo: the failover could not be set up:\n{error}")
            return 1
        console.say()
        console.say(format_failover(result))
        code = max(code, failover_exit_code(result))
    console.say()
    console.say(f"(demo took {time.monotonic() - started:.0f} s; everything it started is gone)")
    return code
