"""Metrics named after RDS Proxy's CloudWatch metrics, rendered in Prometheus text format.

Counters are plain integers on pre-labelled children so the hot path pays one attribute
increment; gauges that mirror container sizes are read from callbacks at scrape time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

Labels = tuple[tuple[str, str], ...]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Child:
    """One labelled time series; `value` is a plain attribute for cheap increments."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Metric:
    """A family of series sharing a name (CamelCase, as RDS Proxy spells it)."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.children: dict[Labels, Child] = {}
        self.callbacks: dict[Labels, Callable[[], float]] = {}

    def labels(self, **labels: str) -> Child:
        key = tuple(sorted(labels.items()))
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = Child()
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
        """Sum of the series whose labels include `labels` (handy for tests and reports)."""
        want = set(labels.items())
        return sum(v for key, v in self.samples() if want <= set(key))


class Registry:
    """All metrics of one dbmux process."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _get(self, name: str, kind: str, help_text: str) -> Metric:
        metric = self.metrics.get(name)
        if metric is None:
            metric = self.metrics[name] = Metric(name, kind, help_text)
        return metric

    def counter(self, name: str, help_text: str) -> Metric:
        return self._get(name, "counter", help_text)

    def gauge(self, name: str, help_text: str) -> Metric:
        return self._get(name, "gauge", help_text)

    def render(self) -> str:
        """Prometheus exposition: dbmux_<snake_name>{labels} value."""
        out: list[str] = []
        for metric in self.metrics.values():
            prom = "dbmux_" + _snake(metric.name)
            if metric.kind == "counter":
                prom += "_total"
            out.append(f"# HELP {prom} {metric.help}")
            out.append(f"# TYPE {prom} {metric.kind}")
            for key, value in metric.samples():
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                number = int(value) if float(value).is_integer() else value
                out.append(f"{prom}{{{labels}}} {number}" if labels else f"{prom} {number}")
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ProxyMetrics:
    """The series one proxy reports, pre-labelled with its name."""

    def __init__(self, registry: Registry, proxy: str) -> None:
        self.registry = registry
        self.proxy = proxy
        c, g = registry.counter, registry.gauge
        self.client_connections_received = c(
            "ClientConnectionsReceived", "Client connections accepted by the listener"
        ).labels(proxy=proxy)
        self.client_connections_setup_succeeded = c(
            "ClientConnectionsSetupSucceeded", "Client connections that finished login"
        ).labels(proxy=proxy)
        self.client_connections_tls = c(
            "ClientConnectionsTLS", "Client logins completed over TLS"
        ).labels(proxy=proxy)
        self.client_connections_no_tls = c(
            "ClientConnectionsNoTLS", "Client logins completed without TLS"
        ).labels(proxy=proxy)
        self.client_connections_setup_failed_auth = c(
            "ClientConnectionsSetupFailedAuth", "Client logins refused for bad credentials"
        ).labels(proxy=proxy)
        self.client_connections_closed = c(
            "ClientConnectionsClosed", "Client connections that ended"
        ).labels(proxy=proxy)
        self.client_connections_refused = c(
            "ClientConnectionsRefused",
            "Client connections refused because max_client_connections was reached",
        ).labels(proxy=proxy)
        self.client_protocol_errors = c(
            "ClientProtocolErrors", "Client connections closed for malformed protocol input"
        ).labels(proxy=proxy)
        self.client_logins_dropped = c(
            "ClientLoginsDropped",
            "Connections dropped before proving a password: max_pending_logins others were "
            "waiting to (the oldest goes)",
        ).labels(proxy=proxy)
        self.client_logins_delayed = c(
            "ClientLoginsDelayed",
            "Failed logins answered late: their user or address failed too often recently",
        ).labels(proxy=proxy)
        self.query_requests = c("QueryRequests", "Queries received from clients").labels(
            proxy=proxy
        )
        self.database_connection_requests = c(
            "DatabaseConnectionRequests", "Requests to borrow a database connection"
        ).labels(proxy=proxy)
        self.borrow_timeouts = c(
            "DatabaseConnectionBorrowTimeouts",
            "Borrows that failed after connection_borrow_timeout",
        ).labels(proxy=proxy)
        self.database_connections_setup_succeeded = c(
            "DatabaseConnectionsSetupSucceeded", "Database connections opened"
        ).labels(proxy=proxy)
        self.database_connections_setup_failed = c(
            "DatabaseConnectionsSetupFailed", "Database connection attempts that failed"
        ).labels(proxy=proxy)
        self.database_connections_lost = c(
            "DatabaseConnectionsLost", "Database connections that died while in use"
        ).labels(proxy=proxy)
        self.transaction_replays = c(
            "TransactionReplays", "Transactions run again after their connection died"
        ).labels(proxy=proxy)
        self.transaction_replays_failed = c(
            "TransactionReplaysFailed",
            "Transaction replays abandoned (a result differed, or no server connection)",
        ).labels(proxy=proxy)
        self._pins = c(
            "DatabaseConnectionsSessionPinned",
            "Client sessions pinned to one database connection, by reason",
        )
        self._token_refusals = c(
            "ClientConnectionsTokenRefused",
            "Logins refused for their auth token (iam_auth), by reason",
        )
        self.client_connections = g("ClientConnections", "Open client connections")
        self.database_connections = g("DatabaseConnections", "Open database connections")
        self.database_connections_borrowed = g(
            "DatabaseConnectionsCurrentlyBorrowed", "Database connections lent to clients"
        )
        self.database_connections_pinned = g(
            "DatabaseConnectionsCurrentlySessionPinned", "Database connections pinned to a client"
        )
        self.max_database_connections = g(
            "MaxDatabaseConnectionsAllowed", "Pool size limit derived from max_connections"
        )

    def count_pin(self, reason: str) -> None:
        self._pins.labels(proxy=self.proxy, reason=reason).inc()

    def count_token_refusal(self, reason: str) -> None:
        self._token_refusals.labels(proxy=self.proxy, reason=reason).inc()

    def token_refusals(self, reason: str | None = None) -> float:
        labels = {"reason": reason} if reason else {}
        return self._token_refusals.total(proxy=self.proxy, **labels)

    def pins(self, reason: str | None = None) -> float:
        return self._pins.total(proxy=self.proxy, **({"reason": reason} if reason else {}))
