"""dbmux's borrow wait read from its /metrics text as the bench does after an active-1000 run:
the histogram's buckets summed over its series, and quantiles as Prometheus's
histogram_quantile() estimates them. The text is dbmux's own rendering."""

from __future__ import annotations

import math

import pytest
from bench.prometheus import Estimate, buckets, quantile
from bench.rows import BORROW_LATENCY, borrow_wait

from dbmux.metrics import LATENCY_BUCKETS, ProxyMetrics, Registry, render


def scrape(*proxies: tuple[str, list[float], int]) -> str:
    """/metrics of a dbmux whose proxies saw these waits (s) and immediate borrows."""
    registry = Registry()
    for name, waits, immediate in proxies:
        histogram = ProxyMetrics(registry, name).borrow_latency
        for seconds in waits:
            histogram.observe(seconds)
        histogram.counts[0] += immediate  # as Pool.try_borrow counts one that did not wait
    return render([registry.snapshot()])


def test_buckets_are_cumulative_with_inf_last() -> None:
    cumulative = buckets(scrape(("bench", [0.003, 0.3, 0.3], 5)), BORROW_LATENCY)
    assert [b for b, _ in cumulative] == [*LATENCY_BUCKETS, math.inf]
    counts = dict(cumulative)
    assert counts[0.001] == 5
    assert counts[0.005] == 6
    assert counts[0.25] == 6
    assert counts[0.5] == 8
    assert counts[math.inf] == 8


def test_buckets_agree_with_prometheus_clients_parser() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    text = scrape(("bench", [0.02, 0.7, 3.0, 200.0], 10))
    (family,) = (f for f in parser.text_string_to_metric_families(text) if f.name == BORROW_LATENCY)
    theirs = sorted(
        (float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")
    )
    assert buckets(text, BORROW_LATENCY) == theirs


def test_several_proxies_add_up() -> None:
    text = scrape(("orders", [0.3], 1), ("billing", [0.3, 0.03], 0))
    assert dict(buckets(text, BORROW_LATENCY))[math.inf] == 4


def test_quantile_interpolates_within_the_bucket() -> None:
    # 90 immediate borrows and 10 waits in (0.25, 0.5]: the median is in the first bucket,
    # the 99th observation nine tenths into (0.25, 0.5].
    cumulative = buckets(scrape(("bench", [0.3] * 10, 90)), BORROW_LATENCY)
    assert quantile(0.5, cumulative) == Estimate(pytest.approx(0.001 * 50 / 90), 0.0, 0.001)
    assert quantile(0.99, cumulative) == Estimate(pytest.approx(0.475), 0.25, 0.5)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    cumulative = buckets(scrape(("bench", [500.0], 0)), BORROW_LATENCY)
    assert quantile(0.99, cumulative) == Estimate(120.0, 120.0, math.inf)


def test_no_observations_no_quantile() -> None:
    assert quantile(0.99, buckets(scrape(), BORROW_LATENCY)) is None
    assert quantile(0.99, buckets("", BORROW_LATENCY)) is None


def test_borrow_wait_in_ms_with_the_bucket_of_each_quantile() -> None:
    wait = borrow_wait(scrape(("bench", [0.3] * 10, 90)))
    assert wait == {
        "borrows": 100,
        "p50_ms": pytest.approx(50 / 90, abs=0.001),
        "p50_bucket_ms": [0.0, 1.0],
        "p99_ms": pytest.approx(475.0),
        "p99_bucket_ms": [250.0, 500.0],
    }


def test_borrow_wait_of_a_dbmux_that_lent_nothing() -> None:
    assert borrow_wait(scrape(("bench", [], 0))) is None
