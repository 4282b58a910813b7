"""The whole interface between the engine-agnostic core and an engine.

What an engine implements (`Engine`, `ServerConnection`; its client sessions extend
`dbmux.session.ClientSession`) and everything of the core it sees: the runtime of one proxy
(`ProxyRuntime`), what sessions borrow from (`Lender`, `Pools`), and the failover interface
(`Failover`). An engine imports nothing else from the core; the core never imports an engine
(the registry in `dbmux.engines` names them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

from dbmux.relay import ConnectionClosed, TlsHandshakeFailed

if TYPE_CHECKING:
    from dbmux.auth.admission import Admission, LoginThrottle
    from dbmux.auth.directory import UserDirectory
    from dbmux.auth.secrets import Credentials
    from dbmux.auth.tls import ClientSideTls, TargetSideTls
    from dbmux.auth.tokens import TokenVerifier
    from dbmux.config import ClientPasswordAuthType, ProxyConfig, Target
    from dbmux.metrics import ProxyMetrics
    from dbmux.session import ClientSession


CONNECT_TIMEOUT = 10.0  # seconds to open and log in a server connection
_server_ids = itertools.count(1)  # server connection ids, unique in the process

# With several worker processes (config: workers), the ids clients are given to name their
# session later (PostgreSQL BackendKeyData process ids, MySQL connection ids) carry the index
# of the worker that owns the client in bits 24-29, so that a cancel request or KILL reaching
# another worker is forwarded to the owner. Bit 31 stays clear: drivers read them as int32.
WORKER_SHIFT = 24
MAX_WORKERS = 64
CLIENT_ID_BITS = (1 << WORKER_SHIFT) - 1  # the part of an id a worker chooses


# Client and server connection ids (the admin API's) are unique across workers: worker N's
# start at N * this.
WORKER_ID_SPAN = 1_000_000_000


def number_servers_for(worker: int) -> None:
    """Server connection ids of this process start where worker `worker`'s do."""
    global _server_ids
    _server_ids = itertools.count(worker * WORKER_ID_SPAN + 1)


def owner_of(client_id: int) -> int:
    """The worker that gave a client `client_id` (see WORKER_SHIFT)."""
    return (client_id >> WORKER_SHIFT) % MAX_WORKERS


class Peers(ABC):
    """The other worker processes of this dbmux, for requests about clients they own."""

    index: int  # this worker's

    @abstractmethod
    def tell(self, worker: int, proxy: str, request: tuple[Any, ...]) -> None:
        """Hand `request` to the engine of proxy `proxy` in `worker` (Engine.answer_peer),
        expecting no answer."""

    @abstractmethod
    async def ask(self, worker: int, proxy: str, request: tuple[Any, ...]) -> Any:
        """The answer of `worker`'s Engine.answer_peer to `request`; PeerUnavailable if that
        worker cannot answer."""

    @abstractmethod
    def writer_changed(self, proxy: str) -> None:
        """The writer of `proxy` changed as this worker sees it: the others probe now."""


class PeerUnavailable(Exception):
    """The worker a request was for is gone (it is being restarted) or did not answer."""


class ErrorKind(Enum):
    """What a database error means to the core (each engine maps its own codes)."""

    AUTH = "auth"  # the login itself was refused
    BUSY = "busy"  # no connection slot left on the instance
    GONE = "gone"  # unreachable, shutting down or starting: it may have failed over
    OTHER = "other"


class ServerError(Exception):
    """The database refused or failed something; `fields` carries the engine's error details."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        fields: dict[str, Any] | None = None,
        kind: ErrorKind | None = None,
    ):
        """`kind`: what the error means to the core when it comes from the core itself (no
        engine code to classify)."""
        super().__init__(message)
        self.code = code
        self.fields = fields or {}
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found: the instance's role and, for a replica asked for it, how far its
    replay is behind the primary in seconds (None: unknown, replication stopped, or not
    asked)."""

    writable: bool
    lag: float | None = None


class Home(Protocol):
    """The pool a server connection belongs to."""

    def release(self, conn: ServerConnection) -> None: ...

    def remove(self, conn: ServerConnection) -> None: ...


class ServerConnection(ABC):
    """One authenticated connection to a database instance.

    The pool owns it while idle and lends it to one client session at a time. `close()` is
    idempotent and synchronous, and tells the pool exactly once, so the pool's counts never
    depend on when the transport finally reports the loss.
    """

    def __init__(self) -> None:
        self.id = next(_server_ids)  # what the admin API names it by
        self.pool: Home | None = None
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        # Set when the borrower left state on the connection that must be cleared first:
        # an open transaction (needs_reset), or session state too (discard_needed).
        self.needs_reset = False
        self.discard_needed = False
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
        self.session_init: tuple[str, ...] = ()  # run at connect and after each reset

    @abstractmethod
    async def read_server_limit(self) -> None:
        """Set server_limit from the database's own settings."""

    @abstractmethod
    async def start_session(self) -> None:
        """Run session_init (a new session, or one just reset)."""

    @abstractmethod
    async def reset(self) -> None:
        """Clear session state left by a pinned client; raise if the connection is unusable."""

    @abstractmethod
    async def ping(self) -> None:
        """One round trip that proves the server answers; raise if it does not."""

    # The message that ends a session politely (PostgreSQL Terminate, MySQL COM_QUIT).
    goodbye: bytes
    # The statements prepared on it (the engine's cache; the PreparedStatements gauge).
    prepared: Sized = ()

    @property
    def label(self) -> str:
        """Which database session this is, as the database names it (logs, admin API)."""
        return f"connection {id(self):#x}"

    if TYPE_CHECKING:  # the engine's connection is also a relay.ServerEnd

        def write(self, data: bytes) -> None: ...
        def close_transport(self, *, abort: bool = False) -> None: ...

    def close(self, graceful: bool = False, *, by_peer: bool = False) -> None:
        """Close, once, and tell the pool. `graceful`: the connection is known to be idle and
        healthy, so the server is told goodbye first. `by_peer`: the server (or the network)
        ended it, not the proxy: the pool counts it as trouble even when idle (a server
        closing its connections may be shutting down for a failover)."""
        if self.closed:
            return
        self.closed = True
        self.lost_by_peer = by_peer
        if graceful:
            self.write(self.goodbye)
        self.close_transport(abort=not graceful)
        if self.pool is not None:
            self.pool.remove(self)

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
    # The client_password_auth_type values this engine accepts, the first the default.
    auth_types: tuple[ClientPasswordAuthType, ...]
    # The engine's error codes that mean something to the core (see classify_error).
    error_kinds: dict[str, ErrorKind]
    # The ALPN protocol names its clients' TLS may ask for (none: ALPN is not offered).
    alpn_protocols: tuple[str, ...] = ()
    # Prepared statements kept per server connection (max_prepared_statements).
    prepared_capacity = 500

    def __init__(self, security: TargetSecurity | None = None) -> None:
        self._context: EngineContext | None = None
        # How connect() and probe() log in to the databases.
        self.security = security if security is not None else TargetSecurity()

    @classmethod
    def classify_error(cls, error: ServerError) -> ErrorKind:
        """What a database error of this engine means to the core."""
        return error.kind or cls.error_kinds.get(error.code, ErrorKind.OTHER)

    @abstractmethod
    def new_context(self, runtime: ProxyRuntime) -> EngineContext:
        """The state the proxy's client sessions share (users, classifier, cancel keys)."""

    @abstractmethod
    def new_session(self, context: Any) -> asyncio.Protocol:
        """A client session of this engine, on `context`."""

    async def answer_peer(self, context: Any, request: tuple[Any, ...]) -> Any:
        """Another worker's request about a client of `context` that this worker owns (a
        cancel request or KILL that reached the other worker; see Peers)."""
        raise ValueError(f"{type(self).__name__} answers no request {request[:1]!r}")

    def context_for(self, runtime: ProxyRuntime) -> EngineContext:
        """The context of one listener. A proxy's listeners (its read-only endpoints) share
        one context, with their own pools, so cancel requests and KILL find clients of any
        of them."""
        if self._context is None:
            self._context = self.new_context(runtime)
            return self._context
        return dataclasses.replace(self._context, runtime=runtime)

    def serve(self, runtime: ProxyRuntime) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of one listener."""
        context = self.context_for(runtime)
        return lambda: self.new_session(context)

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


class PoolKey(NamedTuple):
    """What clients share server connections by (a tuple: each login hashes one)."""

    database: str
    user: str
    # Engine-defined: what else must match for clients to share server connections (MySQL:
    # the capabilities and character set the connection was opened with).
    variant: int = 0


class BorrowTimeout(Exception):
    """No server connection became free within connection_borrow_timeout."""


class Borrower(ABC):
    """A client waiting for a connection. It is called back rather than awaiting a future, so
    a transaction that has to queue costs no task, future or timer of its own."""

    __slots__ = ()

    @abstractmethod
    def on_connection(self, conn: Any) -> None:
        """Here is the connection asked for (the engine's ServerConnection); it is lent to
        you now."""

    @abstractmethod
    def on_borrow_failed(self, error: Exception) -> None:
        """No connection: BorrowTimeout, or why opening one failed."""


class Lender(ABC):
    """What client sessions borrow from: one pool, or a read-only endpoint's choice among its
    replicas' pools."""

    key: PoolKey
    # ParameterStatus-like facts of the server (engine-defined), learned at first connect.
    server_facts: dict[str, str] | None

    @property
    @abstractmethod
    def timeout(self) -> float:
        """connection_borrow_timeout: how long a borrower waits."""

    @abstractmethod
    def borrow_hint(self) -> str:
        """What a borrow timeout tells the client: the setting and the pool it waited for."""

    @abstractmethod
    def try_borrow(self) -> Any:
        """The hot path: an idle connection right now (the engine's ServerConnection), or
        None."""

    @abstractmethod
    def request(self, borrower: Borrower) -> Any:
        """A connection now, or None and `borrower` is called back later (FIFO), at the
        latest after connection_borrow_timeout."""

    @abstractmethod
    def withdraw(self, borrower: Borrower) -> None:
        """The borrower left before it was served."""

    def release(self, conn: ServerConnection) -> None:
        """Give a lent connection back to the pool it came from (or close it, if it has
        none)."""
        conn.pool.release(conn) if conn.pool is not None else conn.close()

    async def borrow(self) -> Any:
        """Wait for a connection (the engine's ServerConnection), up to
        connection_borrow_timeout."""
        future: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
        borrower = _FutureBorrower(self, future)
        conn = self.request(borrower)
        if conn is not None:
            return conn
        try:
            return await future
        except asyncio.CancelledError:
            self.withdraw(borrower)
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise


class _FutureBorrower(Borrower):
    """Adapts the callbacks to an awaitable, for the rare places that wait (logins)."""

    def __init__(self, pool: Lender, future: asyncio.Future[ServerConnection]) -> None:
        self.pool = pool
        self.future = future

    def on_connection(self, conn: ServerConnection) -> None:
        if self.future.done():
            self.pool.release(conn)
        else:
            self.future.set_result(conn)

    def on_borrow_failed(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Pools(Protocol):
    """What one listener's sessions borrow from: a Lender per (database, user, variant)."""

    @property
    def follows_writer(self) -> bool:
        """Its connections go to the writer (not to a read-only endpoint's replicas)."""

    def get(self, database: str, user: str, variant: int = 0) -> Lender: ...


class Failover(Protocol):
    """The one way an engine takes part in failover: it reports trouble, and waits for the
    writer (events, never polls)."""

    @property
    def generation(self) -> int:
        """Grows at every writer change."""

    def suspect(self) -> None:
        """Something went wrong on the hot path: probe the targets now."""

    async def wait_for_change(self, generation: int, timeout: float) -> bool:
        """Wait until the writer is no longer the one of `generation`; False on timeout."""

    async def any_available(self, timeout: float) -> Target:
        """A target that answers (the writer, else any healthy one, else the writer once
        there is one); raise ServerError after `timeout`."""


@dataclass(slots=True)
class Clock:
    """A coarse clock the janitor advances, so the hot path reads an attribute, not the OS."""

    now: float = field(default_factory=time.monotonic)


@dataclass
class ProxyRuntime:
    """What an engine needs to serve one listener's clients."""

    config: ProxyConfig
    pools: Pools  # what this listener's clients borrow from
    users: UserDirectory  # who may log in, with which passwords (rotated secrets)
    metrics: ProxyMetrics
    clock: Clock
    targets: Failover
    clients: set[ClientSession]
    admission: Admission  # the bound on clients that have not proved a password yet
    throttle: LoginThrottle  # failed logins, per user and source address
    tls: ClientSideTls | None = None  # what clients' TLS is accepted with (config: tls)
    base_dir: Path = Path(".")  # the config's folder: its relative paths resolve against it
    state_dir: Path = Path(".")  # where what the proxy generates is kept (Config.state_path)
    tokens: TokenVerifier | None = None  # signed auth tokens (config: auth_tokens)
    # A drain ends each of these clients between transactions (ClientSession.answered).
    draining: bool = False
    worker: int = 0  # this process's index among the workers (config: workers)
    peers: Peers | None = None  # the other workers, if there are any


@dataclass
class EngineContext:
    """What one proxy's client sessions of an engine share; each engine extends it."""

    runtime: ProxyRuntime

    def refresh(self) -> None:
        """A reload changed `runtime.config`: derive again what was derived from it. Sessions
        already connected keep what they bound at their start (their pinning classifier)."""


@dataclass(frozen=True, slots=True)
class TargetSecurity:
    """How the proxy logs in to its target group's databases (config: target_group): over
    TLS or not, and how it may hand them a password."""

    tls: TargetSideTls | None = None  # None: plaintext (tls mode disable)
    # A password the server asks for in cleartext may go over plaintext too.
    allow_cleartext_password: bool = False
    # MySQL caching_sha2_password: the servers' RSA public key (PEM), from config only.
    server_public_key: bytes | None = None

    def tls_hint(self) -> str:
        """Where the operator changes what the TLS to the databases requires."""
        mode = self.tls.mode.value if self.tls is not None else "disable"
        return f"target_group.tls (mode {mode}) governs this"


@dataclass(frozen=True, slots=True)
class ConnectCodes:
    """The engine's error codes for a server connection that could not be opened."""

    timeout: str  # no login within CONNECT_TIMEOUT
    lost: str  # the server closed the connection, or spoke nonsense, during the login
    unreachable: str  # no TCP connection
    # The TLS to the server, or how it wants the password sent, does not meet the target
    # group's settings: a problem of configuration (an auth error to the core), not a server
    # that is down.
    insecure: str


S = TypeVar("S", bound=ServerConnection)


async def connect_server(
    make: Callable[[], S],
    host: str,
    port: int,
    log_in: Callable[[S], Awaitable[None]],
    *,
    session_init: tuple[str, ...],
    read_limit: bool,
    codes: ConnectCodes,
    security: TargetSecurity,
    lost: tuple[type[Exception], ...] = (ConnectionClosed,),
) -> S:
    """Connect, log in (`log_in`), read the server's limit when asked and start the session;
    a failure is a ServerError with the engine's code."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            # Every engine's server connection is also its asyncio protocol (a relay.ServerEnd).
            factory = cast("Callable[[], asyncio.Protocol]", make)
            _, protocol = await loop.create_connection(factory, host, port)
            server = cast(S, protocol)
            try:
                await log_in(server)
                if read_limit:
                    await server.read_server_limit()
                server.session_init = session_init
                await server.start_session()
            except BaseException:
                server.close()
                raise
    except TimeoutError:
        raise ServerError(f"timed out connecting to {host}:{port}", code=codes.timeout) from None
    except TlsHandshakeFailed as error:
        raise ServerError(
            f"TLS to {host}:{port} failed: {error}; {security.tls_hint()}", code=codes.insecure
        ) from None
    except lost as error:
        raise ServerError(f"{host}:{port} failed during login: {error}", code=codes.lost) from None
    except OSError as error:
        raise ServerError(
            f"cannot connect to {host}:{port}: {error.strerror or error}", code=codes.unreachable
        ) from None
    return server
