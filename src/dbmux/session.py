"""The engine-agnostic client session: what happens to a client connection of any engine,
from accept to close.

It owns the lifecycle both engines share: the proxy's count of clients, the login deadline
and the bound on pending logins, attaching and detaching a server connection, pinning (with
its reason), the refusal of a request that got no server connection, expiry, and the ONE
place a server connection is given back (`give_back`: reset, release or close). An engine's
session subclasses it and supplies the protocol: its login conversation, its words for each
failure, what a closing client leaves on its server connection, and the relay itself.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl
import time
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

from dbmux.auth.admission import Refusal, local_address
from dbmux.auth.directory import Method, User
from dbmux.auth.tokens import RefusalReason, TokenRefused, looks_like_token
from dbmux.config import IamAuth
from dbmux.engines.base import (
    WORKER_ID_SPAN,
    Borrower,
    BorrowTimeout,
    Lender,
    ProxyRuntime,
    ServerError,
)
from dbmux.redact import redact
from dbmux.relay import ClientEnd, ConnectionClosed

log = logging.getLogger("dbmux.session")
# debug_logging's records: each statement, its answer, pin decisions (config: debug_logging).
debug_log = logging.getLogger("dbmux.debug")
# Client ids, unique in the process: what logs and the admin API name a client by.
_client_ids = itertools.count(1)


class Failure(Enum):
    """What went wrong, for the engine to word in its protocol."""

    TOO_MANY_CLIENTS = "too many clients"  # max_client_connections, max_pending_logins
    LOGIN_TIMEOUT = "login timeout"  # client_login_timeout
    PROTOCOL_VIOLATION = "protocol violation"  # the client sent what the protocol forbids
    INTERNAL = "internal error"  # a bug in the proxy, costing this client only
    TERMINATED = "terminated"  # idle_client_timeout
    SHUTDOWN = "shutdown"  # the proxy drains (SIGTERM, a reload that removed its listener)
    BORROW_TIMEOUT = "borrow timeout"  # connection_borrow_timeout (the request fails)
    NO_SERVER = "no server connection"  # one could not be opened (the request fails)


class Leftover(Enum):
    """What a client leaves on the server connection it gives back."""

    NOTHING = "nothing"  # lend it again as it is
    TRANSACTION = "transaction"  # an open transaction: roll back first
    SESSION = "session"  # session state too (a pinned session): clear it all first
    UNKNOWN = "unknown"  # stopped mid-request: its state is unknown, close it
    RUNNING = "running"  # a request still runs there: cancel it, and close


_NOTHING, _SESSION, _UNKNOWN, _RUNNING = (
    Leftover.NOTHING,
    Leftover.SESSION,
    Leftover.UNKNOWN,
    Leftover.RUNNING,
)


class ClientSession(ClientEnd, Borrower):
    """One client connection of any engine."""

    __slots__ = (
        "_latency",
        "_task",
        "_token_refused",
        "attached_at",
        "connected_at",
        "debug_since",
        "id",
        "last_active",
        "logged_in",
        "pin_reason",
        "pool",
        "request_at",
        "runtime",
        "sent_at",
        "server",
        "user",
        "waiting",
        "watched",
    )
    # The engine's exception for malformed client input (its wire.ProtocolViolation).
    protocol_violation: type[Exception]

    def __init__(self, runtime: ProxyRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.server: Any = None  # the engine's server connection, while it has one
        self.pool: Lender | None = None  # what it borrows from, once logged in
        self.user = ""
        self.pin_reason: str | None = None  # why it keeps its server connection, if it does
        self.waiting = False  # queued in the pool for a server connection
        self.logged_in = False
        self.last_active = runtime.clock.now
        self._task: asyncio.Task[None] | None = None  # the login, or a round trip of its own
        self.id = runtime.worker * WORKER_ID_SPAN + next(_client_ids)
        self.connected_at = time.monotonic()
        # When it got its current server connection (the coarse clock: the age of what it
        # runs there, to a second, for the admin API).
        self.attached_at = 0.0
        # Why the last password check failed, when the proof was an auth token.
        self._token_refused = False
        # perf_counter() when the request being answered arrived, and when it went to the
        # database (the latency histograms; only while runtime.metrics.timed).
        self.request_at = 0.0
        self.sent_at = 0.0
        self._latency = runtime.metrics.request_latency
        # The engine calls `answered` after each reply while this is set: debug_logging
        # times a request, or a drain waits for the end of a transaction.
        self.watched = False
        self.debug_since = 0.0  # debug_logging: when the request being answered was sent

    # -- what each engine supplies ------------------------------------------------------------

    @abstractmethod
    async def log_in(self, deadline: asyncio.TimerHandle) -> None:
        """The engine's login conversation, refusals in its own words included; on success
        it sets `pool` and `logged_in` and starts relaying. `deadline` is
        client_login_timeout's timer, for `admit` to cancel once the password is proved."""

    @abstractmethod
    def fail(self, failure: Failure, text: str, hint: str = "") -> None:
        """Tell the client why it is disconnected, in its protocol, where it can read it
        (at a message boundary), and close."""

    @abstractmethod
    def refuse_request(
        self, failure: Failure, text: str, hint: str = "", error: ServerError | None = None
    ) -> None:
        """Answer the request waiting for a server connection with an error (the
        database's `error`, if it gave one); the client keeps its connection."""

    @abstractmethod
    def leftover(self, server: Any) -> Leftover:
        """What this client, closing now, leaves on `server`."""

    def cancel(self, server: Any) -> None:
        """Stop what `server` runs for this client (Leftover.RUNNING); by default the close
        that follows is all there is."""

    def unregister(self) -> None:
        """The client is gone: drop it from the engine's own registries (cancel keys,
        connection ids)."""

    @property
    @abstractmethod
    def in_transaction(self) -> bool:
        """A transaction is open (or a batch is half sent): the client is in the middle of
        something a drain lets it finish (and DatabaseConnectionsCurrentlyInTransaction
        counts it)."""

    @property
    @abstractmethod
    def in_flight(self) -> bool:
        """Something the client asked for is not answered yet: a request at the server, a
        reply still being relayed, a wait for a server connection. A client is idle only
        when it is silent with nothing in flight (idle_client_timeout)."""

    # -- lifecycle ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        metrics = self.runtime.metrics
        metrics.client_connections_received.value += 1
        metrics.client_connections.value += 1
        self.runtime.clients.add(self)
        # The login lets go of its task itself, at its end (one callback less than run_own).
        self._task = asyncio.get_running_loop().create_task(self._login())

    def run_own(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` as this client's conversation of its own (the login, or a round trip
        the proxy makes for it), cancelled if the client leaves. Let go of once done: tens
        of thousands of idle clients must not each keep a finished task and its coroutine."""
        task = asyncio.get_running_loop().create_task(coro)
        self._task = task
        task.add_done_callback(self._forget_task)
        return task

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None

    async def _login(self) -> None:
        runtime = self.runtime
        limit = runtime.config.client_login_timeout
        runtime.admission.enter(
            self, lambda refusal: self.fail(Failure.TOO_MANY_CLIENTS, refusal.text, refusal.hint)
        )
        task = self._task
        assert task is not None  # (this coroutine's, from connection_made)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        # A timer of the loop's, not asyncio.timeout's context manager: a connect storm pays
        # for one per login.
        deadline = asyncio.get_running_loop().call_later(limit, expire)
        try:
            await self.log_in(deadline)
        except asyncio.CancelledError:
            if not expired:
                raise
            self.fail(
                Failure.LOGIN_TIMEOUT, "login took too long", f"client_login_timeout is {limit:g} s"
            )
        except ConnectionClosed:
            self.close_transport()
        except self.protocol_violation as error:
            runtime.metrics.client_protocol_errors.value += 1
            self.fail(Failure.PROTOCOL_VIOLATION, str(error))
        except Exception:  # a bug must cost this client only, and say so
            log.exception("login of a client failed unexpectedly")
            self.fail(Failure.INTERNAL, "internal error in the proxy during login")
        finally:
            deadline.cancel()
            runtime.admission.leave(self)
            if self._task is task:
                self._task = None

    async def check_password(self, name: str, check: Callable[[User], bool]) -> bool:
        """`check` the proof a client sent against user `name`'s passwords (the current
        one, and the pending one during a rotation); if it fits none, once more after the
        secrets are read again, in case the client has a password the proxy has not seen
        yet. A name no entry holds never matches."""
        users = self.runtime.users
        user = users.get(name)
        if user is not None and check(user):
            return True
        if not await users.reread_after_failure():
            return False
        user = users.get(name)
        return user is not None and check(user)

    async def check_cleartext(self, name: str, method: Method, typed: bytes) -> bool:
        """A password the client sent as it typed it (over TLS: the engine asks for one
        only there), for a user whose `iam_auth` takes signed tokens: a token is checked
        against the connection's own address and port and the user; anything else is a
        password, accepted only with iam_auth ENABLED. Refused tokens are counted by
        reason, never told to the client."""
        text = typed.decode("latin-1")  # a token is ASCII; anything else is MALFORMED
        tokens = self.runtime.tokens
        if tokens is not None and looks_like_token(text):
            host, port = local_address(self.transport)
            try:
                tokens.verify(text, host=host, port=port, user=name)
            except TokenRefused as refused:
                self.runtime.metrics.count_token_refusal(refused.reason.value)
                self._token_refused = True
                return False
            return self.runtime.users.get(name) is not None  # who has no secret cannot log in
        if method.iam_auth is IamAuth.REQUIRED:
            self.runtime.metrics.count_token_refusal(RefusalReason.MALFORMED.value)
            self._token_refused = True
            return False
        return await self.check_password(
            name, lambda user: any(hmac.compare_digest(p.encode(), typed) for p in user.passwords)
        )

    def refuse_token_without_tls(self) -> None:
        """A user who must log in with a token is on plaintext: it is refused before it
        sends one (a token seen on the way is as good as a password for 15 minutes)."""
        self.runtime.metrics.count_token_refusal(RefusalReason.NO_TLS.value)
        self.runtime.metrics.count_auth_failure("tls_required")

    def auth_failed(self, name: str) -> None:
        """Count a refused proof by reason (ClientConnectionsSetupFailedAuth): a refused
        token, a name no auth entry holds, or a wrong password. The client is told the same
        in every case; only the metrics tell them apart."""
        if self._token_refused:
            reason = "token_refused"
        elif self.runtime.users.get(name) is None:
            reason = "unknown_user"
        else:
            reason = "wrong_password"
        self.runtime.metrics.count_auth_failure(reason)

    async def start_tls(
        self,
        context: ssl.SSLContext,
        timeout: float,
        *,
        server_hostname: str | None = None,
        received: bytes = b"",
    ) -> None:
        """ClientEnd.start_tls, counted (ClientTLSHandshakes, ClientTLSHandshakesFailed)."""
        metrics = self.runtime.metrics
        try:
            await super().start_tls(
                context, timeout, server_hostname=server_hostname, received=received
            )
        except BaseException:
            metrics.client_tls_handshakes_failed.value += 1
            raise
        metrics.client_tls_handshakes.value += 1

    def admit(self, deadline: asyncio.TimerHandle) -> Refusal | None:
        """The password is proved: the client counts against max_client_connections from now
        on (checked again: others may have logged in meanwhile) and, if it fits, is no
        longer a pending login bound by client_login_timeout."""
        refusal = self.runtime.admission.admit(self)
        if refusal is None:
            deadline.cancel()
        return refusal

    def start_serving(self) -> None:
        """The login is done: the relay takes over, starting with what the client sent
        meanwhile."""
        metrics = self.runtime.metrics
        metrics.client_connections_setup_succeeded.value += 1
        (
            metrics.client_connections_tls if self.tls else metrics.client_connections_no_tls
        ).value += 1
        self.logged_in = True
        self.last_active = self.runtime.clock.now
        leftover = self.start_relaying()
        if leftover:
            self.relay(leftover)

    def on_closed(self, exc: Exception | None) -> None:
        runtime = self.runtime
        runtime.clients.discard(self)
        runtime.metrics.client_connections_closed.value += 1
        runtime.metrics.client_connections.value -= 1
        self.unregister()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.waiting and self.pool is not None:
            self.pool.withdraw(self)
        if self.server is not None:
            self.give_back(self.leftover(self.server))

    def expire(self, reason: str) -> None:
        """idle_client_timeout, or an operator's close (admin API)."""
        self.fail(Failure.TERMINATED, f"terminating connection: {reason}")

    def shut_down(self, reason: str) -> None:
        """The proxy drains: tell the client in its engine's words for a server shutting
        down, so that it reconnects (to another process, after a restart)."""
        self.fail(Failure.SHUTDOWN, f"terminating connection: {reason}", "reconnect to go on")

    @property
    def between_transactions(self) -> bool:
        """Logged in, nothing in flight and no transaction open: ending it now costs the
        client a reconnect, never a transaction (what it has not read yet is read first)."""
        return (
            self.logged_in
            and not self.in_flight
            and (self.server is None or not self.in_transaction)
        )

    def answered(self) -> None:
        """A reply ended, for a `watched` client: time it (debug_logging); during a drain,
        end the client once the server connection is given back, if it is between
        transactions then."""
        if self.debug_since:
            self.debug_answered()
        self.watched = self.runtime.draining
        if self.watched:
            asyncio.get_running_loop().call_soon(self.leave_if_between_transactions)

    def leave_if_between_transactions(self) -> None:
        """A drain's look at this client: shut down if it is between transactions."""
        if not self.is_closed and self.between_transactions:
            self.shut_down("the proxy is shutting down")

    def pin(self, reason: str) -> None:
        """Keep this server connection for the rest of the session, because of `reason`."""
        self.pin_reason = reason
        self.runtime.metrics.count_pin(reason)
        if self.runtime.config.debug_logging:
            debug_log.info(
                "client %d pinned to its server connection: %s",
                self.id,
                reason,
                extra={**self.debug_fields(), "pin_reason": reason},
            )

    # -- debug_logging (callers check config.debug_logging first: the one cost when off) ---

    def debug_fields(self) -> dict[str, Any]:
        """Who the client is and which server connection it holds, for a debug record."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        server = self.server
        return {
            "client": self.id,
            "address": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            "user": self.user,
            "server": server.label if server is not None else None,
            "pinned": self.pin_reason,
        }

    def debug_statement(self, text: bytes) -> None:
        """A statement the client sent (literals of password clauses hidden)."""
        if not self.debug_since:
            self.debug_since = time.monotonic()
            self.watched = True
        fields = {**self.debug_fields(), "statement": redact(text)}
        debug_log.info("client %d statement", self.id, extra=fields)

    def debug_answered(self) -> None:
        """The server answered what was sent since `debug_since`."""
        duration = (time.monotonic() - self.debug_since) * 1000
        self.debug_since = 0.0
        debug_log.info(
            "client %d answered in %.3f ms",
            self.id,
            duration,
            extra={**self.debug_fields(), "duration_ms": round(duration, 3)},
        )

    # -- latency (QueryResponseLatency, QueryDatabaseResponseLatency) --------------------------

    def record_latency(self) -> None:
        """Everything the client asked is answered: time it, from `request_at` (its arrival)
        and `sent_at` (its sending to the database). The engine sets both when a request
        arrives with nothing else in flight, `sent_at` again when it had to wait for a
        server connection, and calls this only while `runtime.metrics.timed`."""
        self._latency.observe(self.request_at, self.sent_at)

    # -- the server connection ----------------------------------------------------------------

    def attach(self, server: Any) -> None:
        self.server = server
        server.client = self
        self.attached_at = self.runtime.clock.now

    def detach(self) -> Any:
        """Part from the server connection (if any) and return it."""
        server = self.server
        if server is None:
            return None
        if self._holding_server or self._held_by_server:
            self.drop_holds(server)
        server.client = None
        self.server = None
        return server

    def give_back(self, left: Leftover = Leftover.NOTHING, server: Any = None) -> None:
        """The one place a server connection leaves its client: detached (when it is the
        attached one), then reset and released, or closed when its state is unknown."""
        if server is None or server is self.server:
            server = self.detach()
            if server is None:
                return
        if left is not _NOTHING:  # (members read once: Enum attribute access is slow)
            if left is _RUNNING:
                self.cancel(server)
            if left is _RUNNING or left is _UNKNOWN:
                server.close()
                return
            server.needs_reset = True
            server.discard_needed = left is _SESSION
        pool = server.pool
        if pool is not None:
            pool.release(server)
        else:
            server.close()

    def on_borrow_failed(self, error: Exception) -> None:
        self.waiting = False
        pool = self.pool
        if isinstance(error, BorrowTimeout) and pool is not None:
            self.runtime.metrics.borrow_timeouts.value += 1
            text = "timed out waiting for a database connection"
            self.refuse_request(Failure.BORROW_TIMEOUT, text, pool.borrow_hint())
        elif isinstance(error, ServerError):
            self.refuse_request(Failure.NO_SERVER, str(error), error=error)
        else:
            self.refuse_request(Failure.NO_SERVER, f"no database connection: {error}")

    @property
    def state(self) -> str:
        """What the client is doing, as an operator sees it (PgBouncer's SHOW CLIENTS): logging
        in, idle, waiting for a server connection, active on a borrowed one, or pinned to one
        (with the reason)."""
        if not self.logged_in:
            return "login"
        if self.pin_reason is not None:
            return f"pinned ({self.pin_reason})"
        if self.waiting:
            return "waiting"
        return "active" if self.server is not None else "idle"

    @property
    def active(self) -> bool:
        """Not idle: something in flight, or the end of a reply the client has not read yet
        (the server has answered, but the proxy still holds bytes to write to the client)."""
        transport = self.transport
        return self.in_flight or (transport is not None and transport.get_write_buffer_size() > 0)
