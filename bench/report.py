"""The console output: progress lines, the results table, the verdict, the CPU table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.pgbench import PgbenchResult

TARGETS = ("direct", "pgbouncer", "dbmux", "dbmux-pin")
DEFAULT_TARGETS = ("direct", "pgbouncer", "dbmux")  # and each workload's extra_targets
# The proxy settings each dbmux target adds to its config.
DBMUX_TARGETS: dict[str, dict[str, Any]] = {"dbmux": {}, "dbmux-pin": {"session_state": "pin"}}
_LETTERS = {"direct": "d", "pgbouncer": "p", "dbmux": "x", "dbmux-pin": "pin"}
NOISY = 10.0  # per cent of all cores used by processes outside the benchmark


@dataclass(frozen=True)
class Workload:
    key: str  # what --only takes
    title: str
    args: tuple[str, ...]
    steady: bool  # a steady-state throughput run (target: >= 0.8x PgBouncer)
    script: str = ""  # a custom transaction script, run with -f
    extra_targets: tuple[str, ...] = ()  # run besides DEFAULT_TARGETS unless --targets
    # dbmux's connection_pool_config.connection_borrow_timeout for this workload (all dbmux
    # targets), instead of the default 120 s; None: the default.
    borrow_timeout: float | None = None
    note: str = ""  # printed under the results table


@dataclass
class RunResult:
    workload: str
    target: str
    pgbench: PgbenchResult | None = None
    peak_server_connections: int | None = None
    peak_active_connections: int | None = None
    proxy_cpu_seconds: float | None = None  # user + system
    proxy_system_seconds: float | None = None  # in the kernel: syscalls, TCP on loopback
    proxy_runqueue_seconds: float | None = None  # runnable but waiting for a CPU
    postgres_cpu_seconds: float | None = None
    machine_busy_seconds: float | None = None
    machine_total_seconds: float | None = None
    machine_irq_seconds: float | None = None
    window_seconds: float | None = None  # wall time the CPU numbers cover
    context_switches: int | None = None  # machine-wide, during the run
    server_logins: int | None = None  # sessions PostgreSQL established for the run
    proxy_alive_after: bool = True
    problems: list[str] = field(default_factory=list)  # start/stop failures, proxy log lines
    log_tail: str = ""
    profile: dict[str, Any] | None = None

    @property
    def noisy(self) -> bool:
        shares = self.cpu_shares()
        return bool(shares and shares["other"] >= NOISY)

    @property
    def tps(self) -> float | None:
        return self.pgbench.tps if self.pgbench else None

    @property
    def latency(self) -> float | None:
        return self.pgbench.latency_ms if self.pgbench else None

    @property
    def failures(self) -> int | None:
        return self.pgbench.failures if self.pgbench else None

    @property
    def aborted(self) -> bool:
        """pgbench aborted clients: tps is of the clients that kept running."""
        return bool(self.pgbench and self.pgbench.aborted_clients)

    def cpu_shares(self) -> dict[str, float] | None:
        """Per cent of all cores: whole machine, proxy, pgbench, PostgreSQL, interrupts, and
        other processes on the machine (a high share means a noisy run)."""
        if not self.pgbench or not self.machine_total_seconds:
            return None
        total = self.machine_total_seconds
        busy = self.machine_busy_seconds or 0.0
        proxy = self.proxy_cpu_seconds or 0.0
        bench = self.pgbench.cpu_seconds
        postgres = self.postgres_cpu_seconds or 0.0
        irq = self.machine_irq_seconds or 0.0
        return {
            "machine": 100 * busy / total,
            "proxy": 100 * proxy / total,
            "pgbench": 100 * bench / total,
            "postgres": 100 * postgres / total,
            "irq": 100 * irq / total,
            "other": 100 * max(busy - irq - proxy - bench - postgres, 0.0) / total,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "target": self.target,
            "pgbench": self.pgbench.to_json() if self.pgbench else None,
            "peak_server_connections": self.peak_server_connections,
            "peak_active_connections": self.peak_active_connections,
            "proxy_cpu_seconds": self.proxy_cpu_seconds,
            "proxy_system_seconds": self.proxy_system_seconds,
            "proxy_runqueue_seconds": self.proxy_runqueue_seconds,
            "postgres_cpu_seconds": self.postgres_cpu_seconds,
            "machine_busy_seconds": self.machine_busy_seconds,
            "machine_total_seconds": self.machine_total_seconds,
            "machine_irq_seconds": self.machine_irq_seconds,
            "window_seconds": self.window_seconds,
            "context_switches": self.context_switches,
            "server_logins": self.server_logins,
            "cpu_shares_percent": self.cpu_shares(),
            "proxy_alive_after": self.proxy_alive_after,
            "problems": self.problems,
            "log_tail": self.log_tail,
            "profile": self.profile,
        }


def fmt_tps(tps: float | None) -> str:
    if tps is None:
        return "-"
    return f"{tps:,.0f}" if tps >= 100 else f"{tps:,.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def progress_prefix(i: int, n: int, target: str, workload: Workload) -> str:
    return f"[{i:>2}/{n}] {target:<9} {workload.title:<26} ..."


def progress_result(r: RunResult) -> str:
    if r.pgbench is None:
        return "not run: " + (r.problems[0].splitlines()[0] if r.problems else "?")
    p = r.pgbench
    parts = [f"{fmt_tps(p.tps):>8} tps"]
    parts.append(f"lat {p.latency_ms:.2f} ms" if p.latency_ms is not None else "lat -")
    parts.append(f"failures {p.failures}")
    if r.peak_server_connections is not None:
        parts.append(f"peak conns {r.peak_server_connections}")
    if r.proxy_cpu_seconds is not None and r.window_seconds:
        parts.append(f"proxy cpu {100 * r.proxy_cpu_seconds / r.window_seconds:.0f}% of a core")
    shares = r.cpu_shares()
    if shares and shares["other"] >= NOISY:
        parts.append(f"NOISY: other processes {shares['other']:.0f}% of the CPU")
    if p.all_aborted:
        parts.append(f"ALL CLIENTS ABORTED after {p.wall_seconds:.1f}s")
    if p.timed_out:
        parts.append("TIMED OUT (killed)")
    elif p.returncode not in (0, None):
        parts.append(f"pgbench exit {p.returncode}")
    if r.problems:
        parts.append(f"{len(r.problems)} problem(s), see below")
    return "  ".join(parts)


def _cell(results: dict[tuple[str, str], RunResult], wl: str, targets: Sequence[str], fn) -> str:
    values = []
    for t in targets:
        r = results.get((wl, t))
        values.append(fn(r) if r is not None and r.pgbench is not None else "-")
    return " / ".join(values)


def table(
    workloads: Sequence[Workload],
    results: dict[tuple[str, str], RunResult],
    targets: Sequence[str],
) -> str:
    order = " / ".join(_LETTERS[t] for t in targets)
    tps_columns = [*DEFAULT_TARGETS, *(t for t in targets if t not in DEFAULT_TARGETS)]
    head = [
        "workload",
        *(f"{t} tps" for t in tps_columns),
        "dbmux/pgbouncer",
        "dbmux/direct",
        f"latency avg ms ({order})",
        "latency dbmux/pgbouncer",
        f"failures ({order})",
        f"peak server conns ({order})",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for w in workloads:
        if not any((w.key, t) in results for t in targets):
            continue

        def get(target: str, attr: str, w: Workload = w) -> Any:
            r = results.get((w.key, target))
            return getattr(r, attr) if r is not None else None

        def tps(target: str) -> str:
            mark = "!" if get(target, "aborted") else ""
            mark += "*" if get(target, "noisy") else ""
            return fmt_tps(get(target, "tps")) + mark

        row = [
            w.title,
            *(tps(t) for t in tps_columns),
            fmt_ratio(get("dbmux", "tps"), get("pgbouncer", "tps")),
            fmt_ratio(get("dbmux", "tps"), get("direct", "tps")),
            _cell(results, w.key, targets, lambda r: f"{r.latency:.2f}" if r.latency else "-"),
            fmt_ratio(get("dbmux", "latency"), get("pgbouncer", "latency")),
            _cell(results, w.key, targets, lambda r: str(r.failures)),
            _cell(
                results,
                w.key,
                targets,
                lambda r: (
                    "?" if r.peak_server_connections is None else str(r.peak_server_connections)
                ),
            ),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _per_tx(seconds: float | None, r: RunResult) -> float | None:
    tx = r.pgbench.transactions if r.pgbench else None
    return 1e6 * seconds / tx if seconds is not None and tx else None


def cpu_table(
    workloads: Sequence[Workload],
    results: dict[tuple[str, str], RunResult],
    targets: Sequence[str],
) -> str:
    head = [
        "workload",
        "target",
        "machine busy",
        "proxy",
        "pgbench",
        "postgres",
        "irq",
        "other",
        "proxy CPU µs/tx (user + sys)",
        "proxy waiting for a CPU (of wall time)",
        "context switches / tx",
        "server logins",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for w in workloads:
        for t in targets:
            r = results.get((w.key, t))
            shares = r.cpu_shares() if r else None
            if r is None or r.pgbench is None or not shares:
                continue
            proxy = per_tx = waiting = "-"
            if t != "direct":
                proxy = f"{shares['proxy']:.0f}%"
                total = _per_tx(r.proxy_cpu_seconds, r)
                system = _per_tx(r.proxy_system_seconds, r)
                if total is not None and system is not None:
                    per_tx = f"{total:,.1f} ({total - system:,.1f} + {system:,.1f})"
                if r.proxy_runqueue_seconds is not None and r.window_seconds:
                    waiting = f"{100 * r.proxy_runqueue_seconds / r.window_seconds:.0f}%"
            tx = r.pgbench.transactions
            ctx = f"{r.context_switches / tx:.1f}" if r.context_switches and tx else "-"
            logins = "?" if r.server_logins is None else f"{r.server_logins:,}"
            cells = [
                w.title,
                t,
                f"{shares['machine']:.0f}%",
                proxy,
                *(f"{shares[k]:.0f}%" for k in ("pgbench", "postgres", "irq", "other")),
                per_tx,
                waiting,
                ctx,
                logins,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _peak(r: RunResult) -> str:
    return "?" if r.peak_server_connections is None else str(r.peak_server_connections)


def verdict(
    workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult], pool_size: int
) -> list[str]:
    lines = []
    for w in workloads:
        dbmux, pgb = results.get((w.key, "dbmux")), results.get((w.key, "pgbouncer"))
        if w.steady and dbmux and pgb and dbmux.tps and pgb.tps:
            ratio = dbmux.tps / pgb.tps
            mark = "PASS" if ratio >= 0.8 else "FAIL"
            aim = " (aim 1.0x reached)" if ratio >= 1.0 else ""
            noisy = " (noisy run, see CPU table)" if dbmux.noisy or pgb.noisy else ""
            lines.append(
                f"{mark}  {w.title}: dbmux {ratio:.2f}x PgBouncer, target >= 0.80x{aim}{noisy}"
            )
        if w.key == "storm-300":
            direct = results.get((w.key, "direct"))
            if dbmux and dbmux.pgbench:
                mark = "PASS" if dbmux.failures == 0 and not dbmux.pgbench.timed_out else "FAIL"
                lines.append(f"{mark}  {w.title}: dbmux failures {dbmux.failures} (target 0)")
            if direct and direct.pgbench:
                how = "fails, as expected" if direct.failures else "did NOT fail (unexpected)"
                lines.append(f"      {w.title}: direct {how}: {direct.failures} failures")
        if w.key == "set-heavy":
            if dbmux and dbmux.pgbench:
                peak = dbmux.peak_server_connections
                ok = (
                    peak is not None
                    and peak <= pool_size
                    and dbmux.failures == 0
                    and not dbmux.pgbench.timed_out
                )
                lines.append(
                    f"{'PASS' if ok else 'FAIL'}  set-heavy: dbmux (replay) keeps multiplexing: "
                    f"peak server connections <= pool size ({pool_size}), zero failures: "
                    f"peak {_peak(dbmux)}, failures {dbmux.failures}"
                )
            for name, how in (("dbmux-pin", "pins each session"), ("pgbouncer", "ignores SET")):
                r = results.get((w.key, name))
                if r and r.pgbench:
                    lines.append(
                        f"      set-heavy: {name} ({how}): peak server connections {_peak(r)}, "
                        f"failures {r.failures}, {fmt_tps(r.tps)} tps"
                        + (f" (dbmux/{name}: {fmt_ratio(dbmux.tps, r.tps)})" if dbmux else "")
                    )
    return lines


def problems(results: dict[tuple[str, str], RunResult]) -> list[str]:
    """Errors pgbench saw and anything the proxies logged or did wrong, per run."""
    lines = []
    for (wl, target), r in results.items():
        notes = list(r.problems)
        if r.pgbench is not None:
            notes += [f"pgbench: {n}x {msg}" for msg, n in r.pgbench.errors.items()]
            if r.pgbench.aborted_clients:
                notes.append(f"pgbench: {r.pgbench.aborted_clients} clients aborted")
            if r.pgbench.timed_out:
                notes.append("pgbench: still running after the grace period; killed")
        if not r.proxy_alive_after:
            notes.append(f"{target} was not running after the run")
        if notes:
            lines.append(f"- {wl} / {target}:")
            lines += [f"    {n}" for n in notes[:12]]
            if len(notes) > 12:
                lines.append(f"    ... {len(notes) - 12} more in the JSON")
    return lines
