"""pgbench's per-transaction log (--log), read for the fairness table: transactions per client
(every client counting, a starved one with 0) and latency percentiles; and its per-second
progress (-P 1), read for the round-trip table's quietest second. The lines are pgbench 15's
own, captured from real runs."""

from __future__ import annotations

import pytest
from bench.pgbench import parse, read_log

# pgbench -f select1.sql -c 3 -j 1 -t 3 --log: client_id transaction_no latency_us script_no
# epoch_s epoch_us.
THREE_CLIENTS = """\
1 1 240 0 1796592514 545028
2 1 230 0 1796592514 545045
0 1 479 0 1796592514 545249
1 2 208 0 1796592514 545255
1 3 73 0 1796592514 545339
0 2 204 0 1796592514 545460
2 2 395 0 1796592514 545464
0 3 0 0 1796592514 545502
2 3 2293 0 1796592514 547818
"""

# Four clients of a REPEATABLE READ increment of one row, -t 5: the serialization failures
# are logged with `failed` in place of the latency.
WITH_FAILURES = """\
0 1 1502 0 1796592519 666093
0 2 423 0 1796592519 666526
0 3 324 0 1796592519 666853
0 4 318 0 1796592519 667174
0 5 1185 0 1796592519 668362
1 1 failed 0 1796592519 670047
2 1 failed 0 1796592519 670403
3 1 failed 0 1796592519 670934
1 2 1181 0 1796592519 671230
2 2 failed 0 1796592519 671440
3 2 failed 0 1796592519 671654
1 3 1026 0 1796592519 672290
2 3 failed 0 1796592519 672333
2 4 failed 0 1796592519 672943
1 4 651 0 1796592519 672984
3 3 failed 0 1796592519 672989
2 5 790 0 1796592519 673735
1 5 failed 0 1796592519 676203
3 4 failed 0 1796592519 676234
3 5 521 0 1796592519 676756
"""

# -R 200000 -L 0.05: a seventh field (schedule lag), and `skipped` for transactions that were
# already late when they were due.
RATE_LIMITED = """\
0 1 413 0 1796592514 617743 11
0 2 skipped 0 1796592514 617759 0
0 3 skipped 0 1796592514 617760 0
0 84 137 0 1796592514 617852 44
1 1 1061 0 1796592514 618394 24
1 2 skipped 0 1796592514 618461 0
1 13 44 0 1796592514 618617 44
"""


def test_counts_every_clients_transactions() -> None:
    result = read_log(THREE_CLIENTS.splitlines(), clients=3)
    assert result["tx_per_client"] == {"min": 3, "median": 3, "max": 3}
    assert result["clients_served"] == 3


def test_a_client_without_a_transaction_counts_zero() -> None:
    result = read_log(THREE_CLIENTS.splitlines(), clients=4)
    assert result["tx_per_client"] == {"min": 0, "median": 3, "max": 3}
    assert result["clients_served"] == 3


def test_failed_transactions_are_not_served_ones() -> None:
    result = read_log(WITH_FAILURES.splitlines(), clients=4)
    assert result["tx_per_client"] == {"min": 1, "median": 2, "max": 5}
    assert result["clients_served"] == 4


def test_skipped_transactions_are_not_counted_and_the_lag_field_is_ignored() -> None:
    result = read_log(RATE_LIMITED.splitlines(), clients=2)
    assert result["tx_per_client"] == {"min": 2, "median": 2, "max": 2}
    assert result["latency_p50_ms"] == pytest.approx((137 + 413) / 2000)


def test_latency_percentiles_of_the_completed_transactions_in_ms() -> None:
    result = read_log(WITH_FAILURES.splitlines(), clients=4)
    # The ten latencies, sorted: 318 324 423 521 651 790 1026 1181 1185 1502 µs.
    assert result["latency_p50_ms"] == pytest.approx((651 + 790) / 2000, abs=0.001)
    assert result["latency_p99_ms"] == pytest.approx(
        (1185 + 0.91 * (1502 - 1185)) / 1000, abs=0.001
    )


def test_an_empty_log_of_a_run_that_served_nobody() -> None:
    result = read_log([], clients=2)
    assert result["tx_per_client"] == {"min": 0, "median": 0, "max": 0}
    assert result["clients_served"] == 0
    assert "latency_p99_ms" not in result


# pgbench -f select1.sql -c 1 -j 1 -T 3 -P 1: the summary on stdout, the progress on stderr.
PROGRESS_STDOUT = """\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: s.sql
scaling factor: 1
query mode: simple
number of clients: 1
number of threads: 1
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 50053
number of failed transactions: 0 (0.000%)
latency average = 0.056 ms
latency stddev = 0.202 ms
initial connection time = 9.536 ms
tps = 16736.903949 (without initial connection time)
"""
PROGRESS_STDERR = """\
progress: 1.0 s, 9747.8 tps, lat 0.100 ms stddev 0.183, 0 failed
progress: 2.0 s, 18290.5 tps, lat 0.049 ms stddev 0.218, 0 failed
progress: 3.0 s, 22015.6 tps, lat 0.041 ms stddev 0.194, 0 failed
"""


def test_the_quietest_second_is_the_lowest_per_second_latency() -> None:
    numbers = parse(PROGRESS_STDOUT, PROGRESS_STDERR)
    assert numbers["latency_best_second_ms"] == 0.041
    assert numbers["latency_ms"] == 0.056


def test_progress_lines_are_not_errors() -> None:
    assert parse(PROGRESS_STDOUT, PROGRESS_STDERR)["errors"] == {}


def test_without_progress_no_quietest_second() -> None:
    assert parse(PROGRESS_STDOUT, "")["latency_best_second_ms"] is None
