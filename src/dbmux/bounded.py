"""Maps that clients can grow (memoized SET outcomes, learned spellings), bounded: every
client is hostile, so what one of them can add to a proxy-wide map has a cap, and the least
recently used entry makes room."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

# A SET statement longer than this is not memoized: real ones are short, and the memo's
# memory is its capacity times its longest key.
MEMO_TEXT_LIMIT = 4096


class LruDict(OrderedDict[K, V]):
    """A dict of at most `capacity` entries; `get` and assignment make an entry the most
    recently used, and an assignment past the capacity drops the least recently used."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)
