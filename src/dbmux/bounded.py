"""Maps that clients can grow (memoized SET outcomes, learned spellings), bounded: every
client is hostile, so what one of them can add to a proxy-wide map has a cap, and the least
recently used entry makes room."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

# A SET statement longer than this is not memoized: real ones are short, and the memo's
# memory is its capacity times its longest key.
MEMO_TEXT_LIMIT = 4096


class LruDict(OrderedDict[K, V]):
    """A dict of at most `capacity` entries; `get` and assignment make an entry the most
    recently used, and an assignment past the capacity drops the least recently used."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    @overload
    def get(self, key: K, default: None = None, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V, /) -> V: ...
    @overload
    def get(self, key: K, default: T, /) -> V | T: ...
    def get(self, key: K, default: T | None = None, /) -> V | T | None:
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)


SET_RESULTS_CAPACITY = 10_000  # remembered SET statement outcomes per proxy (LRU)


class SetResults(LruDict[tuple[object, bytes], dict[str, str | None]]):
    """What SET statements leave in a session, by (scope, statement text): a SET whose
    outcome does not depend on the session (literal values, on its own) is read back once per
    scope (the engine's: pool key or variant) and its values reused after that."""

    def __init__(self, capacity: int = SET_RESULTS_CAPACITY) -> None:
        super().__init__(capacity)

    def outcome(self, scope: object, text: bytes) -> dict[str, str | None] | None:
        return self.get((scope, text))

    def remember(self, scope: object, text: bytes, values: dict[str, str | None]) -> None:
        if len(text) <= MEMO_TEXT_LIMIT:
            self[(scope, text)] = values
