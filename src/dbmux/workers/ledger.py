"""One connection budget per target, shared by the worker processes: who may hold how many.

A worker holds a slot for every server connection it has open or is opening. It asks for
slots when its clients wait and no slot is free in its process, and gives a slot back when it
closes a connection nobody there waits for. The ledger grants what is free and queues the
rest in the order asked. When the budget is full and a worker waits, every worker holding
more than its fair share (the limit divided among the workers that want connections) is
asked to shed the excess: its idle connections close now, lent ones when they come back.
So the total never exceeds the limit, a worker that dies gives everything back at once, and
under contention every busy worker ends up with its share. Slots idle in a worker at or below
its share are asked for too (`lacking`: the supervisor asks such workers to close idle
connections), so a budget never sits idle in one process while another's clients wait.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

Key = Hashable  # what names one budget: (proxy, target) in practice


@dataclass
class Grant:
    """`count` slots of budget `key` for `worker` (or, shed: wanted back from it)."""

    worker: int
    key: Key
    count: int


@dataclass
class _Account:
    limit: int | None = None  # None until a worker learns it (then one slot in all)
    held: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    queue: deque[list[int]] = field(default_factory=deque)  # [worker, slots still wanted]
    shedding: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def size(self) -> int:
        return 1 if self.limit is None else self.limit

    @property
    def free(self) -> int:
        return max(0, self.size - sum(self.held.values()))

    def wanted(self, worker: int) -> int:
        return sum(n for w, n in self.queue if w == worker)

    @property
    def share(self) -> int:
        """A fair share: the limit divided among the workers holding or wanting slots."""
        workers = {w for w, n in self.held.items() if n} | {w for w, _ in self.queue}
        return max(1, self.size // max(1, len(workers)))


class Ledger:
    """The shared budgets, kept by the supervisor."""

    def __init__(self) -> None:
        self._accounts: dict[Key, _Account] = defaultdict(_Account)

    def held(self, key: Key, worker: int | None = None) -> int:
        """Slots of `key` held by `worker` (None: by all)."""
        account = self._accounts[key]
        return sum(account.held.values()) if worker is None else account.held[worker]

    def limit(self, key: Key) -> int | None:
        return self._accounts[key].limit

    def lacking(self, key: Key) -> tuple[int, list[int]]:
        """Slots waiting workers want and no grant or shed already under way will bring,
        and the other workers holding slots, the most first (who may have idle ones)."""
        account = self._accounts[key]
        waiting = {w for w, _ in account.queue}
        lacking = sum(n for _, n in account.queue) - sum(account.shedding.values())
        holders = sorted(
            (w for w, n in account.held.items() if n and w not in waiting),
            key=lambda w: -account.held[w],
        )
        return max(0, lacking), holders

    def learn(self, key: Key, limit: int) -> tuple[list[Grant], list[Grant]]:
        """A worker learned the budget's size; (grants, sheds) that follow from it."""
        account = self._accounts[key]
        account.limit = limit
        return self._settle(key, account)

    def ask(self, worker: int, key: Key, count: int) -> tuple[list[Grant], list[Grant]]:
        """`worker` wants `count` more slots: (grants now, slots asked back from others)."""
        account = self._accounts[key]
        account.queue.append([worker, count])
        return self._settle(key, account)

    def give(self, worker: int, key: Key, count: int) -> tuple[list[Grant], list[Grant]]:
        """`worker` no longer uses `count` slots."""
        account = self._accounts[key]
        account.held[worker] = max(0, account.held[worker] - count)
        account.shedding[worker] = max(0, account.shedding[worker] - count)
        return self._settle(key, account)

    def forget(self, worker: int) -> tuple[list[Grant], list[Grant]]:
        """`worker` is gone: its slots are free and its requests void."""
        grants: list[Grant] = []
        sheds: list[Grant] = []
        for key, account in self._accounts.items():
            account.held.pop(worker, None)
            account.shedding.pop(worker, None)
            account.queue = deque(entry for entry in account.queue if entry[0] != worker)
            more_grants, more_sheds = self._settle(key, account)
            grants += more_grants
            sheds += more_sheds
        return grants, sheds

    def _settle(self, key: Key, account: _Account) -> tuple[list[Grant], list[Grant]]:
        """Grant free slots: first to waiting workers below their share, then in the order
        asked; then ask back, from those above their share, what waiting workers lack."""
        grants: dict[int, int] = defaultdict(int)
        share = account.share
        for fair_first in (True, False):
            for entry in account.queue:
                worker, wanted = entry
                room = min(wanted, share - account.held[worker]) if fair_first else wanted
                given = min(room, account.free)
                if given > 0:
                    account.held[worker] += given
                    grants[worker] += given
                    entry[1] -= given
            account.queue = deque(entry for entry in account.queue if entry[1] > 0)
        return [Grant(w, key, n) for w, n in grants.items()], self._sheds(key, account)

    def _sheds(self, key: Key, account: _Account) -> list[Grant]:
        share = account.share
        held = account.held
        lacking = sum(
            min(account.wanted(w), max(0, share - held[w])) for w in {w for w, _ in account.queue}
        )
        needed = max(lacking, sum(held.values()) - account.size) - sum(account.shedding.values())
        sheds = []
        for worker, count in sorted(held.items(), key=lambda item: -item[1]):
            excess = count - account.shedding[worker] - share
            if needed <= 0:
                break
            if excess > 0:
                asked = min(excess, needed)
                account.shedding[worker] += asked
                needed -= asked
                sheds.append(Grant(worker, key, asked))
        return sheds
