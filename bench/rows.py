"""The tables of the rows whose point is not throughput, with their targets.

- fairness (active-1000): many more clients than server connections, all busy. Is every
  client served, how evenly (transactions per client, from pgbench --log), and how long does
  a transaction wait for a server connection (dbmux's borrow wait histogram)?
- round trip (select-1): one client, so every transaction is a full round trip through the
  proxy: the latency each proxy adds to direct access.

See bench/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench import prometheus
from bench.pgbench import PgbenchResult
from bench.report import RunResult, Workload, fmt_cpu_per_tx, fmt_tps, markdown_table

BORROW_LATENCY = "dbmux_database_connections_borrow_latency_seconds"
# Fair: no client got less than this share of the median client's transactions.
FAIR_SHARE = 0.5
# select-1's target: dbmux adds at most PgBouncer's added latency plus this, per round trip.
ADDED_SLACK_US = 10.0

FAIRNESS_LEGEND = (
    "Fairness, every client busy (pgbench --log): clients served = clients that completed a "
    "transaction; tx per client over all of them, a starved client counting 0; latency "
    "percentiles of every logged transaction, its wait for a server connection included; "
    "borrow wait: dbmux's DatabaseConnectionsBorrowLatency after the run, as Prometheus's "
    "histogram_quantile() estimates it from the buckets, with the bucket it lies in "
    "(immediate borrows are in the first, 0-1 ms). Proxy CPU per transaction includes the "
    "clients' logins, one per client. * = noisy run."
)
ROUND_TRIP_LEGEND = (
    "Round trip, one client (pgbench -c 1 -P 1): each transaction is one simple-protocol query "
    "and its answer. latency avg = pgbench's average over the run; quietest second = the "
    "lowest of its per-second averages (-P 1), the second least slowed down by other "
    "processes on the machine (1 µs resolution both); added = the target's less direct "
    "access's in the same section. * = noisy run."
)


def borrow_wait(metrics_text: str) -> dict[str, Any] | None:
    """dbmux's DatabaseConnectionsBorrowLatency from its /metrics: borrows, and the p50 and p99
    wait in ms as Prometheus's histogram_quantile estimates them, each with the bounds of the
    bucket it lies in (the true value is somewhere in there). None: no borrow at all."""
    cumulative = prometheus.buckets(metrics_text, BORROW_LATENCY)
    if not cumulative or not cumulative[-1][1]:
        return None
    wait: dict[str, Any] = {"borrows": int(cumulative[-1][1])}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        estimate = prometheus.quantile(q, cumulative)
        assert estimate is not None
        wait[f"{name}_ms"] = round(1000 * estimate.value, 3)
        wait[f"{name}_bucket_ms"] = [1000 * estimate.lower, 1000 * estimate.upper]
    return wait


def _pgbench(r: RunResult | None) -> PgbenchResult | None:
    return r.client if r is not None and isinstance(r.client, PgbenchResult) else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _wait(wait: dict[str, Any] | None, name: str) -> str:
    """A borrow wait quantile in ms with its bucket: `645.08 (500-1,000)`."""
    if not wait or wait.get(f"{name}_ms") is None:
        return "-"
    lower, upper = wait[f"{name}_bucket_ms"]
    return f"{_ms(wait[f'{name}_ms'])} ({lower:,g}-{upper:,g})"


def _spread(c: PgbenchResult) -> str:
    """Transactions per client: min / median / max."""
    if c.tx_per_client is None:
        return "-"
    return " / ".join(f"{c.tx_per_client[k]:,g}" for k in ("min", "median", "max"))


def fairness_table(
    workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult], targets: Sequence[str]
) -> str:
    head = [
        "workload",
        "target",
        "tps",
        "proxy CPU µs/tx",
        "failures",
        "clients served",
        "tx per client (min / median / max)",
        "latency p50 / p99 ms",
        "borrow wait p50 / p99 ms (bucket)",
    ]
    rows: list[list[str]] = []
    for w in workloads:
        if not w.transaction_log:
            continue
        for t in targets:
            r = results.get((w.key, t))
            c = _pgbench(r)
            if r is None or c is None:
                continue
            cells = [
                w.title,
                t,
                fmt_tps(c.tps) + ("*" if r.noisy else ""),
                fmt_cpu_per_tx(r),
                str(c.failures),
                "-" if c.clients_served is None else f"{c.clients_served:,} of {c.clients:,}",
                _spread(c),
                f"{_ms(c.latency_p50_ms)} / {_ms(c.latency_p99_ms)}",
                f"{_wait(r.borrow_wait, 'p50')} / {_wait(r.borrow_wait, 'p99')}",
            ]
            rows.append(cells)
    return markdown_table(head, rows)


# The round-trip latencies: pgbench's average over the run, and that of its quietest second.
AVERAGE, QUIETEST = "latency_ms", "latency_best_second_ms"


def _latency_us(r: RunResult | None, which: str) -> float | None:
    value = getattr(r.client, which, None) if r is not None else None
    return None if value is None else 1000 * value


def _added_us(
    results: dict[tuple[str, str], RunResult], wl: str, t: str, which: str
) -> float | None:
    """Latency through target t less direct access's, in µs."""
    through = _latency_us(results.get((wl, t)), which)
    direct = _latency_us(results.get((wl, "direct")), which)
    return None if through is None or direct is None else through - direct


def round_trip_table(
    workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult], targets: Sequence[str]
) -> str:
    head = [
        "workload",
        "target",
        "tps",
        "latency avg µs",
        "added vs direct µs",
        "quietest second µs",
        "added vs direct µs",
        "failures",
    ]
    rows: list[list[str]] = []
    for w in workloads:
        if not w.round_trip:
            continue
        for t in targets:
            r = results.get((w.key, t))
            if r is None or r.client is None:
                continue
            cells = [w.title, t, fmt_tps(r.tps) + ("*" if r.noisy else "")]
            for which in (AVERAGE, QUIETEST):
                latency = _latency_us(r, which)
                added = _added_us(results, w.key, t, which) if t != "direct" else None
                cells.append("-" if latency is None else f"{latency:,.0f}")
                cells.append("-" if added is None else f"{added:+,.0f}")
            cells.append(str(r.failures))
            rows.append(cells)
    return markdown_table(head, rows)


def _fairness_verdict(w: Workload, results: dict[tuple[str, str], RunResult]) -> list[str]:
    dbmux = results.get((w.key, "dbmux"))
    c = _pgbench(dbmux)
    if dbmux is None or c is None:
        return []
    spread = c.tx_per_client
    fair = bool(spread) and spread["min"] >= FAIR_SHARE * spread["median"] > 0
    ok = fair and c.failures == 0 and c.clients_served == c.clients and not c.timed_out
    lines = [
        f"{'PASS' if ok else 'FAIL'}  {w.title}: dbmux serves every client fairly (each at "
        f"least {FAIR_SHARE:g}x the median client's transactions), zero failures: "
        f"served {c.clients_served} of {c.clients}, tx per client {_spread(c)}, "
        f"failures {c.failures}; p99 borrow wait {_wait(dbmux.borrow_wait, 'p99')} ms "
        f"of {(dbmux.borrow_wait or {}).get('borrows', 0):,} borrows"
    ]
    other = _pgbench(results.get((w.key, "pgbouncer")))
    if other is not None:
        lines.append(
            f"      {w.title}: pgbouncer served {other.clients_served} of {other.clients}, "
            f"tx per client {_spread(other)}, failures {other.failures}"
        )
    return lines


def _round_trip_verdict(w: Workload, results: dict[tuple[str, str], RunResult]) -> list[str]:
    lines = []
    for which, over in ((AVERAGE, "the run's average"), (QUIETEST, "its quietest second")):
        dbmux, pgbouncer = (_added_us(results, w.key, t, which) for t in ("dbmux", "pgbouncer"))
        if dbmux is None or pgbouncer is None:
            continue
        limit = pgbouncer + ADDED_SLACK_US
        ok = dbmux <= limit
        lines.append(
            f"{'PASS' if ok else 'FAIL'}  {w.title}, {over}: dbmux adds {dbmux:,.0f} µs per "
            f"round trip to direct access, PgBouncer {pgbouncer:,.0f} µs: target <= "
            f"PgBouncer's + {ADDED_SLACK_US:g} µs ({limit:,.0f} µs) {'met' if ok else 'missed'}"
        )
    if lines and any(r.noisy for (wl, _), r in results.items() if wl == w.key):
        lines[0] += " (noisy run, see CPU table)"
    return lines


def verdict(workloads: Sequence[Workload], results: dict[tuple[str, str], RunResult]) -> list[str]:
    lines = []
    for w in workloads:
        if w.transaction_log:
            lines += _fairness_verdict(w, results)
        if w.round_trip:
            lines += _round_trip_verdict(w, results)
    return lines
