"""dbmux.metrics: RDS Proxy's metrics (and more) in Prometheus text format.

Known workloads through a real proxy and real drivers give exact counts: N clients running M
requests each, K pins of a known reason, failed logins of each reason, TLS logins and a failed
handshake, a client that waits for the only server connection. The exposition must be valid
Prometheus text (a strict check here; prometheus-client's own parser too where it is
installed), and several workers' snapshots must render as their sum.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from dbmux.metrics import LATENCY_BUCKETS, ProxyMetrics, Registry, render
from tests.auth.test_tls import ca_of, pg_connect, unverified, write_certificate
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RunningProxy, wait_until
from tests.mysql_fixtures import MyProxy

README = Path(__file__).resolve().parents[1] / "README.md"
POOL_OF_ONE = {"max_connections_percent": 2}  # of the test server's 50 connections

# -- the exposition format --------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)")
_KINDS = ("counter", "gauge", "histogram")


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Families of a Prometheus text exposition (version 0.0.4), checked strictly: HELP then
    TYPE once per family, its samples together after them, names and escapes as the format
    allows, counters named *_total, histogram buckets cumulative and ascending with +Inf equal
    to _count. Returns {name: {"type", "help", "samples": {(sample name, labels): value}}}."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    name = ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and name not in families, line
            assert help_text.strip(), f"{name} has help text"
            current = families[name] = {"help": help_text, "type": None, "samples": {}}
            continue
        assert current is not None, f"a sample before any HELP: {line}"
        if line.startswith("# TYPE "):
            typed, _, kind = line[7:].partition(" ")
            assert typed == name and current["type"] is None and not current["samples"], line
            assert kind in _KINDS, line
            current["type"] = kind
            continue
        match = _SAMPLE.fullmatch(line)
        assert match is not None, f"not a sample line: {line!r}"
        sample, labels, value = match.groups()
        suffixes = ("_bucket", "_sum", "_count") if current["type"] == "histogram" else ("",)
        assert any(sample == name + s for s in suffixes), f"{sample} outside family {name}"
        number = float(value)  # raises on anything else
        assert not math.isnan(number), line
        key = (sample, tuple(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels or "")))
        assert key not in current["samples"], f"duplicate series: {line}"
        current["samples"][key] = number
    for name, family in families.items():
        assert family["type"] is not None, f"{name} has a TYPE"
        if family["type"] == "counter":
            assert name.endswith("_total"), name
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _check_histogram(name: str, samples: dict[tuple[str, Any], float]) -> None:
    series = {labels for sample, labels in samples if sample == name + "_count"}
    for labels in series:
        buckets = [
            (dict(lab)["le"], v)
            for (sample, lab), v in samples.items()
            if sample == name + "_bucket" and tuple(p for p in lab if p[0] != "le") == labels
        ]
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, name
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets are cumulative"
        assert counts[-1] == samples[(name + "_count", labels)], f"{name} +Inf is the count"
        assert (name + "_sum", labels) in samples


def value(families: dict[str, dict[str, Any]], sample: str, **labels: str) -> float:
    """The sum of `sample`'s series whose labels include `labels`."""
    family = families[re.sub(r"_(bucket|sum|count)$", "", sample)]
    want = set(labels.items())
    return sum(v for (s, lab), v in family["samples"].items() if s == sample and want <= set(lab))


def scrape(proxy: RunningProxy | MyProxy) -> dict[str, dict[str, Any]]:
    """What /metrics would serve, rendered on the proxy's own loop, as parsed families."""
    registry = proxy.embedded.proxy().registry

    async def rendered() -> str:
        return registry.render()

    return parse_exposition(proxy.embedded.call(rendered()))


# -- names, format, and several workers -------------------------------------------------------


def test_names_are_prometheus_style_with_units_and_total_and_help() -> None:
    registry = Registry()
    ProxyMetrics(registry, "orders")
    families = parse_exposition(registry.render())
    for name in (
        "dbmux_client_connections",
        "dbmux_client_connections_no_tls_total",
        "dbmux_client_connections_setup_failed_auth_total",
        "dbmux_database_connections_borrow_latency_seconds",
        "dbmux_query_response_latency_seconds",
        "dbmux_query_database_response_latency_seconds",
        "dbmux_max_database_connections_allowed",
        "dbmux_client_tls_handshakes_total",
    ):
        assert name in families, name
    assert families["dbmux_database_connections_borrow_latency_seconds"]["type"] == "histogram"
    assert value(families, "dbmux_client_connections", proxy="orders", endpoint="default") == 0


def test_label_values_and_help_are_escaped() -> None:
    registry = Registry()
    registry.counter("Odd", 'help with \\ and\nnewline and "quotes"').labels(
        proxy='a"b\\c\nd'
    ).inc()
    families = parse_exposition(registry.render())
    ((_sample, labels),) = families["dbmux_odd_total"]["samples"]
    assert labels == (("proxy", 'a\\"b\\\\c\\nd'),)


def test_prometheus_client_parses_the_exposition() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    registry = Registry()
    metrics = ProxyMetrics(registry, "orders")
    metrics.borrow_latency.observe(0.2)
    metrics.count_pin("temporary_object")
    parsed = {f.name: f for f in parser.text_string_to_metric_families(registry.render())}
    borrow = parsed["dbmux_database_connections_borrow_latency_seconds"]
    assert borrow.type == "histogram"
    counts = [s.value for s in borrow.samples if s.name.endswith("_count")]
    assert counts == [1]
    assert parsed["dbmux_database_connections_session_pinned"].type == "counter"


def two_workers() -> tuple[Registry, Registry]:
    """Two workers' registries with known, different numbers."""
    first, second = Registry(), Registry()
    for registry, clients, borrows, limit in ((first, 3, [0.0, 0.3], 40), (second, 5, [7.0], 40)):
        metrics = ProxyMetrics(registry, "orders")
        metrics.query_requests.value += clients * 10
        metrics.client_connections.value += clients
        metrics.count_auth_failure("wrong_password")
        for seconds in borrows:
            metrics.borrow_latency.observe(seconds)
        metrics.max_database_connections.observe_with(lambda n=limit: n, proxy="orders")
        metrics.availability.observe_with(
            lambda c=clients: 100.0 if c == 3 else 50.0, proxy="orders", target="db:5432"
        )
    return first, second


def test_several_workers_render_as_one_without_double_counting() -> None:
    first, second = two_workers()
    families = parse_exposition(render([first.snapshot(), second.snapshot()]))
    at = {"proxy": "orders", "endpoint": "default"}
    assert value(families, "dbmux_query_requests_total", **at) == 80
    assert value(families, "dbmux_client_connections", **at) == 8
    assert value(families, "dbmux_client_connections_setup_failed_auth_total", **at) == 2
    borrow = "dbmux_database_connections_borrow_latency_seconds"
    assert value(families, borrow + "_count", proxy="orders") == 3
    assert value(families, borrow + "_sum", proxy="orders") == pytest.approx(7.3)
    assert value(families, borrow + "_bucket", le="0.001") == 1
    assert value(families, borrow + "_bucket", le="0.5") == 2
    assert value(families, borrow + "_bucket", le="5") == 2
    assert value(families, borrow + "_bucket", le="10") == 3
    # One budget shared by the workers: not added up; availability: each worker's measure.
    assert value(families, "dbmux_max_database_connections_allowed") == 40
    assert value(families, "dbmux_availability_percentage", target="db:5432") == 75


def test_a_snapshot_is_plain_data_that_a_later_change_does_not_alter() -> None:
    first, second = two_workers()
    snapshot = first.snapshot()
    first.metrics["DatabaseConnectionsBorrowLatency"].histogram(proxy="orders").observe(1.0)
    again = render([snapshot, second.snapshot()])
    assert (
        value(parse_exposition(again), "dbmux_database_connections_borrow_latency_seconds_count")
        == 3
    )


def test_the_readme_maps_every_metric_to_its_rds_proxy_name() -> None:
    registry = Registry()
    ProxyMetrics(registry, "orders")
    text = README.read_text()
    section = text[text.index("## Metrics") :]
    section = section[: section.index("\n## ", 1)]
    for metric in registry.metrics.values():
        row = next((r for r in section.splitlines() if f"`{metric.prom}`" in r), None)
        assert row is not None, f"README's metrics table lacks {metric.prom}"
        assert metric.name in row or "(dbmux only)" in row, row


# -- known workloads through a real proxy -----------------------------------------------------


def run_clients(proxy: RunningProxy, clients: int, requests: int) -> None:
    """`clients` psycopg connections at once, each running `requests` autocommit SELECTs,
    one request each (psycopg's automatic prepare, one more, is off)."""
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with psycopg.connect(proxy.url(), autocommit=True, prepare_threshold=None) as conn:
                for i in range(requests):
                    assert conn.execute("SELECT %s::int", (n * 100 + i,)).fetchone() == (
                        n * 100 + i,
                    )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_n_clients_m_requests_count_exactly(proxy: RunningProxy) -> None:
    clients, requests = 4, 6
    run_clients(proxy, clients, requests)
    at = {"proxy": "test", "endpoint": "default"}
    wait_until(
        lambda: value(scrape(proxy), "dbmux_client_connections_closed_total") == clients,
        "every client's close counted",
    )
    families = scrape(proxy)
    assert value(families, "dbmux_client_connections_received_total", **at) == clients
    assert value(families, "dbmux_client_connections_setup_succeeded_total", **at) == clients
    assert value(families, "dbmux_client_connections_no_tls_total", **at) == clients
    assert value(families, "dbmux_client_connections_tls_total", **at) == 0
    assert value(families, "dbmux_client_connections", **at) == 0
    assert value(families, "dbmux_query_requests_total", **at) == clients * requests
    # Every request was timed once, from its arrival and from its sending to the database.
    for latency in (
        "dbmux_query_response_latency_seconds",
        "dbmux_query_database_response_latency_seconds",
    ):
        assert value(families, latency + "_count", **at) == clients * requests
    # Every borrow asked for is in the borrow latency histogram, once.
    borrows = value(families, "dbmux_database_connection_requests_total", proxy="test")
    assert borrows >= clients * requests
    borrow = "dbmux_database_connections_borrow_latency_seconds"
    assert value(families, borrow + "_count", proxy="test") == borrows
    # None was closed: every connection opened is open (once those still being opened for
    # clients that a released connection served meanwhile are done).
    wait_until(
        lambda: (
            value(scrape(proxy), "dbmux_database_connections")
            == value(scrape(proxy), "dbmux_database_connections_setup_succeeded_total")
        ),
        "the connections being opened are open",
    )
    families = scrape(proxy)
    assert value(families, "dbmux_database_connections_currently_borrowed") == 0
    assert value(families, "dbmux_max_database_connections_allowed") == 10  # 20% of 50
    assert (
        value(
            families,
            "dbmux_availability_percentage",
            target=f"{proxy.embedded.proxy().targets.instances[0].name}",
        )
        > 0
    )


def test_latency_histograms_switched_off_stay_empty_and_the_counts_go_on(
    start_proxy: Any,
) -> None:
    proxy = start_proxy(latency_histograms=False)
    run_clients(proxy, 2, 3)
    families = scrape(proxy)
    assert value(families, "dbmux_query_requests_total") == 6
    assert value(families, "dbmux_query_response_latency_seconds_count") == 0
    assert value(families, "dbmux_query_database_response_latency_seconds_count") == 0
    assert value(families, "dbmux_database_connections_borrow_latency_seconds_count") >= 6


def test_pins_in_transaction_and_pinned_gauges_follow_the_sessions(proxy: RunningProxy) -> None:
    pins = 3
    pinned = [psycopg.connect(proxy.url(), autocommit=True) for _ in range(pins)]
    for conn in pinned:
        conn.execute("CREATE TEMPORARY TABLE scratch (x int)")
    with psycopg.connect(proxy.url()) as in_transaction:
        in_transaction.execute("SELECT 1")  # psycopg opened a transaction: BEGIN first
        families = scrape(proxy)
        assert (
            value(
                families,
                "dbmux_database_connections_session_pinned_total",
                reason="temporary_object",
            )
            == pins
        )
        assert value(families, "dbmux_database_connections_currently_session_pinned") == pins
        assert value(families, "dbmux_database_connections_currently_in_transaction") == 1
        assert value(families, "dbmux_database_connections_currently_borrowed") == pins + 1
        assert value(families, "dbmux_client_connections") == pins + 1
    for conn in pinned:
        conn.close()
    wait_until(
        lambda: value(scrape(proxy), "dbmux_database_connections_currently_borrowed") == 0,
        "the pinned connections back in the pool",
    )
    families = scrape(proxy)
    assert value(families, "dbmux_database_connections_currently_session_pinned") == 0
    assert value(families, "dbmux_database_connections_currently_in_transaction") == 0
    assert value(families, "dbmux_database_connections_session_pinned_total") == pins


def test_failed_logins_are_counted_by_reason(proxy: RunningProxy) -> None:
    for user, password in ((APP_USER, "wrong"), (APP_USER, "also-wrong"), ("nobody", APP_PASSWORD)):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.url(user=user, password=password))
    families = scrape(proxy)
    failed = "dbmux_client_connections_setup_failed_auth_total"
    assert value(families, failed, reason="wrong_password") == 2
    assert value(families, failed, reason="unknown_user") == 1
    assert value(families, failed) == 3
    assert value(families, "dbmux_client_connections_setup_succeeded_total") == 0
    assert value(families, "dbmux_client_connections_received_total") == 3


def test_tls_logins_and_failed_handshakes_are_counted(start_proxy: Any, tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path)
    proxy = start_proxy(tls={**certificate, "min_version": "TLSv1.3"})
    with pg_connect(proxy, "verify-full", sslrootcert=ca_of(certificate)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
        assert sock.recv(1) == b"S"
        with pytest.raises(ssl.SSLError):  # TLS 1.2 at most: no common version
            unverified(ssl.TLSVersion.TLSv1_2).wrap_socket(sock, server_hostname="127.0.0.1")
    wait_until(
        lambda: value(scrape(proxy), "dbmux_client_tls_handshakes_failed_total") == 1,
        "the failed handshake counted",
    )
    families = scrape(proxy)
    assert value(families, "dbmux_client_tls_handshakes_total") == 1
    assert value(families, "dbmux_client_connections_tls_total") == 1
    assert value(families, "dbmux_client_connections_no_tls_total") == 0


def test_a_client_queued_for_the_only_connection_is_seen_waiting_and_its_wait_timed(
    start_proxy: Any,
) -> None:
    proxy = start_proxy(pool=POOL_OF_ONE)
    holder = psycopg.connect(proxy.url())
    holder.execute("SELECT 1")  # in a transaction: the only server connection is held
    done = threading.Event()

    def waiter() -> None:
        with psycopg.connect(proxy.url(), autocommit=True) as conn:
            conn.execute("SELECT 2")
        done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(
        lambda: value(scrape(proxy), "dbmux_database_connection_requests_waiting") == 1,
        "the second client queued",
    )
    held = 0.2
    threading.Event().wait(held)  # the wait goes on for at least this long
    assert value(scrape(proxy), "dbmux_database_connection_requests_longest_wait_seconds") >= held
    holder.commit()
    assert done.wait(30)
    thread.join(10)
    holder.close()
    families = scrape(proxy)
    borrow = "dbmux_database_connections_borrow_latency_seconds"
    assert value(families, "dbmux_database_connection_requests_waiting") == 0
    waited = value(families, borrow + "_count") - value(families, borrow + "_bucket", le="0.1")
    assert waited >= 1  # at least the queued borrow took longer than 0.1 s
    assert value(families, borrow + "_sum") >= held


def test_prepared_statements_are_counted_as_cache_hits_and_misses(start_proxy: Any) -> None:
    proxy = start_proxy(pool=POOL_OF_ONE)
    runs = 5
    with psycopg.connect(proxy.url(), autocommit=True) as conn:
        for i in range(runs):
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)
        families = scrape(proxy)
    assert value(families, "dbmux_prepared_statement_cache_misses_total") == 1
    assert value(families, "dbmux_prepared_statement_cache_hits_total") == runs
    assert value(families, "dbmux_prepared_statements") == 1


def test_a_mysql_workload_counts_the_same_way(start_my_proxy: Any) -> None:
    proxy: MyProxy = start_my_proxy()
    clients, requests = 3, 4
    for _ in range(clients):
        conn = proxy.connect()
        with conn.cursor() as cursor:
            for i in range(requests):
                cursor.execute("SELECT %s", (i,))
                assert cursor.fetchone() == (i,)
        conn.close()
    with pytest.raises(pymysql.err.OperationalError):
        proxy.connect(password="wrong")
    wait_until(
        lambda: value(scrape(proxy), "dbmux_client_connections_closed_total") == clients + 1,
        "every close counted",
    )
    families = scrape(proxy)
    at = {"proxy": "mytest", "endpoint": "default"}
    assert value(families, "dbmux_client_connections_setup_succeeded_total", **at) == clients
    assert (
        value(families, "dbmux_client_connections_setup_failed_auth_total", reason="wrong_password")
        == 1
    )
    requests_seen = value(families, "dbmux_query_requests_total", **at)
    assert requests_seen >= clients * requests  # (plus what the driver sends on its own)
    answered = value(families, "dbmux_query_response_latency_seconds_count", **at)
    assert 0 < answered <= requests_seen
    assert value(families, "dbmux_client_connections", **at) == 0


def test_an_endpoint_counts_its_own_clients(start_proxy: Any) -> None:
    proxy = start_proxy(endpoints=[{"name": "reports", "listen": "127.0.0.1:0"}])
    host, port = proxy.embedded.address(endpoint="reports")
    with psycopg.connect(
        host=host, port=port, user=APP_USER, password=APP_PASSWORD, dbname=APP_DB
    ) as conn:
        conn.execute("SELECT 1")
        families = scrape(proxy)
        assert value(families, "dbmux_client_connections", endpoint="reports") == 1
        assert value(families, "dbmux_client_connections", endpoint="default") == 0
    assert value(families, "dbmux_query_requests_total", endpoint="reports") >= 1
    assert value(families, "dbmux_query_requests_total", endpoint="default") == 0


def test_bucket_bounds_are_the_documented_ones() -> None:
    registry = Registry()
    ProxyMetrics(registry, "orders").borrow_latency.counts[0] += 1
    families = parse_exposition(registry.render())
    les = [
        dict(labels)["le"]
        for (sample, labels) in families["dbmux_database_connections_borrow_latency_seconds"][
            "samples"
        ]
        if sample.endswith("_bucket")
    ]
    assert [float(le) for le in les] == [*LATENCY_BUCKETS, math.inf]


def test_a_request_is_timed_from_its_arrival_and_from_its_sending() -> None:
    metrics = ProxyMetrics(Registry(), "orders")
    response, database = metrics.query_response_latency, metrics.query_database_response_latency
    at_once = time.perf_counter() - 0.2  # arrived and sent at once, 0.2 s ago
    metrics.request_latency.observe(at_once, at_once)
    assert response.counts == database.counts and response.count == 1
    assert response.sum == database.sum >= 0.2
    waited = time.perf_counter() - 2.0  # arrived 2 s ago, sent after a wait of about 2 s
    metrics.request_latency.observe(waited, waited + 1.99)
    assert response.count == database.count == 2
    assert response.sum - database.sum >= 1.99 - 1e-6
