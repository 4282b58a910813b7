"""The idle-20k row: what 20,000 logged-in, idle clients cost a proxy in memory.

On a throwaway PostgreSQL cluster set up as the PostgreSQL section's (SCRAM, the owner
`bench`, max_connections 100), each target (PgBouncer, dbmux) is a fresh process taking
--idle-clients clients (bench.idleclients: SCRAM logins, 200 at a time, then silence). Its
resident memory (VmRSS of the process and its descendants) is read before the first client
and once all are logged in and idle; the difference per client is what an idle client
costs. See bench/README.md.

    python -m bench.idle [--idle-clients 20000] [--targets pgbouncer,dbmux] [--baseline SRC]
    python -m bench --only idle-20k            # the same, from the benchmark's entry point
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.idleclients import SPARE_FDS, IdleClients, Outcome, raise_fd_limit
from bench.monitor import tree_memory
from bench.report import BASELINE
from bench.runner import MAX_CONNECTIONS, POOL_PERCENT, POOL_SIZE, RESULTS, SRC, out
from bench.targets import Dbmux, PgBouncer, ProcessTarget, TargetError
from dbmux.testing import CommandError, PostgresCluster, ServerStartError

KEY = "idle-20k"  # what --only takes in `python -m bench`
# dbmux-w2: dbmux with workers: 2; dbmux-before: with --baseline only.
TARGETS = ("pgbouncer", "dbmux", "dbmux-w2", BASELINE)
WORKERS = {"dbmux-w2": 2}  # worker processes per dbmux target, 1 unless named
CLIENTS = 20_000
CONCURRENCY = 200
TARGET_MB = 100  # dbmux's whole RSS with CLIENTS idle clients (issue 14)
SETTLE = 2.0  # seconds between the last login and the reading, for the proxy to go quiet
LOGIN_DEADLINE = 900.0  # seconds for all logins
USER = DBNAME = "bench"
MB = 1024 * 1024


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, standalone: bool
) -> None:
    """The row's options (also offered by `python -m bench`, where --idle-clients is the
    failover drill's too: see bench.__main__)."""
    if standalone:
        parser.add_argument(
            "--idle-clients",
            type=int,
            default=CLIENTS,
            help=f"idle clients per target (default: {CLIENTS})",
        )
        parser.add_argument(
            "--targets",
            metavar="T[,..]",
            help=f"targets, in this order: {', '.join(TARGETS)} (default: pgbouncer,dbmux,"
            f"dbmux-w2, and {BASELINE} with --baseline)",
        )
        parser.add_argument(
            "--baseline",
            type=Path,
            metavar="SRC",
            help=f"also run {BASELINE}: dbmux from SRC, another checkout's src/ directory",
        )
    parser.add_argument(
        "--idle-concurrency",
        type=int,
        default=CONCURRENCY,
        metavar="N",
        help=f"{KEY}: logins under way at once (default: {CONCURRENCY})",
    )


@dataclass
class IdleResult:
    target: str
    requested: int
    connected: int = 0
    failed: int = 0
    dropped: int = 0  # closed by the proxy while idle
    login_seconds: float = 0.0
    rss_before: int | None = None  # bytes, before the first client
    rss_idle: int | None = None  # bytes, with every client logged in and idle
    pss_before: int | None = None  # the same as PSS (see monitor.TreeMemory)
    pss_idle: int | None = None
    processes: int = 0  # in the proxy's process tree, when idle
    errors: dict[str, int] = field(default_factory=dict)
    problem: str = ""

    @property
    def per_client(self) -> float | None:
        if self.rss_before is None or self.rss_idle is None or not self.connected:
            return None
        return (self.rss_idle - self.rss_before) / self.connected

    def projected(self, clients: int) -> float | None:
        """The RSS with `clients` idle clients at this run's cost per client."""
        per = self.per_client
        return None if per is None or self.rss_before is None else self.rss_before + per * clients

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_client": self.per_client}


def fitting_clients(wanted: int) -> tuple[int, str]:
    """As many clients as a proxy can hold under RLIMIT_NOFILE's hard limit (one descriptor
    each, plus its listener, pool and files), at most `wanted`; and a note if fewer."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard - SPARE_FDS >= wanted:
        return wanted, ""
    fit = hard - SPARE_FDS
    return fit, (
        f"RLIMIT_NOFILE's hard limit is {hard} and cannot be raised here (no "
        f"CAP_SYS_RESOURCE): {fit} clients instead of {wanted}"
    )


def _progress(prefix: str, wanted: int) -> Any:
    tty = sys.stdout.isatty()
    last = [0.0]

    def show(outcome: Outcome) -> None:
        now = time.monotonic()
        if now - last[0] < (0.5 if tty else 5.0):
            return
        last[0] = now
        line = f"{prefix} {outcome.connected}/{wanted} logged in, {outcome.failed} failed"
        sys.stdout.write(("\r" + line.ljust(80)) if tty else line + "\n")
        sys.stdout.flush()

    return show


def run_target(
    name: str,
    cluster: PostgresCluster,
    password: str,
    clients: int,
    concurrency: int,
    baseline: Path | None = None,
) -> IdleResult:
    result = IdleResult(name, clients)
    common = {"upstream_port": cluster.port, "user": USER, "password": password, "dbname": DBNAME}
    target: ProcessTarget
    if name == "pgbouncer":
        secret = cluster.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
        target = PgBouncer(
            **common,
            pool_size=POOL_SIZE,
            auth_file_secret=secret,
            max_client_conn=clients + SPARE_FDS,
        )
    else:
        target = Dbmux(
            **common,
            name=name,
            max_connections_percent=POOL_PERCENT,
            source=baseline if name == BASELINE else SRC,
            proxy_settings={"max_client_connections": clients + SPARE_FDS},
            workers=None if name == BASELINE else WORKERS.get(name, 1),
        )
    prefix = f"  {name:<12}"
    target.start()
    idle: IdleClients | None = None
    try:
        time.sleep(1.0)  # past its start-up
        before = tree_memory(target.pid)
        if before is not None:
            result.rss_before, result.pss_before = before.rss, before.pss
        idle = IdleClients(
            host=target.host,
            port=target.port,
            user=USER,
            password=password,
            database=DBNAME,
            clients=clients,
            concurrency=concurrency,
        )
        ready = idle.wait_ready(LOGIN_DEADLINE, _progress(prefix, clients))
        if sys.stdout.isatty():
            sys.stdout.write("\r")
        time.sleep(SETTLE)
        idle_memory = tree_memory(target.pid)
        if idle_memory is not None:
            result.rss_idle, result.pss_idle = idle_memory.rss, idle_memory.pss
            result.processes = idle_memory.processes
        result.connected, result.failed = ready.connected, ready.failed
        result.login_seconds = ready.seconds
        result.errors = dict(ready.errors)
        result.dropped = idle.close().dropped
        out(f"{prefix} {_summary(result)}")
    except TimeoutError as error:
        result.problem = str(error)
        if idle is not None:
            idle.kill()
            result.problem += f"; the clients' stderr: {idle.stderr_tail() or '-'}"
        out(f"{prefix} {error}")
    finally:
        if idle is not None:
            idle.kill()
        note = target.stop()
        problems = [note] if note else []
        problems += target.log_problems()[:5]
        if not target.alive() and result.rss_idle is None:
            problems.append(target.log_tail())
        result.problem = "; ".join(filter(None, [result.problem, *problems]))
        target.cleanup()
    return result


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f} MB"


def _summary(r: IdleResult) -> str:
    per = r.per_client
    tree = f" ({r.processes} processes)" if r.processes > 1 else ""
    return (
        f"{r.connected} logged in ({r.failed} failed) in {r.login_seconds:.0f}s; RSS{tree} "
        f"{_mb(r.rss_before)} -> {_mb(r.rss_idle)}, "
        f"{'-' if per is None else f'{per:,.0f}'} bytes per client"
    )


def run_all(
    wanted: int, concurrency: int, targets: list[str], baseline: Path | None = None
) -> dict[str, IdleResult]:
    """Every target on one throwaway cluster, `wanted` clients each (or as many as fit);
    dbmux-before runs dbmux from `baseline`."""
    raise_fd_limit(wanted + SPARE_FDS)  # the proxies inherit it
    clients, note = fitting_clients(wanted)
    out(
        f"{KEY}: {clients} idle clients per target (SCRAM logins, {concurrency} at a "
        f"time), targets {','.join(targets)}"
    )
    if note:
        out(f"  {note}")
    results: dict[str, IdleResult] = {}
    password = secrets.token_urlsafe(12)
    try:
        with PostgresCluster(
            max_connections=MAX_CONNECTIONS, auth_method="scram-sha-256", password=password
        ) as cluster:
            cluster.create_user(USER, password)
            cluster.create_database(DBNAME, USER)
            for name in targets:
                try:
                    results[name] = run_target(
                        name, cluster, password, clients, concurrency, baseline
                    )
                except TargetError as error:
                    results[name] = IdleResult(name, clients, problem=f"did not start: {error}")
                    out(f"  {name}: NOT run: {error}")
    except (ServerStartError, CommandError) as error:
        out(f"{KEY} NOT run: the cluster could not be set up:\n{error}")
    return results


def report(results: dict[str, IdleResult]) -> list[str]:
    """The table, dbmux's ratios to PgBouncer, and the target."""
    if not results:
        return []
    some = next(iter(results.values()))
    lines = ["", f"## {KEY}: {some.requested} logged-in idle clients (PostgreSQL, SCRAM)", ""]
    header = (
        "target",
        "processes",
        "logged in",
        "failed",
        "dropped",
        "RSS before",
        "RSS idle",
        "PSS idle",
        "B/client",
    )
    rows = [
        (
            r.target,
            str(r.processes),
            str(r.connected),
            str(r.failed),
            str(r.dropped),
            _mb(r.rss_before),
            _mb(r.rss_idle),
            _mb(r.pss_idle),
            "-" if r.per_client is None else f"{r.per_client:,.0f}",
        )
        for r in results.values()
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(header)]
    for row in (header, *rows):
        lines.append("  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)))
    lines += [
        "",
        "RSS: resident memory of the proxy and its descendants, before the first client and "
        f"with every client logged in and idle ({SETTLE:g} s after the last login); PSS: the "
        "same with the pages several processes share (libraries) split among them, so that a "
        "supervisor and its workers count each once; B/client = the RSS difference / clients "
        "logged in.",
    ]
    dbmux, pgbouncer = results.get("dbmux"), results.get("pgbouncer")
    if dbmux is not None and pgbouncer is not None:
        ratios = []
        for what, a, b in (
            ("RSS idle", dbmux.rss_idle, pgbouncer.rss_idle),
            ("B/client", dbmux.per_client, pgbouncer.per_client),
        ):
            if a is not None and b:
                ratios.append(f"{what} {a / b:.1f}x")
        if ratios:
            lines.append(f"dbmux/PgBouncer: {', '.join(ratios)}")
    judged = [r for name, r in results.items() if name in ("dbmux", "dbmux-w2")]
    if judged:
        lines.append("Targets:")
        lines += [f"  {r.target}: {_verdict(r)}" for r in judged]
    for r in results.values():
        for error, count in r.errors.items():
            lines.append(f"  {r.target} failures x{count}: {error}")
        if r.problem:
            lines.append(f"  {r.target}: PROBLEM: {r.problem[:500]}")
    return lines


def _verdict(r: IdleResult) -> str:
    projected = r.projected(CLIENTS)
    if projected is None or r.rss_idle is None:
        return f"RSS with {CLIENTS} idle clients <= {TARGET_MB} MB: not measured"
    met = r.failed == 0 and r.dropped == 0 and projected <= TARGET_MB * MB
    measured = f"{_mb(r.rss_idle)} with {r.connected}"
    if r.connected != CLIENTS:
        measured += f", {_mb(projected)} projected for {CLIENTS}"
    text = f"RSS with {CLIENTS} idle clients <= {TARGET_MB} MB ({measured}), all logged in"
    return f"{text}: {'met' if met else 'NOT MET'}"


def broken(results: dict[str, IdleResult]) -> bool:
    """A target that did not run through, or dbmux missing its target."""
    dbmux = results.get("dbmux")
    return any(r.problem for r in results.values()) or (
        dbmux is not None and not _verdict(dbmux).endswith(": met")
    )


def to_json(results: dict[str, IdleResult]) -> dict[str, Any]:
    return {name: r.to_json() for name, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    add_arguments(parser, standalone=True)
    args = parser.parse_args(argv)
    default = ["pgbouncer", "dbmux", "dbmux-w2", *([BASELINE] if args.baseline else [])]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else default
    if not targets or any(t not in TARGETS for t in targets):
        parser.error(f"--targets takes {', '.join(TARGETS)}")
    if BASELINE in targets and args.baseline is None:
        parser.error(f"target {BASELINE} needs --baseline SRC")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
    if args.idle_clients < 1:
        parser.error("--idle-clients must be at least 1")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        results = run_all(args.idle_clients, args.idle_concurrency, targets, args.baseline)
    except KeyboardInterrupt:
        out("\ninterrupted")
        return 130
    for line in report(results):
        out(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"idle-{stamp}.json"
    path.write_text(json.dumps({"timestamp": stamp, KEY: to_json(results)}, indent=2))
    out()
    out(f"raw results: {path}")
    return 1 if broken(results) or not results else 0


if __name__ == "__main__":
    sys.exit(main())
