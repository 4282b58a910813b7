"""What an engine provides to the engine-agnostic core (pool, proxy, session lifecycle)."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbmux.auth.secrets import Credentials
    from dbmux.config import Target
    from dbmux.pool import Lender, Pool, PoolKey
    from dbmux.proxy import ProxyRuntime


class ServerError(Exception):
    """The database refused or failed something; `fields` carries the engine's error details."""

    def __init__(self, message: str, *, code: str = "", fields: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.fields = fields or {}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found: the instance's role and, for a replica asked for it, how far its
    replay is behind the primary in seconds (None: unknown, replication stopped, or not
    asked)."""

    writable: bool
    lag: float | None = None


class ServerConnection(ABC):
    """One authenticated connection to a database instance.

    The pool owns it while idle and lends it to one client session at a time. `close()` is
    idempotent and synchronous, and tells the pool exactly once, so the pool's counts never
    depend on when the transport finally reports the loss.
    """

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        # Set when the borrower left state on the connection that must be cleared first.
        self.needs_reset = False
        self.closed = False
        # Cancel requests sent to the database for this connection and not yet answered:
        # the connection is not lent again until they finish, so a late cancel cannot hit
        # another client's query.
        self.cancels_in_flight = 0
        self.cancels_done: asyncio.Event | None = None
        # The database's max_connections and the part of it reserved for superusers, when the
        # engine read them at connect.
        self.server_limit: tuple[int, int] | None = None
        # Which writer it was opened to (TargetGroup.generation): older ones are retired.
        self.generation = 0
        self.checked_at = self.created_at  # when it last proved alive (idle health check)
        self.lost_by_peer = False

    @abstractmethod
    async def reset(self) -> None:
        """Clear session state left by a pinned client; raise if the connection is unusable."""

    @abstractmethod
    async def ping(self) -> None:
        """One round trip that proves the server answers; raise if it does not."""

    @abstractmethod
    def disconnect(self, graceful: bool) -> None:
        """Drop the transport: with a goodbye message when the connection is known to be idle
        and healthy, without one when its state is unknown."""

    def close(self, graceful: bool = False) -> None:
        """Close and tell the pool, once."""
        if self.closed:
            return
        self.closed = True
        self.disconnect(graceful)
        if self.pool is not None:
            self.pool.forget(self)

    def closed_by_peer(self) -> None:
        """The server (or the network) ended the connection, not the proxy: forget it, and
        let the pool count it as trouble even when idle (a server closing its connections
        may be shutting down for a failover)."""
        if not self.closed:
            self.lost_by_peer = True
            ServerConnection.close(self)

    def begin_cancel(self) -> None:
        self.cancels_in_flight += 1
        if self.cancels_done is None or self.cancels_done.is_set():
            self.cancels_done = asyncio.Event()

    def end_cancel(self) -> None:
        self.cancels_in_flight -= 1
        if self.cancels_in_flight == 0 and self.cancels_done is not None:
            self.cancels_done.set()


class Engine(ABC):
    """One database engine family: its listener protocol and how it reaches servers."""

    # Makes a session's transactions read-only by default: a read-only endpoint's
    # connections to the writer (when it falls back to it) start with it.
    read_only_statement: str

    @abstractmethod
    def serve(self, proxy: ProxyRuntime) -> Callable[[], asyncio.Protocol]:
        """Build the protocol factory that serves client connections of this proxy."""

    @abstractmethod
    async def connect(
        self,
        target: Target,
        credentials: Credentials,
        key: PoolKey,
        *,
        session_init: tuple[str, ...],
        read_limit: bool,
    ) -> ServerConnection:
        """Open and authenticate a server connection for the pool `key` and run
        `session_init`, the statements every session starts with (again after each reset of
        the session); with `read_limit`, set server_limit."""

    @abstractmethod
    async def probe(self, target: Target, credentials: Credentials, *, lag: bool) -> ProbeResult:
        """Log in to `target` and tell whether it accepts writes and, with `lag`, how far a
        replica is behind (raise if it cannot be reached or refuses the login)."""


class ClientSession(ABC):
    """What the core needs of any engine's client connection."""

    last_active: float
    logged_in: bool
    transport: asyncio.Transport | None
    pool: Lender | None  # what it borrows from (the janitor keeps pools clients use)

    @abstractmethod
    def expire(self, reason: str) -> None:
        """Tell the client, in its protocol, why it is disconnected, then disconnect."""

    @property
    @abstractmethod
    def in_flight(self) -> bool:
        """Something the client asked for is not answered yet: a request at the server, a
        reply still being relayed, a wait for a server connection. A client is idle only
        when it is silent with nothing in flight (idle_client_timeout)."""

    @property
    def active(self) -> bool:
        """Not idle: something in flight, or the end of a reply the client has not read yet
        (the server has answered, but the proxy still holds bytes to write to the client)."""
        transport = self.transport
        return self.in_flight or (transport is not None and transport.get_write_buffer_size() > 0)
