"""python -m bench: pgbench straight at PostgreSQL, through PgBouncer and through dbmux.

One run measures all three side by side on the same throwaway cluster (max_connections 100,
pgbench scale 10), workload by workload, and prints throughput, latency, failures and peak
server connections with dbmux's ratios to PgBouncer and to direct access. Raw numbers go to
bench/results/<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import pgbench, profile, report
from bench.monitor import ConnectionSampler, Snapshot
from bench.report import DBMUX_TARGETS, DEFAULT_TARGETS, TARGETS, RunResult, Workload
from bench.targets import Dbmux, PgBouncer, Target, TargetError
from bench.targets import versions as target_versions
from dbmux.testing import PostgresCluster

USER = DBNAME = "bench"
MAX_CONNECTIONS = 100
POOL_PERCENT = 20  # of max_connections: a pool of 20, as PgBouncer's default_pool_size below
POOL_SIZE = MAX_CONNECTIONS * POOL_PERCENT // 100
SCALE = 10
RESULTS = Path(__file__).resolve().parent / "results"
# dbmux's connection_borrow_timeout where sessions pin (default 120 s), at most half of
# --duration: the clients that find the pool held by pinned sessions then fail within the run
# instead of keeping pgbench waiting for up to 120 s after -T ends.
PINNED_BORROW_TIMEOUT = 5.0

# Every transaction sets session state, then reads with it; application_name differs per
# client, so a server connection always carries the previous client's value. pgbench's
# :scale is 1 in custom scripts, hence the literal scale.
SET_HEAVY_SCRIPT = f"""\\set aid random(1, 100000 * {SCALE})
SET statement_timeout = '5s';
SET application_name = 'client-:client_id';
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
"""

WORKLOADS = (
    Workload("select-simple", "select-only simple", ("-S", "-c", "50", "-j", "2"), True),
    Workload(
        "select-extended",
        "select-only extended",
        ("-S", "-M", "extended", "-c", "50", "-j", "2"),
        True,
    ),
    Workload("tpcb", "tpcb-like", ("-c", "10", "-j", "2"), True),
    Workload("storm-50", "storm -S -C, 50 clients", ("-S", "-C", "-c", "50", "-j", "2"), False),
    Workload("storm-300", "storm -S -C, 300 clients", ("-S", "-C", "-c", "300", "-j", "2"), False),
    Workload(
        "select-prepared",
        "select-only prepared",
        ("-S", "-M", "prepared", "-c", "50", "-j", "2"),
        False,
        borrow_timeout=PINNED_BORROW_TIMEOUT,
        note="select-only prepared: every pgbench client prepares its statement under the same "
        "name (P_0). PgBouncer 1.18 in transaction mode does not carry protocol-level prepared "
        "statements between server connections: its clients fail with 'prepared statement "
        "... does not exist' or '... already exists' until every server connection has a P_0 "
        "(all clients prepare the same text, so the survivors, if any, then run on whichever "
        "P_0 they find: their tps is not comparable). A proxy that pins such a session (RDS "
        "Proxy; dbmux before it carried named statements) lets 20 clients hold the pool while "
        "the others wait for a server connection, and pgbench prepares with a blocking "
        "PQprepare(), so one waiting client stalls its whole pgbench thread, pinned clients "
        "included. dbmux runs with connection_borrow_timeout {borrow_timeout:g} s (default "
        "120 s) in this workload, so a client that waits fails within the run instead of "
        "holding pgbench up to 120 s past -T.",
    ),
    Workload(
        "set-heavy",
        "set-heavy (SET per tx)",
        ("-c", "50", "-j", "2"),
        False,
        script=SET_HEAVY_SCRIPT,
        extra_targets=("dbmux-pin",),
        borrow_timeout=PINNED_BORROW_TIMEOUT,
        note="set-heavy: every transaction runs SET statement_timeout (the same for all "
        "clients), SET application_name (a different value per client), then a select, with "
        "the simple protocol. dbmux (session_state: replay, the default) carries each client's "
        "settings to whichever server connection it borrows; dbmux-pin (session_state: pin, "
        "what RDS Proxy does) pins each session at its first SET, so 20 clients hold the pool "
        "and the other 30 fail after connection_borrow_timeout "
        "({borrow_timeout:g} s here, both dbmux targets). PgBouncer multiplexes but "
        "ignores SET: each client's settings stay on the server connection and leak to the "
        "clients that use it next (not measured here).",
    ),
)
_BY_KEY = {w.key: w for w in WORKLOADS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgbench against direct PostgreSQL, PgBouncer and dbmux, side by side.",
    )
    parser.add_argument(
        "--duration", type=int, default=10, metavar="S", help="seconds per run (default: 10)"
    )
    parser.add_argument(
        "--only",
        default=",".join(_BY_KEY),
        metavar="WORKLOAD[,..]",
        help=f"workloads to run (default: all): {', '.join(_BY_KEY)}",
    )
    parser.add_argument(
        "--targets",
        metavar="T[,..]",
        help=f"targets to run, in this order, for every workload: {', '.join(TARGETS)} "
        f"(default: {','.join(DEFAULT_TARGETS)}, plus dbmux-pin, dbmux with session_state: pin, "
        "for set-heavy)",
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
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    args.target_list = (
        [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    )
    unknown = [w for w in args.workloads if w not in _BY_KEY]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(_BY_KEY)}")
    unknown = [t for t in args.target_list or () if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if args.target_list == []:
        parser.error("--targets names no target")
    if args.duration < 1:
        parser.error("--duration must be at least 1")
    if args.profile and args.duration < 3:
        parser.error("--profile needs --duration of at least 3")
    return args


def targets_for(args: argparse.Namespace, workload: Workload) -> list[str]:
    """--targets as given, else direct, pgbouncer, dbmux and the workload's extra targets."""
    if args.target_list is not None:
        return list(args.target_list)
    return [*DEFAULT_TARGETS, *workload.extra_targets]


def borrow_timeout(args: argparse.Namespace, workload: Workload) -> float | None:
    """dbmux's connection_borrow_timeout in this workload; None: dbmux's default."""
    if workload.borrow_timeout is None:
        return None
    return min(workload.borrow_timeout, args.duration / 2)


def all_targets(args: argparse.Namespace, workloads: list[Workload]) -> list[str]:
    """Every target some selected workload runs, in run order (the table's columns)."""
    return list(dict.fromkeys(t for w in workloads for t in targets_for(args, w)))


def _out(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release()}


def _git_revision() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(repo), "diff", "HEAD", "--", "src"],
            capture_output=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    # Uncommitted changes are named by a hash of the diff, so two runs can tell if they differ.
    dirty = f"+dirty.{hashlib.sha1(diff).hexdigest()[:8]}" if diff else ""
    return rev + dirty if rev else ""


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Any, password: str, stamp: str) -> None:
        self.args = args
        self.cluster = cluster
        self.password = password
        self.stamp = stamp
        self.pgbench = pgbench.find_pgbench()
        self.results: dict[tuple[str, str], RunResult] = {}
        self.sampler: ConnectionSampler | None = None
        self.broken = False  # a proxy failed to start, died, hung or would not stop

    # -- setup

    def prepare(self) -> None:
        c = self.cluster
        c.create_user(USER, self.password)
        c.create_database(DBNAME, USER)
        started = time.monotonic()
        cmd = [self.pgbench, "-i", "-s", str(SCALE), "-q", "-h", c.host, "-p", str(c.port)]
        init = subprocess.run(
            [*cmd, "-U", USER, DBNAME],
            capture_output=True,
            text=True,
            env=pgbench.client_env(self.password),
            timeout=600,
        )
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{init.stderr}")
        _out(f"pgbench -i -s {SCALE}: {time.monotonic() - started:.1f}s")
        self.sampler = ConnectionSampler(c.dsn(), USER, c.psql)
        self.sampler.start()

    def _reset_tables(self) -> None:
        """What pgbench does before a run unless -n, done directly so no proxy relays it."""
        self.cluster.psql(
            "VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history; "
            "CHECKPOINT;",
            DBNAME,
        )

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def make_target(self, name: str, workload: Workload) -> Target:
        c = self.cluster
        if name == "direct":
            return Target(c.host, c.port)
        common = {"upstream_port": c.port, "user": USER, "password": self.password}
        if name == "pgbouncer":
            secret = None
            if self.args.pgbouncer_auth == "scram":
                secret = c.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
            return PgBouncer(dbname=DBNAME, pool_size=POOL_SIZE, auth_file_secret=secret, **common)
        pool: dict[str, object] = {}
        timeout = borrow_timeout(self.args, workload)
        if timeout is not None:
            pool["connection_borrow_timeout"] = timeout
        return Dbmux(
            dbname=DBNAME,
            max_connections_percent=POOL_PERCENT,
            name=name,
            proxy_settings=DBMUX_TARGETS[name],
            pool_settings=pool,
            **common,
        )

    # -- one run

    def run_one(self, workload: Workload, target_name: str, prefix: str) -> RunResult:
        assert self.sampler is not None
        result = RunResult(workload.key, target_name)
        left = self.sampler.wait_quiet()
        if left:
            result.problems.append(f"{left} server connections of {USER} still open before the run")
        self._reset_tables()
        logins0 = self.sampler.logins()
        target = self.make_target(target_name, workload)
        _out(prefix, end=" ")
        try:
            target.start()
        except TargetError as exc:
            self.broken = True
            result.problems.append(f"{target_name} did not start: {exc}")
            target.stop()
            if isinstance(target, PgBouncer | Dbmux) and target.workdir is not None:
                result.problems.append(f"{target_name} files kept in {target.workdir}")
            return result
        try:
            self._measure(workload, target, result)
        finally:
            note = target.stop()
            if note:
                self.broken = True
                result.problems.append(note)
            self.sampler.wait_quiet(timeout=5)  # exited backends have flushed their stats
            logins1 = self.sampler.logins()
            if logins0 is not None and logins1 is not None:
                result.server_logins = logins1 - logins0
            keep = bool(note or result.problems or not result.proxy_alive_after)
            if isinstance(target, PgBouncer | Dbmux):
                if keep and target.workdir is not None:
                    result.problems.append(f"{target_name} files kept in {target.workdir}")
                else:
                    target.cleanup()
        return result

    def _measure(self, workload: Workload, target: Target, result: RunResult) -> None:
        assert self.sampler is not None
        duration = self.args.duration
        spy: dict[str, Any] = {}
        timer = None
        pid = target.pid
        if self.args.profile and isinstance(target, Dbmux) and pid is not None:
            variant = "" if target.name == "dbmux" else f"-{target.name}"
            raw = RESULTS / f"profile-{self.stamp}-{workload.key}{variant}.raw"
            spy["raw"] = raw
            spy["perf_data"] = raw.with_suffix(".perf.data")

            def start_spy() -> None:  # after logins, for the steady part of the run
                spy["proc"] = profile.start(pid, raw, duration - 2)
                spy["perf"] = profile.start_perf(pid, spy["perf_data"], duration - 2)

            timer = threading.Timer(1.0, start_spy)
        self.sampler.begin()
        before = Snapshot.take(target.pid, self._postmaster_pid())
        if timer is not None:
            timer.start()
        result.pgbench = pgbench.run(
            self.pgbench,
            host=target.host,
            port=target.port,
            user=USER,
            password=self.password,
            dbname=DBNAME,
            args=list(workload.args),
            duration=duration,
            script=workload.script,
        )
        after = Snapshot.take(target.pid, self._postmaster_pid())
        window = self.sampler.end()
        result.peak_server_connections = window.peak_connections if window.samples else None
        result.peak_active_connections = window.peak_active if window.samples else None
        if before.proxy is not None and after.proxy is not None:
            user, system = (round(a - b, 3) for a, b in zip(after.proxy, before.proxy, strict=True))
            result.proxy_cpu_seconds = round(user + system, 3)
            result.proxy_system_seconds = system
        if before.proxy_sched is not None and after.proxy_sched is not None:
            result.proxy_runqueue_seconds = round(after.proxy_sched[1] - before.proxy_sched[1], 3)
        if before.postgres is not None and after.postgres is not None:
            result.postgres_cpu_seconds = round(after.postgres - before.postgres, 3)
        result.machine_busy_seconds = round(after.busy - before.busy, 3)
        result.machine_irq_seconds = round(after.irq - before.irq, 3)
        result.machine_total_seconds = round(after.total - before.total, 3)
        result.window_seconds = round(after.time - before.time, 3)
        result.context_switches = after.context_switches - before.context_switches
        result.proxy_alive_after = target.alive()
        if result.pgbench.timed_out and isinstance(target, PgBouncer | Dbmux):
            self.broken = True
        if not result.proxy_alive_after:
            self.broken = True
        result.problems += target.log_problems()
        if not result.proxy_alive_after or result.pgbench.timed_out:
            result.log_tail = target.log_tail()
        if timer is not None:
            timer.join()
            self._finish_profile(workload, spy, result)

    def _finish_profile(self, workload: Workload, spy: dict[str, Any], result: RunResult) -> None:
        proc = spy.get("proc")
        if proc is None:
            result.problems.append("py-spy did not start")
            return
        ok, output = profile.finish(proc, timeout=30)
        raw: Path = spy["raw"]
        if not ok or not raw.exists():
            result.problems.append(f"py-spy failed: {output.strip()[-500:]}")
            return
        svg = raw.with_suffix(".svg")
        how = " -f SCRIPT" if workload.script else ""
        title = f"{result.target}, {workload.title}, pgbench {' '.join(workload.args)}{how}"
        profile.render_svg(raw, svg, title)
        summary = profile.summarise(raw)
        result.profile = {"raw": str(raw), "svg": str(svg), **summary.to_json()}
        result.profile["text"] = self._where_the_time_goes(result) + profile.format_summary(summary)
        perf = spy.get("perf")
        if perf is not None:
            ok, output = profile.finish(perf, timeout=30)
            data: Path = spy["perf_data"]
            if ok and data.exists():
                dsos, syms = profile.perf_summary(data)
                result.profile["perf"] = {"data": str(data), "by_dso": dsos, "symbols": syms}
                result.profile["text"] += "\n\n" + profile.format_perf(dsos, syms)
            else:
                result.problems.append(f"perf record failed: {output.strip()[-300:]}")

    @staticmethod
    def _where_the_time_goes(r: RunResult) -> str:
        """The proxy's wall time from the scheduler's point of view, and CPU per transaction."""
        if not (r.window_seconds and r.proxy_cpu_seconds is not None and r.pgbench):
            return ""
        wall, cpu = r.window_seconds, r.proxy_cpu_seconds
        system = r.proxy_system_seconds or 0.0
        wait = r.proxy_runqueue_seconds or 0.0
        lines = [
            f"  scheduler: dbmux was on a CPU {100 * cpu / wall:.0f}% of the run "
            f"(user {100 * (cpu - system) / wall:.0f}%, kernel {100 * system / wall:.0f}%), "
            f"runnable but waiting for a CPU {100 * wait / wall:.0f}%, "
            f"idle {max(0.0, 100 * (wall - cpu - wait) / wall):.0f}%",
        ]
        tx = r.pgbench.transactions
        if tx:
            lines.append(
                f"  per transaction: {1e6 * cpu / tx:.1f} µs of dbmux CPU "
                f"({1e6 * (cpu - system) / tx:.1f} user + {1e6 * system / tx:.1f} kernel)"
            )
        return "\n".join(lines) + "\n"

    # -- all runs

    def run_all(self) -> bool:
        """Every selected run; False if interrupted."""
        workloads = [_BY_KEY[k] for k in self.args.workloads]
        n, i = sum(len(targets_for(self.args, w)) for w in workloads), 0
        for w in workloads:
            for t in targets_for(self.args, w):
                i += 1
                prefix = report.progress_prefix(i, n, t, w)
                try:
                    r = self.run_one(w, t, prefix)
                except KeyboardInterrupt:
                    _out("interrupted")
                    return False
                self.results[(w.key, t)] = r
                _out(report.progress_result(r))
        return True

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def print_report(
    args: argparse.Namespace, results: dict[tuple[str, str], RunResult], machine: dict[str, Any]
) -> None:
    """The results table, the targets, the CPU table, problems, log tails and profiles."""
    workloads = [w for w in WORKLOADS if w.key in args.workloads]
    targets = all_targets(args, workloads)
    _out()
    _out(
        f"## dbmux vs PgBouncer vs direct ({args.duration}s per run, pool {POOL_SIZE}, "
        f"max_connections {MAX_CONNECTIONS}, pgbench -s {SCALE}, {machine['cpus']} CPUs)"
    )
    _out()
    _out(report.table(workloads, results, targets))
    _out()
    _out(
        "tps excludes initial connection time, except for the -C storms, where pgbench counts "
        "reconnection time in (each transaction is a new connection). failures = failed "
        "transactions + clients pgbench aborted. * = noisy run: other processes on the machine "
        f"took {report.NOISY:.0f}% of the CPU or more. ! = pgbench aborted clients: tps is that "
        "of the clients that kept running (if none did, of the moment before the run ended)."
    )
    for w in workloads:
        if w.note and any((w.key, t) in results for t in targets):
            _out()
            _out(w.note.format(borrow_timeout=borrow_timeout(args, w)))
    lines = report.verdict(workloads, results, POOL_SIZE)
    if lines:
        _out()
        _out("Targets:")
        for line in lines:
            _out("  " + line)
    _out()
    _out(
        "CPU during each run, per cent of all cores (irq: interrupts such as loopback packet "
        "delivery; other: processes outside the benchmark, above 10% the run was noisy):"
    )
    _out()
    _out(report.cpu_table(workloads, results, targets))
    notes = report.problems(results)
    if notes:
        _out()
        _out("Errors and problems:")
        for line in notes:
            _out(line)
    for r in results.values():
        if r.log_tail:
            _out()
            _out(f"--- {r.target} log tail after {r.workload} ---")
            _out(r.log_tail)
        if r.profile:
            _out()
            _out(
                f"Profile of {r.target}, {_BY_KEY[r.workload].title} (its throughput is lowered by "
                "the profilers; compare runs without --profile):"
            )
            _out(f"  flame graph {r.profile['svg']}")
            _out(f"  raw stacks  {r.profile['raw']} (speedscope.app or flamegraph.pl read it)")
            _out(r.profile["text"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every process is stopped and what ran so far is reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)

    password = secrets.token_urlsafe(12)
    machine = _machine()
    targets = all_targets(args, [_BY_KEY[k] for k in args.workloads])
    _out(
        f"dbmux bench {stamp}: {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{args.duration}s per run, workloads {','.join(args.workloads)}, "
        f"targets {','.join(targets)}"
    )
    started = time.monotonic()
    cluster = PostgresCluster(
        max_connections=MAX_CONNECTIONS, auth_method="scram-sha-256", password=password
    )
    bench: Bench | None = None
    completed = False
    versions: dict[str, str] = {}
    try:
        with cluster:
            server_version = cluster.psql("SHOW server_version")
            _out(f"PostgreSQL {server_version} on 127.0.0.1:{cluster.port}, max_connections 100")
            bench = Bench(args, cluster, password, stamp)
            bench.prepare()
            versions = {
                "postgres": server_version,
                "pgbench": pgbench.pgbench_version(bench.pgbench),
                **target_versions(),
                "dbmux_git": _git_revision(),
            }
            _out(
                f"{versions['pgbench']}; {versions['pgbouncer']}; {versions['dbmux']} "
                f"({versions['dbmux_git']}); pool {POOL_SIZE} server connections per proxy"
            )
            _out()
            completed = bench.run_all()
    except KeyboardInterrupt:
        _out("\ninterrupted")
    finally:
        if bench is not None:
            bench.close()
    if bench is None or not bench.results:
        return 130 if not completed else 1

    elapsed = time.monotonic() - started
    print_report(args, bench.results, machine)
    out = RESULTS / f"{stamp}.json"
    record = {
        "timestamp": stamp,
        "duration": args.duration,
        "completed": completed,
        "elapsed_seconds": round(elapsed, 1),
        "machine": machine,
        "versions": versions,
        "settings": {
            "max_connections": MAX_CONNECTIONS,
            "pool_size": POOL_SIZE,
            "dbmux_max_connections_percent": POOL_PERCENT,
            "pgbench_scale": SCALE,
            "pgbouncer_auth": args.pgbouncer_auth,
            "dbmux_targets": DBMUX_TARGETS,
        },
        "workloads": {
            w.key: {
                "title": w.title,
                "args": list(w.args),
                "script": w.script or None,
                "targets": targets_for(args, w),
                "dbmux_connection_borrow_timeout": borrow_timeout(args, w),
            }
            for w in WORKLOADS
            if w.key in args.workloads
        },
        "runs": [r.to_json() for r in bench.results.values()],
    }
    out.write_text(json.dumps(record, indent=2))
    _out()
    _out(f"raw results: {out}  ({elapsed:.0f}s in all)")
    if not completed:
        return 130
    return 1 if bench.broken else 0


if __name__ == "__main__":
    sys.exit(main())
