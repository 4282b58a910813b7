"""One database's section of the benchmark: its throwaway server, its workloads run one by
one against each target, each target a fresh process, and the section's part of the report.

A subclass per database (bench.postgres, bench.mysql) starts the server, prepares its tables
and runs its client; the runs, their measurements and the report are the same for both.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from bench import profile, report, rows
from bench.client import ClientResult
from bench.monitor import ConnectionSampler, Snapshot
from bench.report import (
    BASELINE,
    DBMUX_TARGETS,
    DBMUX_WORKERS,
    DEFAULT_TARGETS,
    ENGINE_TARGETS,
    RunResult,
    Workload,
)
from bench.targets import Dbmux, HAProxy, ProcessTarget, Target, TargetError
from bench.targets import versions as target_versions
from dbmux.testing.certs import CertFiles, TestCA

MAX_CONNECTIONS = 100
POOL_PERCENT = 20  # of max_connections: a pool of 20, as PgBouncer's default_pool_size
POOL_SIZE = MAX_CONNECTIONS * POOL_PERCENT // 100
RESULTS = Path(__file__).resolve().parent / "results"
SRC = Path(__file__).resolve().parent.parent / "src"


def out(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def targets_for(args: argparse.Namespace, workload: Workload) -> list[str]:
    """--targets as given (those the workload's database has), else the database's default
    targets, dbmux-before if --baseline, and the workload's extra ones; of those, the ones
    the workload runs (all but direct for TLS, say)."""
    allowed = workload.targets or ENGINE_TARGETS[workload.engine]
    if args.target_list is not None:
        return [t for t in args.target_list if t in allowed]
    baseline = [BASELINE] if args.baseline else []
    chosen = [*DEFAULT_TARGETS[workload.engine], *baseline, *workload.extra_targets]
    return [t for t in chosen if t in allowed]


def all_targets(args: argparse.Namespace, workloads: list[Workload]) -> list[str]:
    """Every target some of these workloads run, in run order (the table's columns)."""
    return list(dict.fromkeys(t for w in workloads for t in targets_for(args, w)))


def borrow_timeout(args: argparse.Namespace, workload: Workload) -> float | None:
    """dbmux's connection_borrow_timeout in this workload; None: dbmux's default."""
    if workload.borrow_timeout is None:
        return None
    return min(workload.borrow_timeout, args.duration / 2)


def _git_revision(src: Path) -> str:
    """The commit of the checkout that holds src, and whether src differs from it."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(src), "diff", "HEAD", "--", "."],
            capture_output=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    # Uncommitted changes are named by a hash of the diff, so two runs can tell if they differ.
    dirty = f"+dirty.{hashlib.sha1(diff).hexdigest()[:8]}" if diff else ""
    return rev + dirty if rev else ""


@functools.cache
def proxy_versions(baseline: Path | None) -> dict[str, str]:
    """pgbouncer, haproxy, dbmux and dbmux_git (the source the dbmux runs are of); with --baseline,
    dbmux_before_src and dbmux_before_git (the source the dbmux-before runs are of)."""
    versions = {**target_versions(), "dbmux_git": _git_revision(SRC)}
    if baseline is not None:
        versions["dbmux_before_src"] = str(baseline)
        versions["dbmux_before_git"] = _git_revision(baseline)
    return versions


def dbmux_versions(versions: dict[str, str]) -> str:
    """The dbmux part of a section's versions line: which source each dbmux target runs."""
    text = f"{versions['dbmux']} ({versions['dbmux_git']})"
    if "dbmux_before_src" in versions:
        text += f"; {BASELINE}: {versions['dbmux_before_src']} ({versions['dbmux_before_git']})"
    return text


class Bench:
    """The runs of one database's workloads and what they measured."""

    engine: ClassVar[str]  # what Workload.engine says
    workloads: ClassVar[tuple[Workload, ...]]
    cpu_columns: ClassVar[tuple[str, str]]  # the CPU table's names for client and server
    user: ClassVar[str]
    dbname: ClassVar[str]
    family: ClassVar[str]  # dbmux's engine_family

    def __init__(self, args: argparse.Namespace, password: str, stamp: str) -> None:
        self.args = args
        self.password = password
        self.stamp = stamp
        self.results: dict[tuple[str, str], RunResult] = {}
        self.sampler: ConnectionSampler | None = None
        self.versions: dict[str, str] = {}
        # A proxy failed to start, died, hung or would not stop, or a client is missing.
        self.broken = False
        self.host = "127.0.0.1"
        self.port = 0
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        self._tls: CertFiles | None = None

    @classmethod
    def selected(cls, args: argparse.Namespace) -> list[Workload]:
        return [w for w in cls.workloads if w.key in args.workloads]

    # -- what each database does

    def start(self) -> None:
        """Start the server and prepare its tables (saying so), set self.sampler and
        self.versions; close() cleans up even after a failed start."""
        raise NotImplementedError

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def tls_certificate(self) -> CertFiles:
        """The proxies' certificate for loopback names, made at the first TLS run by a
        throwaway CA in a temp dir (removed at close())."""
        if self._tls is None:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="dbmux-bench-tls-")
            self._tls = TestCA(Path(self._tls_dir.name)).issue("proxy")
        return self._tls

    def reset(self) -> None:
        """Before every run: bring the tables back to where the previous run found them."""

    def server_pid(self) -> int | None:
        raise NotImplementedError

    def run_client(self, workload: Workload, target: Target) -> ClientResult:
        raise NotImplementedError

    def heading(self, machine: dict[str, Any]) -> str:
        raise NotImplementedError

    def legend(self) -> str:
        """What the table's numbers mean, printed under it."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """This section's settings for the JSON record."""
        raise NotImplementedError

    def make_target(self, name: str, workload: Workload) -> Target:
        if name == "direct":
            return Target(self.host, self.port)
        if name == "haproxy":
            return HAProxy(
                upstream_port=self.port, user=self.user, password=self.password, dbname=self.dbname
            )
        pool: dict[str, object] = {}
        timeout = borrow_timeout(self.args, workload)
        if timeout is not None:
            pool["connection_borrow_timeout"] = timeout
        return Dbmux(
            upstream_port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            max_connections_percent=POOL_PERCENT,
            name=name,
            # This checkout's dbmux, as the versions line says, even where the venv's editable
            # install is another checkout's (the bench run from a git worktree).
            source=self.args.baseline if name == BASELINE else SRC,
            engine_family=self.family,
            proxy_settings={**DBMUX_TARGETS[name], **self.dbmux_tls(workload)},
            pool_settings=pool,
            workers=None if name == BASELINE else DBMUX_WORKERS.get(name, 1),
        )

    def dbmux_tls(self, workload: Workload) -> dict[str, object]:
        """dbmux's settings for a TLS workload's clients: TLS offered and required."""
        if not workload.tls:
            return {}
        return {"require_tls": True, "tls": self.tls_certificate().as_tls()}

    def cannot_run(self, workload: Workload) -> str | None:
        """Why the workload cannot run here (its client is missing, say), else None."""
        return None

    # -- one run

    def run_one(self, workload: Workload, target_name: str, prefix: str) -> RunResult:
        assert self.sampler is not None
        result = RunResult(workload.key, target_name)
        out(prefix, end=" ")
        missing = self.cannot_run(workload)
        if missing:
            result.problems.append(missing)
            return result
        left = self.sampler.wait_quiet()
        if left:
            result.problems.append(
                f"{left} server connections of {self.user} still open before the run"
            )
        self.reset()
        logins0 = self.sampler.logins()
        target = self.make_target(target_name, workload)
        try:
            target.start()
        except TargetError as exc:
            self.broken = True
            result.problems.append(f"{target_name} did not start: {exc}")
            target.stop()
            if isinstance(target, ProcessTarget) and target.workdir is not None:
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
            if isinstance(target, ProcessTarget):
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
        before = Snapshot.take(target.pid, self.server_pid())
        if timer is not None:
            timer.start()
        result.client = self.run_client(workload, target)
        after = Snapshot.take(target.pid, self.server_pid())
        window = self.sampler.end()
        result.peak_server_connections = window.peak_connections if window.samples else None
        result.peak_active_connections = window.peak_active if window.samples else None
        if before.proxy is not None and after.proxy is not None:
            user, system = (round(a - b, 3) for a, b in zip(after.proxy, before.proxy, strict=True))
            result.proxy_cpu_seconds = round(user + system, 3)
            result.proxy_system_seconds = system
        if before.proxy_sched is not None and after.proxy_sched is not None:
            result.proxy_runqueue_seconds = round(after.proxy_sched[1] - before.proxy_sched[1], 3)
        if before.server is not None and after.server is not None:
            result.server_cpu_seconds = round(after.server - before.server, 3)
        result.machine_busy_seconds = round(after.busy - before.busy, 3)
        result.machine_irq_seconds = round(after.irq - before.irq, 3)
        result.machine_total_seconds = round(after.total - before.total, 3)
        result.window_seconds = round(after.time - before.time, 3)
        result.context_switches = after.context_switches - before.context_switches
        result.proxy_alive_after = target.alive()
        if result.proxy_alive_after and isinstance(target, Dbmux):
            try:
                result.borrow_wait = rows.borrow_wait(target.metrics())
            except OSError as exc:
                result.problems.append(f"{target.name} /metrics: {exc}")
        if result.client.timed_out and isinstance(target, ProcessTarget):
            self.broken = True
        if not result.proxy_alive_after:
            self.broken = True
        result.problems += target.log_problems()
        if not result.proxy_alive_after or result.client.timed_out:
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
        title = f"{result.target}, {workload.title}, {workload.command}"
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
        if not (r.window_seconds and r.proxy_cpu_seconds is not None and r.client):
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
        tx = r.client.transactions
        if tx:
            lines.append(
                f"  per transaction: {1e6 * cpu / tx:.1f} µs of dbmux CPU "
                f"({1e6 * (cpu - system) / tx:.1f} user + {1e6 * system / tx:.1f} kernel)"
            )
        return "\n".join(lines) + "\n"

    # -- all runs

    def run_all(self, numbers: Iterator[int], total: int) -> bool:
        """Every selected run, numbered from `numbers` of `total`; False if interrupted."""
        for w in self.selected(self.args):
            for t in targets_for(self.args, w):
                prefix = report.progress_prefix(next(numbers), total, t, w)
                try:
                    r = self.run_one(w, t, prefix)
                except KeyboardInterrupt:
                    out("interrupted")
                    return False
                self.results[(w.key, t)] = r
                out(report.progress_result(r))
        return True

    # -- the report

    def print_section(self, machine: dict[str, Any]) -> None:
        """The results table, its legend and notes, the targets and the CPU table."""
        workloads = [w for w in self.selected(self.args) if w.key in {k for k, _ in self.results}]
        if not workloads:
            return
        targets = all_targets(self.args, workloads)
        out()
        out(self.heading(machine))
        out()
        out(report.table(workloads, self.results, targets))
        out()
        out(self.legend())
        for w in workloads:
            if w.note:
                out()
                out(w.note.format(borrow_timeout=borrow_timeout(self.args, w)))
        lines = report.verdict(workloads, self.results, POOL_SIZE)
        lines += rows.verdict(workloads, self.results)
        if lines:
            out()
            out("Targets:")
            for line in lines:
                out("  " + line)
        out()
        out(
            "CPU during each run, per cent of all cores (irq: interrupts such as loopback packet "
            "delivery; other: processes outside the benchmark, above 10% the run was noisy):"
        )
        out()
        out(report.cpu_table(workloads, self.results, targets, *self.cpu_columns))
        if any(w.transaction_log for w in workloads):
            out()
            out(rows.FAIRNESS_LEGEND)
            out()
            out(rows.fairness_table(workloads, self.results, targets))
        if any(w.round_trip for w in workloads):
            out()
            out(rows.ROUND_TRIP_LEGEND)
            out()
            out(rows.round_trip_table(workloads, self.results, targets))
        tls_rows = self.tls_summary()
        if tls_rows:
            out()
            out(self.tls_legend())
            out()
            out(report.tls_table(tls_rows, {w.key: w.title for w in workloads}))

    def tls_summary(self) -> list[dict[str, Any]]:
        """The TLS rows' numbers (report.tls_summary) of the runs so far."""
        return report.tls_summary(self.selected(self.args), self.results)

    def tls_legend(self) -> str:
        """What the TLS table's numbers mean, printed above it."""
        raise NotImplementedError
