"""The admission rules on their own: the bound on connections that have not proved a password
(oldest dropped first, never counted as logged in) and the slow-down of failed logins (free
failures, doubling delays, a cap, a window, a bounded memory)."""

from __future__ import annotations

from typing import Any

import pytest

from dbmux.auth.admission import Admission, LoginThrottle, Refusal
from dbmux.config import parse_config
from dbmux.metrics import ProxyMetrics, Registry


def proxy_config(**settings: Any):
    data = {
        "proxies": [
            {
                "name": "p",
                "engine_family": "POSTGRESQL",
                "listen": "127.0.0.1:0",
                "auth": [{"secret": "env:X"}],
                "target_group": {"targets": [{"host": "127.0.0.1", "port": 5432}]},
                **settings,
            }
        ]
    }
    return parse_config(data).proxies[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics(Registry(), "p")


def throttle(metrics: ProxyMetrics, cap: float = 5.0) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(cap, 15.0, metrics, clock), clock


# -- the slow-down of failed logins ------------------------------------------------------------


def test_five_failures_are_free_then_each_waits_twice_as_long_up_to_the_cap(metrics) -> None:
    """Without a delay a guesser tries as fast as the proxy answers; without the free ones a
    user who mistypes once would wait."""
    t, _ = throttle(metrics, cap=1.0)
    delays = [t.failed("app", "10.0.0.1") for _ in range(10)]
    assert delays == [0, 0, 0, 0, 0, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert metrics.client_logins_delayed.value == 5
    assert t.penalty(user="app") == t.penalty(address="10.0.0.1") == 1.0


def test_failures_count_per_user_and_per_address_apart(metrics) -> None:
    """A guesser spreading one user over many addresses is caught by the user's count, one
    trying many users from one address by the address's; neither slows a clean address."""
    t, _ = throttle(metrics)
    for i in range(8):
        t.failed("app", f"10.0.0.{i}")
    assert t.penalty(user="app") > 0
    assert t.penalty(address="10.0.0.1") == 0
    for i in range(8):
        t.failed(f"user{i}", "10.9.9.9")
    assert t.penalty(address="10.9.9.9") > 0
    assert t.before_check("10.0.0.77") == 0  # a clean address is checked at once


def test_a_throttled_address_gets_one_password_check_per_delay_however_many_it_opens(
    metrics,
) -> None:
    """Answers alone slowed down, a guesser would open many connections, hang up on each
    once its wrong password was not let in at once, and guess at the proxy's full speed."""
    t, clock = throttle(metrics, cap=1.0)
    for _ in range(10):
        t.failed("app", "10.9.9.9")
    turns = [t.before_check("10.9.9.9") for _ in range(20)]
    assert turns[:15] == [float(n) for n in range(15)]  # one per second
    assert turns[15:] == [15.0] * 5  # past the login deadline: no turn booked
    clock.now += 5
    assert t.before_check("10.9.9.9") == 10.0  # the booked turns still stand
    assert t.before_check("10.0.0.1") == 0


def test_a_quiet_window_forgets_the_failures(metrics) -> None:
    t, clock = throttle(metrics)
    for _ in range(8):
        t.failed("app", "10.0.0.1")
    clock.now += LoginThrottle.WINDOW - 1  # still within: continued guessing stays slow
    assert t.penalty(user="app") > 0
    assert t.failed("app", "10.0.0.1") > 0
    clock.now += LoginThrottle.WINDOW + 1
    assert t.penalty(user="app") == 0
    assert t.failed("app", "10.0.0.1") == 0  # counting starts afresh


def test_guessing_through_user_names_keeps_a_bounded_memory(metrics) -> None:
    """User names are the client's to choose: each one a key, the map would grow forever."""
    t, _ = throttle(metrics)
    for i in range(LoginThrottle.CAPACITY + 500):
        t.failed(f"nobody{i}", "10.0.0.1")
    assert len(t) <= LoginThrottle.CAPACITY
    assert t.penalty(address="10.0.0.1") > 0  # the address is used on every failure: kept


def test_a_guesser_cannot_spread_over_its_ipv6_network_or_grow_memory_with_long_names(
    metrics,
) -> None:
    """One host usually has a whole IPv6 /64: counted per address, it would guess forever;
    made-up user names of kilobytes each would make the throttle's own memory the target.
    IPv4 clients seen through a dual-stack listener must not be lumped into one /64."""
    t, _ = throttle(metrics)
    for i in range(8):
        t.failed(f"{'x' * 5000}{i}", f"2001:db8::{i:x}")
    assert t.penalty(address="2001:db8::ffff") > 0
    assert t.penalty(address="2001:db8:0:1::1") == 0
    assert t.penalty(user="x" * 5000) > 0  # the names share their first characters
    for i in range(8):
        t.failed("app", f"::ffff:10.0.0.{i}")
    assert t.penalty(address="10.0.0.9") == 0
    assert t.penalty(address="::ffff:10.0.0.1") == 0


def test_a_cap_of_zero_turns_the_slow_down_off(metrics) -> None:
    t, _ = throttle(metrics, cap=0)
    assert max(t.failed("app", "10.0.0.1") for _ in range(20)) == 0
    assert metrics.client_logins_delayed.value == 0


# -- the bound on pending logins ---------------------------------------------------------------


def test_the_oldest_pending_login_is_dropped_for_a_new_one(metrics) -> None:
    """Refusing the newest instead would let a flood of silent sockets keep every real client
    out for as long as the flood lasts."""
    clients: set[Any] = set()
    admission = Admission(clients, proxy_config(max_pending_logins=3), metrics)
    told: dict[str, Refusal] = {}
    for name in "abcde":
        clients.add(name)
        admission.enter(name, lambda refusal, name=name: told.__setitem__(name, refusal))
    assert sorted(told) == ["a", "b"]
    assert told["a"].hint == "max_pending_logins is 3"
    assert len(admission) == 3
    assert metrics.client_logins_dropped.value == 2


def test_max_client_connections_counts_only_clients_past_their_password(metrics) -> None:
    """Counting connections that have not logged in (or were dropped and are still closing)
    would let silent sockets take the slots of real clients."""
    clients: set[Any] = set()
    admission = Admission(
        clients, proxy_config(max_client_connections=2, max_pending_logins=2), metrics
    )
    for name in "abcd":  # c and d drop a and b, which have not closed yet
        clients.add(name)
        admission.enter(name, lambda refusal: None)
    assert admission.admit("c") is None
    assert admission.admit("d") is None
    clients.add("e")
    admission.enter("e", lambda refusal: None)
    refusal = admission.admit("e")
    assert refusal is not None and refusal.hint == "max_client_connections is 2"
    assert metrics.client_connections_refused.value == 1
    admission.leave("e")
    clients.discard("e")
    clients.discard("c")  # a logged-in client leaves: room for one more
    clients.add("f")
    admission.enter("f", lambda refusal: None)
    assert admission.refusal() is None
