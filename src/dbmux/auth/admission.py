"""Who may try to log in, and how fast: a bound on connections that have not proved a
password, and a slow-down of failed logins per user and per source address.

Both are engine-agnostic; each engine calls them from its login and words the refusals in
its own protocol.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbmux.config import ProxyConfig
    from dbmux.metrics import ProxyMetrics
    from dbmux.relay import FramedProtocol

MAX_USER_KEY = 128  # characters of a user name the throttle keeps


def source_address(transport: asyncio.BaseTransport | None) -> str:
    """The client's IP address, what failed logins are counted by ("" when unknown)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def local_address(transport: asyncio.BaseTransport | None) -> tuple[str, int]:
    """The address and port the client's connection arrived on (what a token names)."""
    local = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(local, tuple) and len(local) >= 2:
        return str(local[0]), int(local[1])
    return "", 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is turned away: what happened, and the setting that governs it."""

    text: str
    hint: str


class Admission:
    """Connections that have not proved a password yet ("pending"), oldest first, bounded
    by max_pending_logins apart from max_client_connections.

    At the bound a new connection drops the oldest pending one rather than being refused:
    a flood of silent sockets then ages out under real clients, who prove their password
    within milliseconds, instead of holding every slot until client_login_timeout.
    max_client_connections counts only the clients past their password."""

    def __init__(self, clients: set[Any], config: ProxyConfig, metrics: ProxyMetrics) -> None:
        self.clients = clients  # every open client connection of the proxy
        self.max_clients = config.max_client_connections
        self.max_pending = config.max_pending_logins
        self.metrics = metrics
        self._pending: OrderedDict[Any, Callable[[Refusal], None]] = OrderedDict()
        # Dropped, told so, and not closed yet: still in `clients`, never past a password.
        self._dropping: set[Any] = set()

    def __len__(self) -> int:
        """Connections waiting to prove a password (the dropped ones on their way out not
        included)."""
        return len(self._pending)

    def enter(self, client: Any, drop: Callable[[Refusal], None]) -> None:
        """A new connection starts its login; `drop` refuses it in its protocol and closes
        it, should it become the oldest of too many."""
        while len(self._pending) >= self.max_pending:
            oldest, refuse = self._pending.popitem(last=False)
            self._dropping.add(oldest)
            self.metrics.client_logins_dropped.value += 1
            refuse(
                Refusal(
                    "too many connections waiting to log in",
                    f"max_pending_logins is {self.max_pending}",
                )
            )
        self._pending[client] = drop

    def refusal(self) -> Refusal | None:
        """The refusal for one more client past its password, if max_client_connections
        are (counted as refused)."""
        logged_in = len(self.clients) - len(self._pending) - len(self._dropping)
        if logged_in < self.max_clients:
            return None
        self.metrics.client_connections_refused.value += 1
        return Refusal(
            "too many client connections to the proxy",
            f"max_client_connections is {self.max_clients}",
        )

    def admit(self, client: Any) -> Refusal | None:
        """`client` proved its password: it leaves the pending ones, unless the proxy is
        full (then the refusal to send)."""
        refusal = self.refusal()
        if refusal is None:
            self._pending.pop(client, None)
        return refusal

    def leave(self, client: Any) -> None:
        """The login ended (the connection closed, failed, or logged in)."""
        self._pending.pop(client, None)
        self._dropping.discard(client)


def _user_key(user: str) -> tuple[str, str]:
    # No database allows names this long; a guesser's made-up ones cost no more than this.
    return ("user", user[:MAX_USER_KEY])


def _address_key(address: str) -> tuple[str, str]:
    """IPv6 clients by their /64, which one host usually has whole (IPv4 ones mapped into
    IPv6 by a dual-stack listener by their IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ("address", address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ("address", str(ip.ipv4_mapped))
        return ("address", str(ipaddress.IPv6Network((ip, 64), strict=False)))
    return ("address", str(ip))


@dataclass(slots=True)
class _Failures:
    count: int
    last: float  # when the last failure came
    next_turn: float = 0.0  # when the next attempt may have its password checked


class LoginThrottle:
    """Failed logins counted per user and per source address. Past FREE failures of a key
    (with no quiet WINDOW in between) each further one waits FIRST_DELAY, doubling per
    failure up to `cap` seconds.

    A failure's answer waits for its user's and its address's count. Attempts from an
    address that failed too often are also let through to the password check one per
    delay, however many connections it opens at once: a guesser gains nothing by hanging
    up early to read a slow answer as "wrong". A good login from a clean address never
    waits, whatever others did to its user."""

    FREE = 5
    FIRST_DELAY = 0.1
    WINDOW = 60.0  # seconds without a failure after which a key starts afresh
    CAPACITY = 10_000  # keys remembered (user names are the client's to choose)

    def __init__(
        self, cap: float, horizon: float, metrics: ProxyMetrics, clock: Callable[[], float]
    ) -> None:
        self.cap = cap
        self.horizon = horizon  # client_login_timeout: no attempt waits longer than this
        self.metrics = metrics
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def penalty(self, *, user: str | None = None, address: str | None = None) -> float:
        """Seconds the next failure of this user (or from this address) waits."""
        if not self._failures:  # (no failure lately: every login, parsing no address)
            return 0.0
        key = _user_key(user) if user is not None else _address_key(address or "")
        failures = self._failures.get(key)
        if failures is None or self.clock() - failures.last > self.WINDOW:
            return 0.0
        return self._delay(failures.count)

    def _delay(self, count: int) -> float:
        if not self.cap or count <= self.FREE:
            return 0.0
        return min(self.cap, self.FIRST_DELAY * 2.0 ** min(count - self.FREE - 1, 32))

    def before_check(self, address: str) -> float:
        """Seconds to wait before checking a password from `address`: the next free turn
        of a throttled address. An attempt with no turn within `horizon` would reach its
        login deadline first: it waits that long without taking a turn, so a pile of
        connections cannot book the address's turns far ahead."""
        delay = self.penalty(address=address)
        if not delay:
            return 0.0
        failures = self._failures[_address_key(address)]
        now = self.clock()
        turn = max(now, failures.next_turn)
        if turn - now >= self.horizon:
            return self.horizon
        failures.next_turn = turn + delay
        return turn - now

    def failed(self, user: str, address: str) -> float:
        """Count a failed login; the seconds to wait before answering it."""
        delay = max(self._count(_user_key(user)), self._count(_address_key(address)))
        if delay:
            self.metrics.client_logins_delayed.value += 1
        return delay

    def _count(self, key: tuple[str, str]) -> float:
        now = self.clock()
        failures = self._failures.get(key)
        if failures is None or now - failures.last > self.WINDOW:
            failures = self._failures[key] = _Failures(0, now)
        failures.count += 1
        failures.last = now
        self._failures.move_to_end(key)
        if len(self._failures) > self.CAPACITY:
            self._failures.popitem(last=False)
        return self._delay(failures.count)

    async def sit_out(self, client: FramedProtocol, seconds: float) -> None:
        """Wait off the event loop's back, reading nothing meanwhile: what a client sends
        during the wait stays in the kernel's buffer, not the proxy's."""
        if seconds <= 0:
            return
        client.hold_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            client.release_reading()
