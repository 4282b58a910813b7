"""The console output: progress lines, the results table, the verdict, the CPU table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.client import ClientResult

# dbmux-before: dbmux as configured for "dbmux", run from the source tree --baseline names.
BASELINE = "dbmux-before"
TARGETS = (
    "direct",
    "pgbouncer",
    "haproxy",
    "dbmux",
    "dbmux-pin",
    "dbmux-nohist",
    "dbmux-w2",
    BASELINE,
)
# The targets each database's workloads can run, and those they run unless --targets names
# them (besides each workload's extra_targets, and dbmux-before with --baseline).
# haproxy: one TCP relay hop in C, no pooling, the cost of a hop for either database.
ENGINE_TARGETS = {
    "postgresql": TARGETS,
    "mysql": ("direct", "haproxy", "dbmux", "dbmux-w2", BASELINE),
}
DEFAULT_TARGETS = {
    "postgresql": ("direct", "pgbouncer", "haproxy", "dbmux"),
    "mysql": ("direct", "haproxy", "dbmux"),
}
# The proxy settings each dbmux target adds to its config.
DBMUX_TARGETS: dict[str, dict[str, Any]] = {
    "dbmux": {},
    "dbmux-pin": {"session_state": "pin"},
    # The query latency histograms off: their CPU cost is dbmux's minus this one's.
    "dbmux-nohist": {"latency_histograms": False},
    "dbmux-w2": {},
    BASELINE: {},
}
# Worker processes per dbmux target (config: workers); 1 unless named here.
DBMUX_WORKERS = {"dbmux-w2": 2}
_LETTERS = {
    "direct": "d",
    "pgbouncer": "p",
    "haproxy": "h",
    "dbmux": "x",
    "dbmux-pin": "pin",
    "dbmux-nohist": "nh",
    "dbmux-w2": "w2",
    BASELINE: "b",
}
_NAMES = {"direct": "direct", "pgbouncer": "PgBouncer", "haproxy": "HAProxy"}
# What the results table's proxy CPU column holds, for the sections' legends.
PROXY_CPU_LEGEND = (
    "proxy CPU µs/tx: the proxy's own user + system CPU per transaction (per connect in a "
    "storm), all of its threads, from /proc; HAProxy's is the cost of one relay hop in C "
    "(TCP mode, one thread, no pooling: each client connection is a server connection)."
)
NOISY = 10.0  # per cent of all cores used by processes outside the benchmark


@dataclass(frozen=True)
class RatioTarget:
    """A steady-state throughput target: dbmux's tps at least `minimum` times the baseline
    target's, ideally `aim` times."""

    baseline: str
    minimum: float
    aim: float


@dataclass(frozen=True)
class Workload:
    key: str  # what --only takes
    title: str
    args: tuple[str, ...]  # the client's arguments
    engine: str = "postgresql"  # or "mysql"
    tool: str = "pgbench"  # the client: pgbench, sysbench or storm
    ratio_target: RatioTarget | None = None
    storm: bool = False  # more clients than max_connections: direct fails, dbmux must not
    script: str = ""  # a custom transaction script, run with -f
    extra_targets: tuple[str, ...] = ()  # run besides the default targets unless --targets
    # dbmux's connection_pool_config.connection_borrow_timeout for this workload (all dbmux
    # targets), instead of the default 120 s; None: the default.
    borrow_timeout: float | None = None
    note: str = ""  # printed under the results table
    # Clients on TLS: the proxies offer it with the bench's throwaway certificate and refuse
    # plaintext, the client requires it (towards the database the proxies stay plaintext).
    tls: bool = False
    # The same workload without TLS: the TLS cost is the difference in proxy CPU per
    # transaction (per connect in a -C storm) between the two, run for run.
    plain: str = ""
    # The only targets this workload runs (default: all of its database's).
    targets: tuple[str, ...] = ()
    # pgbench --log: transactions per client and latency percentiles, in the fairness table
    # (bench.rows) with dbmux's borrow wait.
    transaction_log: bool = False
    # One client: the latency each proxy adds to a round trip, in the round-trip table.
    round_trip: bool = False
    # Seconds added to the client's run: pgbench's -T clock runs while it logs its clients in,
    # one at a time per thread, which for 1,000 clients takes seconds.
    login_allowance: int = 0

    @property
    def command(self) -> str:
        return " ".join((self.tool, *self.args)) + (" -f SCRIPT" if self.script else "")


@dataclass
class RunResult:
    workload: str
    target: str
    client: ClientResult | None = None
    peak_server_connections: int | None = None
    peak_active_connections: int | None = None
    proxy_cpu_seconds: float | None = None  # user + system
    proxy_system_seconds: float | None = None  # in the kernel: syscalls, TCP on loopback
    proxy_runqueue_seconds: float | None = None  # runnable but waiting for a CPU
    server_cpu_seconds: float | None = None  # the database server's processes
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
    # dbmux's DatabaseConnectionsBorrowLatency after the run (bench.rows.borrow_wait).
    borrow_wait: dict[str, Any] | None = None

    @property
    def noisy(self) -> bool:
        shares = self.cpu_shares()
        return bool(shares and shares["other"] >= NOISY)

    @property
    def tps(self) -> float | None:
        return self.client.tps if self.client else None

    @property
    def latency(self) -> float | None:
        return self.client.latency_ms if self.client else None

    @property
    def failures(self) -> int | None:
        return self.client.failures if self.client else None

    @property
    def aborted(self) -> bool:
        """The client aborted clients: tps is of the clients that kept running."""
        return bool(self.client and self.client.aborted_clients)

    def cpu_shares(self) -> dict[str, float] | None:
        """Per cent of all cores: whole machine, proxy, client, database server, interrupts,
        and other processes on the machine (a high share means a noisy run)."""
        if not self.client or not self.machine_total_seconds:
            return None
        total = self.machine_total_seconds
        busy = self.machine_busy_seconds or 0.0
        proxy = self.proxy_cpu_seconds or 0.0
        bench = self.client.cpu_seconds
        server = self.server_cpu_seconds or 0.0
        irq = self.machine_irq_seconds or 0.0
        return {
            "machine": 100 * busy / total,
            "proxy": 100 * proxy / total,
            "client": 100 * bench / total,
            "server": 100 * server / total,
            "irq": 100 * irq / total,
            "other": 100 * max(busy - irq - proxy - bench - server, 0.0) / total,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "target": self.target,
            "client": self.client.to_json() if self.client else None,
            "peak_server_connections": self.peak_server_connections,
            "peak_active_connections": self.peak_active_connections,
            "proxy_cpu_seconds": self.proxy_cpu_seconds,
            "proxy_system_seconds": self.proxy_system_seconds,
            "proxy_runqueue_seconds": self.proxy_runqueue_seconds,
            "server_cpu_seconds": self.server_cpu_seconds,
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
            "borrow_wait": self.borrow_wait,
        }


def fmt_tps(tps: float | None) -> str:
    if tps is None:
        return "-"
    return f"{tps:,.0f}" if tps >= 100 else f"{tps:,.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def progress_prefix(i: int, n: int, target: str, workload: Workload) -> str:
    return f"[{i:>2}/{n}] {target:<12} {workload.title:<26} ..."


def progress_result(r: RunResult) -> str:
    if r.client is None:
        return "not run: " + (r.problems[0].splitlines()[0] if r.problems else "?")
    p = r.client
    parts = [f"{fmt_tps(p.tps):>8} tps"]
    if p.qps is not None:
        parts.append(f"{fmt_tps(p.qps)} qps")
    parts.append(f"lat {p.latency_ms:.2f} ms" if p.latency_ms is not None else "lat -")
    parts.append(f"failures {p.failures}")
    if p.reconnects is not None:
        parts.append(f"reconnects {p.reconnects}")
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
        parts.append(f"{p.tool} exit {p.returncode}")
    if r.problems:
        parts.append(f"{len(r.problems)} problem(s), see below")
    return "  ".join(parts)


def _cell(results: dict[tuple[str, str], RunResult], wl: str, targets: Sequence[str], fn) -> str:
    values = []
    for t in targets:
        r = results.get((wl, t))
        values.append(fn(r) if r is not None and r.client is not None else "-")
    return " / ".join(values)


def _reported(
    results: dict[tuple[str, str], RunResult], workloads: Sequence[Workload], attr: str
) -> bool:
    """Some client of these workloads reports this number (sysbench's qps and reconnects)."""
    keys = {w.key for w in workloads}
    return any(
        r.client is not None and getattr(r.client, attr) is not None
        for (wl, _), r in results.items()
        if wl in keys
    )


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header, its rule, a line per row."""
    rule = "|" + "|".join("---" for _ in head) + "|"
    return "\n".join([_line(head), rule, *(_line(cells) for cells in rows)])


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(
    workloads: Sequence[Workload],
    results: dict[tuple[str, str], RunResult],
    targets: Sequence[str],
) -> str:
    """One database's workloads (the default targets' tps columns are that database's)."""
    order = " / ".join(_LETTERS[t] for t in targets)
    defaults = DEFAULT_TARGETS[workloads[0].engine]
    tps_columns = [*defaults, *(t for t in targets if t not in defaults)]
    # What dbmux's tps and latency are compared with besides direct access.
    against = [t for t in ("pgbouncer", "haproxy", BASELINE) if t in tps_columns]
    proxies = [t for t in targets if t != "direct"]
    proxy_order = " / ".join(_LETTERS[t] for t in proxies)
    qps, reconnects = (_reported(results, workloads, a) for a in ("qps", "reconnects"))
    head = [
        "workload",
        *(f"{t} tps" for t in tps_columns),
        *(f"dbmux/{t}" for t in against),
        "dbmux/direct",
        *([f"proxy CPU µs/tx ({proxy_order})"] if proxies else []),
        *([f"qps ({order})"] if qps else []),
        f"latency avg ms ({order})",
        *(f"latency dbmux/{t}" for t in against),
        f"failures ({order})",
        *([f"reconnects ({order})"] if reconnects else []),
        f"peak server conns ({order})",
    ]
    rows: list[list[str]] = []
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

        def cell(fn, w: Workload = w) -> str:
            return _cell(results, w.key, targets, fn)

        row = [
            w.title,
            *(tps(t) for t in tps_columns),
            *(fmt_ratio(get("dbmux", "tps"), get(t, "tps")) for t in against),
            fmt_ratio(get("dbmux", "tps"), get("direct", "tps")),
            *([_cell(results, w.key, proxies, fmt_cpu_per_tx)] if proxies else []),
            *([cell(lambda r: fmt_tps(r.client.qps))] if qps else []),
            cell(lambda r: f"{r.latency:.2f}" if r.latency else "-"),
            *(fmt_ratio(get("dbmux", "latency"), get(t, "latency")) for t in against),
            cell(lambda r: str(r.failures)),
            *([cell(lambda r: _reported_count(r.client.reconnects))] if reconnects else []),
            cell(lambda r: _count(r.peak_server_connections)),
        ]
        rows.append(row)
    return markdown_table(head, rows)


def _count(n: int | None) -> str:
    """A number that was measured, or "?" if the measurement failed."""
    return "?" if n is None else str(n)


def _reported_count(n: int | None) -> str:
    """A number some clients report, or "-" for a client that does not."""
    return "-" if n is None else str(n)


def _per_tx(seconds: float | None, r: RunResult) -> float | None:
    tx = r.client.transactions if r.client else None
    return 1e6 * seconds / tx if seconds is not None and tx else None


def fmt_cpu_per_tx(r: RunResult) -> str:
    """The proxy's own CPU (user + system, all its threads) per transaction, in µs."""
    value = _per_tx(r.proxy_cpu_seconds, r)
    return "?" if value is None else f"{value:,.1f}"


def cpu_table(
    workloads: Sequence[Workload],
    results: dict[tuple[str, str], RunResult],
    targets: Sequence[str],
    client: str,
    server: str,
) -> str:
    """client, server: what the client and the database server columns are called."""
    head = [
        "workload",
        "target",
        "machine busy",
        "proxy",
        client,
        server,
        "irq",
        "other",
        "proxy CPU µs/tx (user + sys)",
        "proxy waiting for a CPU (of wall time)",
        "context switches / tx",
        "server logins",
    ]
    rows: list[list[str]] = []
    for w in workloads:
        for t in targets:
            r = results.get((w.key, t))
            shares = r.cpu_shares() if r else None
            if r is None or r.client is None or not shares:
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
            tx = r.client.transactions
            ctx = f"{r.context_switches / tx:.1f}" if r.context_switches and tx else "-"
            logins = "?" if r.server_logins is None else f"{r.server_logins:,}"
            cells = [
                w.title,
                t,
                f"{shares['machine']:.0f}%",
                proxy,
                *(f"{shares[k]:.0f}%" for k in ("client", "server", "irq", "other")),
                per_tx,
                waiting,
                ctx,
                logins,
            ]
            rows.append(cells)
    return markdown_table(head, rows)


def _ratio_verdict(w: Workload, dbmux: RunResult, base: RunResult) -> str:
    assert w.ratio_target is not None and dbmux.tps and base.tps
    goal = w.ratio_target
    ratio = dbmux.tps / base.tps
    ok = ratio >= goal.minimum and dbmux.failures == 0
    aim = f" (aim {goal.aim}x reached)" if ratio >= goal.aim else f" (aim {goal.aim}x)"
    failed = f", but {dbmux.failures} failures" if dbmux.failures else ""
    noisy = " (noisy run, see CPU table)" if dbmux.noisy or base.noisy else ""
    name = _NAMES.get(goal.baseline, goal.baseline)
    return (
        f"{'PASS' if ok else 'FAIL'}  {w.title}: dbmux {ratio:.2f}x {name}, "
        f"target >= {goal.minimum:.2f}x{aim}{failed}{noisy}"
    )


def verdict(
    workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult], pool_size: int
) -> list[str]:
    lines = []
    for w in workloads:
        dbmux = results.get((w.key, "dbmux"))
        base = results.get((w.key, w.ratio_target.baseline)) if w.ratio_target else None
        if dbmux and base and dbmux.tps and base.tps:
            lines.append(_ratio_verdict(w, dbmux, base))
        if w.storm:
            if dbmux and dbmux.client:
                mark = "PASS" if dbmux.failures == 0 and not dbmux.client.timed_out else "FAIL"
                lines.append(f"{mark}  {w.title}: dbmux failures {dbmux.failures} (target 0)")
            for name in ("direct", "haproxy"):  # no pooling: one server connection each
                r = results.get((w.key, name))
                if r and r.client:
                    how = "fails, as expected" if r.failures else "did NOT fail (unexpected)"
                    lines.append(f"      {w.title}: {name} {how}: {r.failures} failures")
        if w.key == "set-heavy":
            if dbmux and dbmux.client:
                peak = dbmux.peak_server_connections
                ok = (
                    peak is not None
                    and peak <= pool_size
                    and dbmux.failures == 0
                    and not dbmux.client.timed_out
                )
                lines.append(
                    f"{'PASS' if ok else 'FAIL'}  set-heavy: dbmux (replay) keeps multiplexing: "
                    f"peak server connections <= pool size ({pool_size}), zero failures: "
                    f"peak {_count(dbmux.peak_server_connections)}, failures {dbmux.failures}"
                )
            for name, how in (("dbmux-pin", "pins each session"), ("pgbouncer", "ignores SET")):
                r = results.get((w.key, name))
                if r and r.client:
                    lines.append(
                        f"      set-heavy: {name} ({how}): peak server connections "
                        f"{_count(r.peak_server_connections)}, failures {r.failures}, "
                        f"{fmt_tps(r.tps)} tps"
                        + (f" (dbmux/{name}: {fmt_ratio(dbmux.tps, r.tps)})" if dbmux else "")
                    )
    return lines


TLS_PROXIES = ("pgbouncer", "dbmux")  # the proxies the TLS rows compare, in column order


def _proxy_cpu_per_tx(results: dict[tuple[str, str], RunResult], wl: str, t: str) -> float | None:
    r = results.get((wl, t))
    return _per_tx(r.proxy_cpu_seconds, r) if r is not None else None


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def tls_summary(
    workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult]
) -> list[dict[str, Any]]:
    """Per TLS workload and proxy: tps, proxy CPU per transaction and the TLS cost, that CPU
    less the same run's plaintext workload's (per connect in a storm, where each transaction
    is a new connection: the handshake); with the dbmux/PgBouncer ratios."""
    rows = []
    for w in workloads:
        if not w.tls or not any((w.key, t) in results for t in TLS_PROXIES):
            continue
        row: dict[str, Any] = {"workload": w.key, "plain": w.plain or None, "per": "transaction"}
        if "-C" in w.args:
            row["per"] = "connect"
        for t in TLS_PROXIES:
            cpu = _proxy_cpu_per_tx(results, w.key, t)
            plain = _proxy_cpu_per_tx(results, w.plain, t) if w.plain else None
            r = results.get((w.key, t))
            row[t] = {
                "tps": r.tps if r is not None else None,
                "failures": r.failures if r is not None else None,
                "proxy_cpu_us_per_tx": _rounded(cpu),
                "plain_proxy_cpu_us_per_tx": _rounded(plain),
                "tls_cost_us": _rounded(cpu - plain if cpu is not None and plain else None),
            }
        x, p = row["dbmux"], row["pgbouncer"]
        row["tps_ratio"] = x["tps"] / p["tps"] if x["tps"] and p["tps"] else None
        cpu_x, cpu_p = x["proxy_cpu_us_per_tx"], p["proxy_cpu_us_per_tx"]
        row["cpu_ratio"] = cpu_x / cpu_p if cpu_x and cpu_p else None
        rows.append(row)
    return rows


def tls_table(rows: list[dict[str, Any]], titles: dict[str, str]) -> str:
    """The TLS rows side by side: PgBouncer (p) and dbmux (x). titles: workload key -> title."""

    def pair(row: dict[str, Any], key: str, fmt) -> str:
        values = (row[t][key] for t in TLS_PROXIES)
        return " / ".join("-" if v is None else fmt(v) for v in values)

    head = [
        "workload (clients on TLS)",
        "PgBouncer tps",
        "dbmux tps",
        "dbmux/PgBouncer",
        "failures (p / x)",
        "proxy CPU µs/tx (p / x)",
        "CPU dbmux/PgBouncer",
        "TLS cost µs (p / x)",
        "per",
    ]
    lines: list[list[str]] = []
    for row in rows:
        ratio, cpu_ratio = row["tps_ratio"], row["cpu_ratio"]
        cells = [
            titles[row["workload"]],
            fmt_tps(row["pgbouncer"]["tps"]),
            fmt_tps(row["dbmux"]["tps"]),
            "-" if ratio is None else f"{ratio:.2f}x",
            pair(row, "failures", str),
            pair(row, "proxy_cpu_us_per_tx", lambda v: f"{v:,.1f}"),
            "-" if cpu_ratio is None else f"{cpu_ratio:.2f}x",
            pair(row, "tls_cost_us", lambda v: f"{v:,.1f}"),
            row["per"] + (f" (less {row['plain']})" if row["plain"] else ""),
        ]
        lines.append(cells)
    return markdown_table(head, lines)


def problems(results: dict[tuple[str, str], RunResult]) -> list[str]:
    """Errors the clients saw and anything the proxies logged or did wrong, per run."""
    lines = []
    for (wl, target), r in results.items():
        notes = list(r.problems)
        c = r.client
        if c is not None:
            notes += [f"{c.tool}: {n}x {msg}" for msg, n in c.errors.items()]
            if c.aborted_clients:
                notes.append(f"{c.tool}: {c.aborted_clients} clients aborted")
            if c.timed_out:
                notes.append(f"{c.tool}: still running after the grace period; killed")
        if not r.proxy_alive_after:
            notes.append(f"{target} was not running after the run")
        if notes:
            lines.append(f"- {wl} / {target}:")
            lines += [f"    {n}" for n in notes[:12]]
            if len(notes) > 12:
                lines.append(f"    ... {len(notes) - 12} more in the JSON")
    return lines
