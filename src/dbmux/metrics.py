"""Metrics named after RDS Proxy's CloudWatch metrics, rendered in Prometheus text format.

Why an own registry rather than prometheus-client: the hot path counts every query, borrow and
login, and here an increment is one attribute add on a pre-labelled child (`child.value += 1`,
about 20 ns), where prometheus-client's Counter.inc takes a lock (about 300 ns; Histogram
.observe about 600 ns). Gauges that mirror container sizes are read from callbacks at scrape
time, so the hot path never maintains them.

Names: a metric keeps its RDS Proxy name (`ClientConnections`); its Prometheus name is
`dbmux_` + that name in snake case + its unit + `_total` for counters
(`dbmux_database_connections_borrow_latency_seconds`). Labels: `proxy`, and where they apply
`endpoint`, `target` and `reason`.

Several worker processes, one /metrics: `Registry.snapshot()` gives a worker's values as plain
data (`Snapshot`: per family its kind, help text, merge rule and a value per label set; a
histogram's value is its per-bucket counts and sum) that pickles and sums. The process that
serves /metrics collects one snapshot per worker (each worker's own numbers, never a shared
cell that two workers both report) and `render(snapshots)` merges them: counters, histograms
and most gauges add up; a gauge describing something the workers share rather than split
(MaxDatabaseConnectionsAllowed: one budget per target) merges by `max`, and one every worker
measures on its own (AvailabilityPercentage) by `mean`. Nothing is counted twice because no
worker reports another's series.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from time import perf_counter

Labels = tuple[tuple[str, str], ...]
# Seconds. The first bucket takes what did not wait at all (an immediate borrow).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
MERGES = ("sum", "max", "mean")


def _snake(name: str) -> str:
    """ClientConnectionsNoTLS -> client_connections_no_tls (acronyms stay one word)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Child:
    """One labelled time series; `value` is a plain attribute for cheap increments."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HistogramChild:
    """One labelled histogram. `counts[i]` holds the observations in bucket i alone (not
    cumulative, so an observation is one increment); the last is +Inf's. Something that did
    not wait may be counted as `counts[0] += 1` with no clock read at all."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


class RequestLatency:
    """QueryResponseLatency and QueryDatabaseResponseLatency of one endpoint, observed in one
    call per request (the hot path). A request that did not wait for a server connection has
    one elapsed time for both, so one bucket lookup."""

    __slots__ = ("database", "response")

    def __init__(self, response: HistogramChild, database: HistogramChild) -> None:
        self.response = response
        self.database = database

    def observe(self, arrived: float, sent: float) -> None:
        """The answer is complete now; the request arrived at `arrived` and went to the
        database at `sent` (perf_counter times)."""
        now = perf_counter()
        elapsed = now - arrived
        response = self.response
        bucket = bisect_left(response.bounds, elapsed)
        response.counts[bucket] += 1
        response.sum += elapsed
        if sent != arrived:
            elapsed = now - sent
            bucket = bisect_left(response.bounds, elapsed)
        database = self.database
        database.counts[bucket] += 1
        database.sum += elapsed


@dataclass
class Family:
    """A metric family as plain data: what a worker sends to the process serving /metrics.
    `series` maps label sets to a number, or for a histogram to (per-bucket counts, sum)."""

    name: str  # the RDS Proxy (CamelCase) name
    prom: str  # the Prometheus name
    kind: str  # counter | gauge | histogram
    help: str
    merge: str = "sum"  # how gauges of several workers combine (see the module docstring)
    bounds: tuple[float, ...] = ()
    series: dict[Labels, float | tuple[list[int], float]] = field(default_factory=dict)


Snapshot = dict[str, Family]  # by Prometheus name


class Metric:
    """A family of series sharing a name (CamelCase, as RDS Proxy spells it)."""

    def __init__(
        self,
        name: str,
        kind: str,
        help_text: str,
        *,
        unit: str = "",
        merge: str = "sum",
        bounds: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        assert merge in MERGES
        self.name = name
        self.kind = kind
        self.help = help_text
        self.merge = merge
        self.bounds = bounds
        self.prom = "dbmux_" + _snake(name) + (f"_{unit}" if unit else "")
        if kind == "counter":
            self.prom += "_total"
        self.children: dict[Labels, Child] = {}
        self.histograms: dict[Labels, HistogramChild] = {}
        self.callbacks: dict[Labels, Callable[[], float]] = {}

    def labels(self, **labels: str) -> Child:
        key = tuple(sorted(labels.items()))
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = Child()
        return child

    def histogram(self, **labels: str) -> HistogramChild:
        key = tuple(sorted(labels.items()))
        child = self.histograms.get(key)
        if child is None:
            child = self.histograms[key] = HistogramChild(self.bounds)
        return child

    def observe_with(self, fn: Callable[[], float], **labels: str) -> None:
        """Read this series from `fn` at scrape time (gauges over live containers)."""
        self.callbacks[tuple(sorted(labels.items()))] = fn

    def samples(self) -> Iterator[tuple[Labels, float]]:
        for key, child in self.children.items():
            yield key, child.value
        for key, fn in self.callbacks.items():
            yield key, fn()

    def total(self, **labels: str) -> float:
        """Sum of the series whose labels include `labels` (handy for tests and reports);
        for a histogram, its observation count."""
        want = set(labels.items())
        if self.kind == "histogram":
            return sum(h.count for key, h in self.histograms.items() if want <= set(key))
        return sum(v for key, v in self.samples() if want <= set(key))

    def family(self) -> Family:
        series: dict[Labels, float | tuple[list[int], float]]
        if self.kind == "histogram":
            series = {k: (list(h.counts), h.sum) for k, h in self.histograms.items()}
        else:
            series = dict(self.samples())
        bounds = self.bounds if self.kind == "histogram" else ()
        return Family(self.name, self.prom, self.kind, self.help, self.merge, bounds, series)


class Registry:
    """All metrics of one dbmux process (one worker)."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _get(
        self, name: str, kind: str, help_text: str, unit: str = "", merge: str = "sum"
    ) -> Metric:
        metric = self.metrics.get(name)
        if metric is None:
            metric = self.metrics[name] = Metric(name, kind, help_text, unit=unit, merge=merge)
        return metric

    def counter(self, name: str, help_text: str) -> Metric:
        return self._get(name, "counter", help_text)

    def gauge(self, name: str, help_text: str, *, unit: str = "", merge: str = "sum") -> Metric:
        return self._get(name, "gauge", help_text, unit, merge)

    def histogram(self, name: str, help_text: str, *, unit: str = "seconds") -> Metric:
        return self._get(name, "histogram", help_text, unit)

    def snapshot(self) -> Snapshot:
        """This worker's values as plain data, to be merged with other workers' (render)."""
        return {m.prom: m.family() for m in self.metrics.values()}

    def render(self) -> str:
        """Prometheus text exposition of this process's metrics."""
        return render([self.snapshot()])


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot from several workers' (see the module docstring)."""
    merged: Snapshot = {}
    seen: dict[tuple[str, Labels], int] = {}  # how many workers reported a series (mean)
    for snapshot in snapshots:
        for prom, family in snapshot.items():
            into = merged.get(prom)
            if into is None:
                into = merged[prom] = Family(
                    family.name, prom, family.kind, family.help, family.merge, family.bounds
                )
            for key, value in family.series.items():
                seen[prom, key] = seen.get((prom, key), 0) + 1
                old = into.series.get(key)
                into.series[key] = value if old is None else _combine(old, value, family.merge)
    for prom, family in merged.items():
        if family.merge == "mean":
            for key, value in family.series.items():
                assert not isinstance(value, tuple)
                family.series[key] = value / seen[prom, key]
    return merged


def _combine(
    old: float | tuple[list[int], float], new: float | tuple[list[int], float], how: str
) -> float | tuple[list[int], float]:
    if isinstance(old, tuple) and isinstance(new, tuple):
        return [a + b for a, b in zip(old[0], new[0], strict=True)], old[1] + new[1]
    if isinstance(old, tuple) or isinstance(new, tuple):
        raise ValueError("a histogram and a number for one series")
    return max(old, new) if how == "max" else old + new  # (mean: divided afterwards)


def render(snapshots: Iterable[Snapshot]) -> str:
    """Prometheus text exposition (version 0.0.4) of the merged snapshots."""
    out: list[str] = []
    for prom, family in merge(snapshots).items():
        out.append(f"# HELP {prom} {_escape_help(family.help)}")
        out.append(f"# TYPE {prom} {family.kind}")
        for key, value in family.series.items():
            if isinstance(value, tuple):
                counts, total = value
                running = 0
                for bound, count in zip((*family.bounds, float("inf")), counts, strict=True):
                    running += count
                    le = "+Inf" if bound == float("inf") else _number(bound)
                    out.append(_line(f"{prom}_bucket", (*key, ("le", le)), running))
                out.append(_line(f"{prom}_sum", key, total))
                out.append(_line(f"{prom}_count", key, running))
            else:
                out.append(_line(prom, key, value))
    return "\n".join(out) + "\n"


def _line(name: str, key: Labels, value: float) -> str:
    if not key:
        return f"{name} {_number(value)}"
    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
    return f"{name}{{{labels}}} {_number(value)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


DEFAULT_ENDPOINT = "default"  # RDS Proxy's name for a proxy's own endpoint


class ProxyMetrics:
    """The series one listener of a proxy reports: client-side ones labelled with its proxy
    and endpoint, database-side ones (shared by the proxy's endpoints) with its proxy only.
    `timed`: the latency histograms are recorded (config: latency_histograms)."""

    def __init__(
        self,
        registry: Registry,
        proxy: str,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timed: bool = True,
    ) -> None:
        self.registry = registry
        self.proxy = proxy
        self.endpoint = endpoint
        self.timed = timed
        c, g, h = registry.counter, registry.gauge, registry.histogram
        at = {"proxy": proxy, "endpoint": endpoint}  # client-side series
        on = {"proxy": proxy}  # database-side series

        # -- clients ------------------------------------------------------------------------
        self.client_connections = g("ClientConnections", "Open client connections").labels(**at)
        self.client_connections_received = c(
            "ClientConnectionsReceived", "Client connections accepted by the listener"
        ).labels(**at)
        self.client_connections_setup_succeeded = c(
            "ClientConnectionsSetupSucceeded", "Client connections that finished login"
        ).labels(**at)
        self._setup_failed_auth = c(
            "ClientConnectionsSetupFailedAuth",
            "Client logins refused for their credentials, by reason (wrong_password, "
            "unknown_user, token_refused, tls_required)",
        )
        self.client_connections_tls = c(
            "ClientConnectionsTLS", "Client logins completed over TLS"
        ).labels(**at)
        self.client_connections_no_tls = c(
            "ClientConnectionsNoTLS", "Client logins completed without TLS"
        ).labels(**at)
        self.client_connections_closed = c(
            "ClientConnectionsClosed", "Client connections that ended"
        ).labels(**at)
        self.client_tls_handshakes = c(
            "ClientTLSHandshakes", "TLS handshakes with clients that succeeded"
        ).labels(**at)
        self.client_tls_handshakes_failed = c(
            "ClientTLSHandshakesFailed",
            "TLS handshakes with clients that failed (bad ClientHello, no common version or "
            "cipher, closed or timed out midway)",
        ).labels(**at)
        self._token_refusals = c(
            "ClientConnectionsTokenRefused",
            "Logins refused for their auth token (iam_auth), by reason",
        )
        self.client_connections_refused = c(
            "ClientConnectionsRefused",
            "Client connections refused because max_client_connections was reached",
        ).labels(**on)
        self.client_protocol_errors = c(
            "ClientProtocolErrors", "Client connections closed for malformed protocol input"
        ).labels(**at)
        self.client_logins_dropped = c(
            "ClientLoginsDropped",
            "Connections dropped before proving a password: max_pending_logins others were "
            "waiting to (the oldest goes)",
        ).labels(**on)
        self.client_logins_delayed = c(
            "ClientLoginsDelayed",
            "Failed logins answered late: their user or address failed too often recently",
        ).labels(**on)

        # -- requests -----------------------------------------------------------------------
        self.query_requests = c(
            "QueryRequests",
            "Requests received from clients (PostgreSQL: each Query or Sync; MySQL: each command)",
        ).labels(**at)
        self.query_response_latency = h(
            "QueryResponseLatency",
            "Time from a request's arrival to the end of its answer, borrow wait included "
            "(requests sent back to back are timed as one)",
        ).histogram(**at)
        self.query_database_response_latency = h(
            "QueryDatabaseResponseLatency",
            "Time from a request's sending to the database to the end of its answer",
        ).histogram(**at)
        self.request_latency = RequestLatency(
            self.query_response_latency, self.query_database_response_latency
        )
        self.prepared_statement_cache_hits = c(
            "PreparedStatementCacheHits",
            "Uses of a client's prepared statement that found it prepared on the borrowed "
            "database connection",
        ).labels(**at)
        self.prepared_statement_cache_misses = c(
            "PreparedStatementCacheMisses",
            "Uses of a client's prepared statement that had to prepare it on the borrowed "
            "database connection first",
        ).labels(**at)
        self.transaction_replays = c(
            "TransactionReplays", "Transactions run again after their connection died"
        ).labels(**at)
        self.transaction_replays_failed = c(
            "TransactionReplaysFailed",
            "Transaction replays abandoned (a result differed, or no server connection)",
        ).labels(**at)

        # -- borrowing ----------------------------------------------------------------------
        self.database_connection_requests = c(
            "DatabaseConnectionRequests", "Requests to borrow a database connection"
        ).labels(**on)
        self.borrow_latency = h(
            "DatabaseConnectionsBorrowLatency",
            "Time a borrow took, from the request to the connection lent (immediate borrows "
            "in the first bucket)",
        ).histogram(**on)
        self.borrow_timeouts = c(
            "DatabaseConnectionBorrowTimeouts",
            "Borrows that failed after connection_borrow_timeout",
        ).labels(**at)
        self._pins = c(
            "DatabaseConnectionsSessionPinned",
            "Client sessions pinned to one database connection, by reason",
        )

        # -- database connections -----------------------------------------------------------
        self.database_connections_setup_succeeded = c(
            "DatabaseConnectionsSetupSucceeded", "Database connections opened"
        ).labels(**on)
        self.database_connections_setup_failed = c(
            "DatabaseConnectionsSetupFailed", "Database connection attempts that failed"
        ).labels(**on)
        self.database_connections_lost = c(
            "DatabaseConnectionsLost", "Database connections that died while in use"
        ).labels(**at)
        self._failovers = c(
            "Failovers", "Writer changes after the writer was lost, by the new writer (target)"
        )
        self.failover_duration = h(
            "FailoverDuration", "Time from the loss of the writer to the next writer found"
        ).histogram(**on)

        # -- gauges read at scrape time (Proxy registers their callbacks) -------------------
        self.database_connections = g("DatabaseConnections", "Open database connections")
        self.database_connections_borrowed = g(
            "DatabaseConnectionsCurrentlyBorrowed", "Database connections lent to clients"
        )
        self.database_connections_in_transaction = g(
            "DatabaseConnectionsCurrentlyInTransaction",
            "Database connections lent to clients in a transaction",
        )
        self.database_connections_pinned = g(
            "DatabaseConnectionsCurrentlySessionPinned", "Database connections pinned to a client"
        )
        self.max_database_connections = g(
            "MaxDatabaseConnectionsAllowed",
            "Pool size limit derived from max_connections (per target group)",
            merge="max",
        )
        self.clients_waiting = g(
            "DatabaseConnectionRequestsWaiting", "Clients queued for a database connection"
        )
        self.longest_wait = g(
            "DatabaseConnectionRequestsLongestWait",
            "How long the longest-queued client has waited for a database connection",
            unit="seconds",
            merge="max",
        )
        self.prepared_statements = g(
            "PreparedStatements", "Statements prepared on the open database connections"
        )
        self.availability = g(
            "AvailabilityPercentage",
            "Per cent of the time since the proxy started that the target was available in "
            "its role",
            merge="mean",
        )

    def count_pin(self, reason: str) -> None:
        self._pins.labels(proxy=self.proxy, endpoint=self.endpoint, reason=reason).inc()

    def count_token_refusal(self, reason: str) -> None:
        self._token_refusals.labels(proxy=self.proxy, endpoint=self.endpoint, reason=reason).inc()

    def count_auth_failure(self, reason: str) -> None:
        self._setup_failed_auth.labels(
            proxy=self.proxy, endpoint=self.endpoint, reason=reason
        ).inc()

    def count_failover(self, target: str, seconds: float) -> None:
        self._failovers.labels(proxy=self.proxy, target=target).inc()
        self.failover_duration.observe(seconds)

    def token_refusals(self, reason: str | None = None) -> float:
        return self._token_refusals.total(proxy=self.proxy, **_reason(reason))

    def pins(self, reason: str | None = None) -> float:
        return self._pins.total(proxy=self.proxy, **_reason(reason))

    def auth_failures(self, reason: str | None = None) -> float:
        return self._setup_failed_auth.total(proxy=self.proxy, **_reason(reason))

    def failovers(self) -> float:
        return self._failovers.total(proxy=self.proxy)


def _reason(reason: str | None) -> dict[str, str]:
    return {"reason": reason} if reason else {}
