"""The shared connection budget: never more slots held than the limit, free slots granted in
order, a fair share for every busy worker, everything back when a worker dies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.workers.ledger import Grant, Ledger

KEY = ("orders", "writer")


def granted(result: tuple[list[Grant], list[Grant]]) -> dict[int, int]:
    return {g.worker: g.count for g in result[0]}


def shed(result: tuple[list[Grant], list[Grant]]) -> dict[int, int]:
    return {g.worker: g.count for g in result[1]}


def test_one_slot_in_all_until_a_worker_learns_the_limit() -> None:
    ledger = Ledger()
    assert granted(ledger.ask(0, KEY, 3)) == {0: 1}
    assert granted(ledger.ask(1, KEY, 2)) == {}
    # The first connection told its worker max_connections: the others are granted, the
    # waiting worker first up to its share.
    assert granted(ledger.learn(KEY, 10)) == {1: 2, 0: 2}
    assert ledger.held(KEY) == 5


def test_free_slots_go_to_the_workers_that_asked_in_order() -> None:
    ledger = Ledger()
    ledger.learn(KEY, 4)
    assert granted(ledger.ask(0, KEY, 3)) == {0: 3}
    assert granted(ledger.ask(1, KEY, 3)) == {1: 1}
    assert granted(ledger.give(0, KEY, 1)) == {1: 1}
    assert (ledger.held(KEY, 0), ledger.held(KEY, 1)) == (2, 2)


def test_a_worker_holding_the_whole_budget_is_asked_to_shed_down_to_its_share() -> None:
    ledger = Ledger()
    ledger.learn(KEY, 10)
    ledger.ask(0, KEY, 10)
    result = ledger.ask(1, KEY, 8)
    assert granted(result) == {}
    assert shed(result) == {0: 5}  # two workers want connections: 5 each
    for _ in range(5):
        ledger.give(0, KEY, 1)
    assert (ledger.held(KEY, 0), ledger.held(KEY, 1)) == (5, 5)
    # Asked once: a second request does not make worker 0 shed twice.
    assert shed(ledger.ask(1, KEY, 1)) == {}


def test_a_smaller_limit_asks_back_what_is_over_it() -> None:
    ledger = Ledger()
    ledger.learn(KEY, 10)
    ledger.ask(0, KEY, 6)
    ledger.ask(1, KEY, 4)
    assert sum(shed(ledger.learn(KEY, 6)).values()) == 4


def test_a_dead_workers_slots_go_to_who_waits() -> None:
    ledger = Ledger()
    ledger.learn(KEY, 4)
    ledger.ask(0, KEY, 4)
    ledger.ask(1, KEY, 4)
    assert granted(ledger.forget(0)) == {1: 4}
    assert ledger.held(KEY, 0) == 0
    # Its requests died with it.
    ledger.give(1, KEY, 4)
    assert ledger.held(KEY) == 0


operations = st.lists(
    st.tuples(
        st.sampled_from(["ask", "give", "forget", "learn"]),
        st.integers(0, 3),
        st.integers(1, 12),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_grants_never_take_the_budget_over_its_limit(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the workers ask, give and however they die, no grant takes the slots held
    over the limit (a lowered limit is only caught up by giving back), and a worker never
    holds a negative number of slots."""
    ledger = Ledger()
    held = {w: 0 for w in range(4)}
    for op, worker, count in ops:
        limit = ledger.limit(KEY)
        before = ledger.held(KEY)
        if op == "ask":
            result = ledger.ask(worker, KEY, count)
        elif op == "give":
            count = min(count, held[worker])  # a worker gives back only what it holds
            result = ledger.give(worker, KEY, count)
            held[worker] -= count
        elif op == "forget":
            result = ledger.forget(worker)
            held[worker] = 0
        else:
            result = ledger.learn(KEY, count)
            limit = count
        for grant in result[0]:
            held[grant.worker] += grant.count
        size = 1 if limit is None else limit
        if result[0]:
            assert ledger.held(KEY) <= max(size, before)
        assert all(ledger.held(KEY, w) == held[w] >= 0 for w in held)


def test_what_a_waiting_worker_lacks_beyond_fair_shares_is_looked_for_in_idle_slots() -> None:
    """Worker 1 holds one slot (idle, say) and is below its share; worker 0 waits at its
    share: no shed is due, so the ledger says what is lacking and who may have idle slots."""
    ledger = Ledger()
    ledger.learn(KEY, 5)
    ledger.ask(1, KEY, 1)
    ledger.ask(0, KEY, 4)
    result = ledger.ask(0, KEY, 1)
    assert granted(result) == {} and shed(result) == {}
    assert ledger.lacking(KEY) == (1, [1])
    assert granted(ledger.give(1, KEY, 1)) == {0: 1}
    assert ledger.lacking(KEY)[0] == 0
