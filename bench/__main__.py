"""python -m bench: dbmux side by side with direct access, PgBouncer and HAProxy.

PostgreSQL: pgbench straight at the cluster, through PgBouncer, HAProxy and dbmux. MariaDB:
sysbench and a connect-per-request storm straight at the server, through HAProxy and dbmux. Each
database is one throwaway server (max_connections 100) and one section of the report:
throughput, latency, failures and peak server connections with dbmux's ratios, workload by
workload. Then the idle-20k row (bench.idle: the proxies' memory with 20,000 idle clients) and
the failover drill (bench.failover), on servers of their own.
Raw numbers go to bench/results/<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import secrets
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import failover, idle, report
from bench.mysql import MysqlBench
from bench.postgres import TLS_GROUP, PostgresBench
from bench.report import BASELINE, DBMUX_TARGETS, DEFAULT_TARGETS, TARGETS, RunResult
from bench.runner import (
    MAX_CONNECTIONS,
    POOL_PERCENT,
    POOL_SIZE,
    RESULTS,
    Bench,
    all_targets,
    borrow_timeout,
    out,
    targets_for,
)
from dbmux.testing import CommandError, ServerStartError

BENCHES: tuple[type[Bench], ...] = (PostgresBench, MysqlBench)
WORKLOADS = tuple(w for b in BENCHES for w in b.workloads)
_BY_KEY = {w.key: w for w in WORKLOADS}
# --only takes a database's name for all of its workloads.
_ENGINES = {b.engine: [w.key for w in b.workloads] for b in BENCHES}
# ... and "tls" for the TLS rows with the plaintext rows they are compared with.
_GROUPS = {**_ENGINES, "tls": TLS_GROUP}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="dbmux against direct access, PgBouncer and HAProxy, side by side: pgbench on "
        "PostgreSQL, sysbench and a connection storm on MariaDB.",
    )
    parser.add_argument(
        "--duration", type=int, default=10, metavar="S", help="seconds per run (default: 10)"
    )
    parser.add_argument(
        "--only",
        default=",".join([*_ENGINES, idle.KEY, "failover"]),
        metavar="WORKLOAD[,..]",
        help=f"workloads to run (default: all): {', '.join(_ENGINES)} (all of that database's), "
        f"tls ({', '.join(TLS_GROUP)}), {', '.join(_BY_KEY)}, {idle.KEY} (the proxies' "
        f"memory with idle clients), or the failover drill: {', '.join(failover.KEYS)}",
    )
    defaults = "; ".join(f"{e}: {','.join(t)}" for e, t in DEFAULT_TARGETS.items())
    parser.add_argument(
        "--targets",
        metavar="T[,..]",
        help=f"targets to run, in this order, for every workload whose database has them: "
        f"{', '.join(TARGETS)} (default: {defaults}; plus dbmux-pin, dbmux with "
        f"session_state: pin, for set-heavy; plus dbmux-nohist, dbmux with "
        f"latency_histograms: false, for select-simple; plus {BASELINE} with --baseline)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help=f"also run target {BASELINE}: dbmux as configured for target dbmux, but from "
        "SRC, the src/ directory of another checkout (a git worktree of an older commit, "
        "say), with this venv's python and PYTHONPATH=SRC; the report puts it beside dbmux "
        f"with a ratio dbmux/{BASELINE}",
    )
    parser.add_argument(
        "--pgbouncer-auth",
        choices=["scram", "plain"],
        default="scram",
        help="what PgBouncer's auth_file holds: the user's SCRAM secret, as auth_query would "
        "give it (default), or the plain password, which costs PgBouncer a PBKDF2 per login",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile each dbmux run with py-spy (flame graph, top functions by wall-clock "
        "time) and, if installed, perf (on-CPU time by library and symbol)",
    )
    group = parser.add_argument_group("the failover drill (--only failover)")
    failover.add_arguments(group, standalone=False)
    group = parser.add_argument_group(f"idle clients (--only {idle.KEY})")
    idle.add_arguments(group, standalone=False)
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in names if w not in _BY_KEY and w not in _GROUPS]
    unknown = [w for w in unknown if w not in failover.KEYS and w != idle.KEY]
    if unknown:
        choices = ", ".join([*_GROUPS, *_BY_KEY, idle.KEY, *failover.KEYS])
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {choices}")
    args.failover = list(dict.fromkeys(d for n in names for d in failover.KEYS.get(n, ())))
    # --idle-clients: the failover drill's idle clients and the idle row's, each its own
    # default unless given.
    given = args.idle_clients
    args.idle_clients = failover.IDLE if given is None else given
    args.idle_row_clients = idle.CLIENTS if given is None else given
    run_idle = idle.KEY in names
    names = [n for n in names if n not in failover.KEYS and n != idle.KEY]
    args.workloads = list(dict.fromkeys(k for n in names for k in _GROUPS.get(n, [n])))
    args.target_list = (
        [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    )
    unknown = [t for t in args.target_list or () if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if args.target_list == []:
        parser.error("--targets names no target")
    chosen = args.target_list or [
        "pgbouncer",
        "dbmux",
        "dbmux-w2",
        *([BASELINE] if args.baseline else []),
    ]
    args.idle_targets = [t for t in chosen if t in idle.TARGETS] if run_idle else []
    if run_idle and not args.idle_targets:
        parser.error(f"--targets names none of {idle.KEY}'s targets ({', '.join(idle.TARGETS)})")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()  # the proxy runs in a temp dir
        if not (args.baseline / "dbmux" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline} holds no dbmux package (want a src/ dir)")
    elif BASELINE in (args.target_list or ()):
        parser.error(f"target {BASELINE} needs --baseline SRC")
    if args.workloads and not any(targets_for(args, _BY_KEY[k]) for k in args.workloads):
        parser.error("--targets names no target the selected workloads' databases have")
    if args.duration < 1:
        parser.error("--duration must be at least 1")
    if args.profile and args.duration < 3:
        parser.error("--profile needs --duration of at least 3")
    return args


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release()}


def print_report(results: dict[tuple[str, str], RunResult]) -> None:
    """After every section: problems, log tails and profiles of all runs."""
    notes = report.problems(results)
    if notes:
        out()
        out("Errors and problems:")
        for line in notes:
            out(line)
    for r in results.values():
        if r.log_tail:
            out()
            out(f"--- {r.target} log tail after {r.workload} ---")
            out(r.log_tail)
        if r.profile:
            out()
            out(
                f"Profile of {r.target}, {_BY_KEY[r.workload].title} (its throughput is lowered by "
                "the profilers; compare runs without --profile):"
            )
            out(f"  flame graph {r.profile['svg']}")
            out(f"  raw stacks  {r.profile['raw']} (speedscope.app or flamegraph.pl read it)")
            out(r.profile["text"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every process is stopped and what ran so far is reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)

    password = secrets.token_urlsafe(12)
    machine = _machine()
    selected = [_BY_KEY[k] for k in args.workloads]
    drills = f", {idle.KEY} {','.join(args.idle_targets)}" if args.idle_targets else ""
    drills += f", failover drill {','.join(args.failover)}" if args.failover else ""
    out(
        f"dbmux bench {stamp}: {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{args.duration}s per run, workloads {','.join(args.workloads) or '-'}, "
        f"targets {','.join(all_targets(args, selected)) or '-'}{drills}"
    )
    started = time.monotonic()
    benches = [
        b(args, password, stamp)
        for b in BENCHES
        if any(targets_for(args, w) for w in b.selected(args))
    ]
    numbers = itertools.count(1)
    drills: dict[str, dict[str, failover.DrillResult]] = {}
    idles: dict[str, idle.IdleResult] = {}
    total = sum(len(targets_for(args, w)) for w in selected)
    completed, broken = True, False
    try:
        for bench in benches:
            if bench is not benches[0]:
                out()
            try:
                bench.start()
                completed = bench.run_all(numbers, total)
            except (ServerStartError, CommandError) as error:  # MariaDB not installed, say
                out(f"{bench.engine} section NOT run: its server could not be set up:\n{error}")
                broken = True
            finally:
                bench.close()
            if not completed:
                break
        if completed and args.idle_targets:
            if benches:
                out()
            idles = idle.run_all(
                args.idle_row_clients, args.idle_concurrency, args.idle_targets, args.baseline
            )
        if completed and args.failover:
            if benches or idles:
                out()
            drills = failover.run_all(args.failover, args)
    except KeyboardInterrupt:
        out("\ninterrupted")
        completed = False
    results = {key: r for b in benches for key, r in b.results.items()}
    if not results and not drills and not idles:
        return 130 if not completed else 1

    elapsed = time.monotonic() - started
    for bench in benches:
        bench.print_section(machine)
    print_report(results)
    for line in idle.report(idles):
        out(line)
    for line in failover.report(drills):
        out(line)
    out_path = RESULTS / f"{stamp}.json"
    record = {
        "timestamp": stamp,
        "duration": args.duration,
        "completed": completed,
        "elapsed_seconds": round(elapsed, 1),
        "machine": machine,
        "versions": {k: v for b in benches for k, v in b.versions.items()},
        "settings": {
            "max_connections": MAX_CONNECTIONS,
            "pool_size": POOL_SIZE,
            "dbmux_max_connections_percent": POOL_PERCENT,
            "dbmux_targets": DBMUX_TARGETS,
            **{k: v for b in benches for k, v in b.settings().items()},
        },
        "workloads": {
            w.key: {
                "title": w.title,
                "tool": w.tool,
                "args": list(w.args),
                "script": w.script or None,
                "targets": targets_for(args, w),
                "dbmux_connection_borrow_timeout": borrow_timeout(args, w),
                "client_tls": w.tls,
                "login_allowance_seconds": w.login_allowance,
            }
            for w in selected
        },
        "tls": [row for b in benches for row in b.tls_summary()],
        "runs": [r.to_json() for r in results.values()],
        idle.KEY: idle.to_json(idles),
        "failover": failover.to_json(drills),
    }
    out_path.write_text(json.dumps(record, indent=2))
    out()
    out(f"raw results: {out_path}  ({elapsed:.0f}s in all)")
    if not completed:
        return 130
    failed = broken or idle.broken(idles) or failover.broken(drills)
    return 1 if failed or any(b.broken for b in benches) else 0


if __name__ == "__main__":
    sys.exit(main())
