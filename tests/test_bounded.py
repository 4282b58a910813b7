"""LruDict: the bound on proxy-wide maps that clients can grow."""

from __future__ import annotations

from dbmux.bounded import LruDict


def test_an_lru_dict_never_holds_more_than_its_capacity() -> None:
    """Without the bound, a client sending ever new texts grows the map for good."""
    lru: LruDict[int, int] = LruDict(3)
    for n in range(100):
        lru[n] = n
        assert len(lru) <= 3
    assert list(lru) == [97, 98, 99]


def test_a_read_keeps_an_entry_and_the_least_recently_used_goes() -> None:
    """Without refreshing on get, the entries every client uses would be the first dropped."""
    lru: LruDict[str, int] = LruDict(2)
    lru["a"], lru["b"] = 1, 2
    assert lru.get("a") == 1
    lru["c"] = 3
    assert dict(lru) == {"a": 1, "c": 3}
    assert lru.get("b") is None
    assert lru.get("b", 5) == 5
    lru["a"] = 4  # an update refreshes too
    lru["d"] = 5
    assert dict(lru) == {"a": 4, "d": 5}
