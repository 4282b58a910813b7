"""The failover drill, directly and through dbmux: many writers on long-lived connections
while the primary fails and a replica is promoted; how long writes stopped, what failed, what
was dropped, and whether any acknowledged commit was lost or written twice.

Each (database, side) gets a fresh primary and replica: PostgreSQL with synchronous streaming
replication, failed by SIGKILL; MariaDB with GTID replication, failed by a clean switchover.
dbmux runs as `dbmux serve` in a process of its own, as in the rest of the benchmark. The
drill itself is dbmux.demo.drill (shared with ``dbmux demo``). See bench/README.md.

    python -m bench.failover [--only postgresql,mysql] [--writers 50] [--after 5]
    python -m bench --only failover            # the same, from the benchmark's entry point
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from bench import idle
from bench.runner import RESULTS, out
from bench.targets import Dbmux, TargetError
from dbmux.demo.drill import PAUSE, Drill
from dbmux.demo.drill_pairs import APP_DB, APP_USER, driver_missing, open_pair
from dbmux.demo.drill_result import DrillResult, Timeline, seconds, summary_rows
from dbmux.testing import CommandError, ServerStartError

DATABASES = ("postgresql", "mysql")
SIDES = ("direct", "dbmux")
# What --only takes in `python -m bench`: all of the drill, or one database's.
KEYS = {"failover": DATABASES, "failover-postgresql": ("postgresql",), "failover-mysql": ("mysql",)}
NAMES = {"postgresql": "PostgreSQL", "mysql": "MariaDB"}
WRITERS = 50
IDLE = 5
BEFORE = 3.0
AFTER = 5.0
PROBE_INTERVAL = 0.2
BORROW_TIMEOUT = 30.0
PROGRESS_EVERY = 1.0  # seconds between progress lines outside the failover's events


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, standalone: bool
) -> None:
    """The drill's options (also offered by `python -m bench`)."""
    if standalone:
        parser.add_argument(
            "--only",
            default=",".join(DATABASES),
            metavar="DB[,..]",
            help="databases to drill: postgresql, mysql (default: both)",
        )
    parser.add_argument(
        "--writers",
        type=int,
        default=WRITERS,
        help=f"writers, one connection each (default: {WRITERS})",
    )
    parser.add_argument(
        "--idle-clients",
        type=int,
        default=IDLE if standalone else None,  # `python -m bench` resolves it per use
        help=f"clients that stay idle through the failover (default: {IDLE})"
        + ("" if standalone else f"; also the {idle.KEY} row's (default: {idle.CLIENTS})"),
    )
    parser.add_argument(
        "--before",
        type=float,
        default=BEFORE,
        help=f"seconds of writes before the failover (default: {BEFORE:g})",
    )
    parser.add_argument(
        "--after",
        type=float,
        default=AFTER,
        help=f"seconds of writes after they resumed (default: {AFTER:g})",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=PAUSE,
        help=f"seconds each writer waits after an acknowledged insert (default: {PAUSE:g})",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=PROBE_INTERVAL,
        help=f"dbmux's target_group.probe_interval (default: {PROBE_INTERVAL:g})",
    )


class Progress:
    """Timeline lines for the failover's events, a progress line every second otherwise."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tty = sys.stdout.isatty()
        self.timeline: Timeline | None = None
        self.events = 0
        self.last = 0.0
        self.live = False

    def tick(self, result: DrillResult) -> None:
        if self.timeline is None:
            self.timeline = Timeline(result)
        news = len(result.events) != self.events
        due = time.monotonic() - self.last >= PROGRESS_EVERY
        in_failover = result.failed_at is not None and result.resumed_at is None
        if not (news or due or in_failover):
            return
        self.events = len(result.events)
        self.last = time.monotonic()
        line = f"{self.prefix} {self.timeline.line().strip()}"
        if self.tty and not news and not in_failover:
            sys.stdout.write("\r" + line[:200].ljust(100))
            self.live = True
        else:
            self.end()
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def end(self) -> None:
        if self.live:
            sys.stdout.write("\n")
            self.live = False


def run_side(database: str, side: str, args: argparse.Namespace) -> DrillResult:
    """One drill on a fresh pair: straight at the servers, or through a `dbmux serve`."""
    clients = args.writers + args.idle_clients
    result = DrillResult(side, NAMES[database], args.writers, args.idle_clients)
    progress = Progress(f"  {database:<10} {side:<6}")
    options: dict[str, Any] = {
        "before": args.before,
        "after": args.after,
        "pause": args.pause,
        "tick": progress.tick,
        "tick_interval": 0.1,
    }
    with open_pair(database, clients) as db:
        if side == "direct":
            Drill(result, db, db.connect_writer, reconnect=True, **options).run_sync()
            progress.end()
            return result
        target = Dbmux(
            db.primary[1],
            APP_USER,
            db.password,
            APP_DB,
            max_connections_percent=20,
            engine_family=db.family,
            pool_settings={"connection_borrow_timeout": BORROW_TIMEOUT},
            targets=db.addresses,
            group_settings={"probe_interval": args.probe_interval},
        )
        target.start()
        try:

            def connect() -> Any:
                return db.connect(target.host, target.port)

            Drill(result, db, connect, reconnect=False, **options).run_sync()
        finally:
            progress.end()
            note = target.stop()
            # dbmux warns when it loses its writer: that is the drill, not a problem.
            problems = [p for p in target.log_problems() if "WARNING" not in p]
            if note:
                problems.insert(0, note)
            if problems:
                result.problem = "; ".join(filter(None, [result.problem, *problems[:5]]))
            target.cleanup()
    return result


def run_all(databases: list[str], args: argparse.Namespace) -> dict[str, dict[str, DrillResult]]:
    """Both sides of each database, direct first; a database that cannot start is reported."""
    results: dict[str, dict[str, DrillResult]] = {}
    out(
        f"Failover drill: {args.writers} writers (one connection each, autocommit INSERTs, "
        f"{args.pause * 1000:g} ms between them), {args.idle_clients} idle clients; "
        f"{args.before:g} s of writes, the failover, {args.after:g} s after writes resumed"
    )
    for database in databases:
        missing = driver_missing(database)
        if missing:
            out(f"  {NAMES[database]}: NOT run, {missing} is not installed")
            continue
        for side in SIDES:
            try:
                results.setdefault(database, {})[side] = run_side(database, side, args)
            except (ServerStartError, CommandError, TargetError, RuntimeError) as error:
                out(f"  {NAMES[database]} {side}: NOT run: {error}")
    return results


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(results: dict[str, dict[str, DrillResult]]) -> list[str]:
    """The table per database, direct beside dbmux, and the targets."""
    lines: list[str] = []
    for database, sides in results.items():
        some = next(iter(sides.values()))
        lines += ["", f"{NAMES[database]}: {some.failover}"]
        if database == "postgresql":
            lines.append("(synchronous replication: no acknowledged commit may be lost)")
        columns = [s for s in SIDES if s in sides]
        rows: dict[str, list[str]] = {}
        for side in columns:
            for what, value in summary_rows(sides[side]):
                rows.setdefault(what, ["-"] * len(columns))[columns.index(side)] = value
        w0 = max(len(k) for k in rows)
        widths = [
            max(len(side), *(len(v[i]) for v in rows.values())) for i, side in enumerate(columns)
        ]
        lines.append(
            "  " + " " * w0 + "".join(f"   {s:>{w}}" for s, w in zip(columns, widths, strict=True))
        )
        for what, values in rows.items():
            cells = "".join(f"   {v:>{w}}" for v, w in zip(values, widths, strict=True))
            lines.append(f"  {what:<{w0}}{cells}")
        lines.append(
            "  promotion: from the primary's failure (SIGKILL; MariaDB: read_only = 1) to the"
        )
        lines.append(
            "  promoted replica's first write on a direct connection, measured by the drill"
        )
        lines.append("Targets:")
        for side in columns:
            r = sides[side]
            for what, met in r.verdicts():
                detail = ""
                if what.startswith("write gap"):
                    detail = f" ({seconds(r.gap)} vs {seconds(r.promotion)})"
                lines.append(f"  {side}: {what}{detail}: {_verdict(met)}")
            if r.problem:
                lines.append(f"  {side}: PROBLEM: {r.problem}")
            if r.hung_writers:
                lines.append(f"  {side}: {r.hung_writers} writers never returned (a bug)")
        for side in columns:
            r = sides[side]
            for cause, example in r.examples.items():
                example = " ".join(example.split())[:150]
                lines.append(f"  {side} failures {cause} x{r.failures[cause]}: {example}")
    return lines


def broken(results: dict[str, dict[str, DrillResult]]) -> bool:
    """A drill that did not complete, or a target dbmux missed."""
    return any(
        r.problem or (r.name == "dbmux" and not all(ok for _, ok in r.verdicts()))
        for sides in results.values()
        for r in sides.values()
    )


def to_json(results: dict[str, dict[str, DrillResult]]) -> dict[str, Any]:
    return {db: {side: r.to_json() for side, r in sides.items()} for db, sides in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="The failover drill: writers through a failover, directly and via dbmux.",
    )
    add_arguments(parser, standalone=True)
    args = parser.parse_args(argv)
    databases = [d.strip() for d in args.only.split(",") if d.strip()]
    unknown = [d for d in databases if d not in DATABASES]
    if unknown or not databases:
        parser.error(f"--only takes {', '.join(DATABASES)}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    try:
        results = run_all(databases, args)
    except KeyboardInterrupt:
        out("\ninterrupted")
        return 130
    for line in report(results):
        out(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"failover-{stamp}.json"
    path.write_text(json.dumps({"timestamp": stamp, "failover": to_json(results)}, indent=2))
    out()
    out(f"raw results: {path}  ({time.monotonic() - started:.0f}s in all)")
    return 1 if broken(results) or not results else 0


if __name__ == "__main__":
    sys.exit(main())
