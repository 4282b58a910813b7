"""The PostgreSQL engine: what one PostgreSQL proxy shares among its client connections."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from dbmux.auth.directory import User
from dbmux.auth.scram import ScramVerifier, user_salt
from dbmux.auth.secrets import Credentials
from dbmux.bounded import LruDict, SetResults
from dbmux.config import (
    ClientPasswordAuthType,
    PinningFilter,
    ProxyConfig,
    SessionState,
    Target,
)
from dbmux.engines.base import (
    WORKER_SHIFT,
    Engine,
    EngineContext,
    ErrorKind,
    PoolKey,
    ProbeResult,
    ProxyRuntime,
    ServerConnection,
)
from dbmux.engines.postgres import wire
from dbmux.engines.postgres.backend import open_server
from dbmux.engines.postgres.frontend import PgClient, cancel_client
from dbmux.engines.postgres.pinning import Classifier

# SQLSTATEs by what they mean to the core.
ERROR_KINDS = {
    "28P01": ErrorKind.AUTH,  # invalid password
    "28000": ErrorKind.AUTH,  # invalid authorization (no such user, pg_hba)
    "53300": ErrorKind.BUSY,  # too many connections
    "08001": ErrorKind.GONE,  # cannot connect (also the core's: no writer)
    "08006": ErrorKind.GONE,  # connection failure
    "57P01": ErrorKind.GONE,  # admin shutdown
    "57P03": ErrorKind.GONE,  # cannot connect now (starting up, shutting down)
}
SPELLINGS_CAPACITY = 1000  # learned spellings of startup setting values, per proxy
STATUSES_CAPACITY = 1000  # ParameterStatus sets kept encoded for logins, per proxy
PROBE_DATABASE = "postgres"  # every cluster has it, and PUBLIC may connect to it
# A replica that has replayed all it received is not behind, however old its last replayed
# commit is (an idle primary sends nothing); one with WAL left to replay is as far behind as
# the last commit it did replay.
LAG_QUERY = """SELECT pg_is_in_recovery(), CASE
  WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
  ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"""


class StatementNames:
    """Statement text (query and parameter types) -> the name it has on every server
    connection. Bounded: a text forgotten here gets a new, never reused, name next time,
    while sessions and servers that know the old one keep using it."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.names: OrderedDict[bytes, bytes] = OrderedDict()
        self.counter = itertools.count()

    def name(self, text: bytes) -> bytes:
        names = self.names
        name = names.get(text)
        if name is None:
            name = names[text] = b"dbmux_%d" % next(self.counter)
            if len(names) > self.capacity:
                names.popitem(last=False)
        else:
            names.move_to_end(text)
        return name


@dataclass(frozen=True, slots=True)
class Login:
    """A user clients may log in as, with what its auth method needs: for SCRAM, a verifier
    per password (two during a rotation), all with the user's salt."""

    user: User
    auth_type: ClientPasswordAuthType
    verifiers: tuple[ScramVerifier, ...]


@dataclass
class PgContext(EngineContext):
    """State shared by the client connections of one PostgreSQL proxy."""

    classifier: Classifier
    # What logins derived from the users' passwords (SCRAM keys: PBKDF2, once per password),
    # for the directory's version it was derived from.
    logins: dict[str, Login] = field(default_factory=dict)
    logins_version: int = -1
    cancel_keys: dict[tuple[int, int], PgClient] = field(default_factory=dict)
    # (setting, value as a client wrote it) -> the server's spelling (utf-8 -> UTF8).
    canonical: LruDict[tuple[str, str], str] = field(
        default_factory=lambda: LruDict(SPELLINGS_CAPACITY)
    )
    # What a login reports (ParameterStatus) -> those messages: the clients of a pool and
    # application report the same, so it is encoded once.
    statuses: LruDict[tuple[tuple[str, str], ...], bytes] = field(
        default_factory=lambda: LruDict(STATUSES_CAPACITY)
    )
    statement_names: StatementNames = field(default_factory=lambda: StatementNames())
    # Server process id -> process id of the client that last used it (NotificationResponse).
    session_ids: dict[bytes, bytes] = field(default_factory=dict)
    # (pool key, SET statement text) -> the values it leaves (see PgClient._memo_key).
    set_results: SetResults = field(default_factory=SetResults)

    def __post_init__(self) -> None:
        # Flattened for the hot path: one attribute read instead of two.
        self.config = self.runtime.config
        self.pools = self.runtime.pools
        self.metrics = self.runtime.metrics
        self.clock = self.runtime.clock
        self.clients = self.runtime.clients
        self.loop = asyncio.get_running_loop()

    def refresh(self) -> None:
        self.__post_init__()
        self.classifier = classifier_for(self.config)
        self.logins_version = -1  # the users may be another directory now

    def login_for(self, name: str) -> Login | None:
        """The user `name` with its SCRAM verifiers, derived on its first login after its
        passwords changed."""
        directory = self.runtime.users
        if self.logins_version != directory.version:
            self.logins.clear()
            self.logins_version = directory.version
        login = self.logins.get(name)
        if login is None:
            user = directory.get(name)
            if user is None:
                return None
            method = user.auth_type or ClientPasswordAuthType.POSTGRES_SCRAM_SHA_256
            verifiers: tuple[ScramVerifier, ...] = ()
            if method is ClientPasswordAuthType.POSTGRES_SCRAM_SHA_256:
                salt = user_salt(name)
                verifiers = tuple(ScramVerifier.from_password(p, salt=salt) for p in user.passwords)
            login = self.logins[name] = Login(user, method, verifiers)
        return login

    def new_cancel_key(self, client: PgClient) -> tuple[int, int]:
        """A BackendKeyData pair unique among this proxy's clients, its process id naming
        this worker (see WORKER_SHIFT)."""
        worker = self.runtime.worker << WORKER_SHIFT
        while True:
            bits = secrets.randbits(WORKER_SHIFT + 32)  # one draw from the kernel, not two
            key = (worker | bits >> 32, (bits & 0xFFFFFFFF) - (1 << 31))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key


def classifier_for(config: ProxyConfig) -> Classifier:
    """The pinning classifier the proxy's settings ask for."""
    return Classifier(
        exclude_variable_sets=PinningFilter.EXCLUDE_VARIABLE_SETS
        in config.target_group.connection_pool_config.session_pinning_filters,
        replay_settings=config.session_state is SessionState.REPLAY,
    )


class PostgresEngine(Engine):
    """PostgreSQL protocol 3.0."""

    read_only_statement = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
    auth_types = (
        ClientPasswordAuthType.POSTGRES_SCRAM_SHA_256,
        ClientPasswordAuthType.POSTGRES_MD5,
    )
    error_kinds = ERROR_KINDS
    alpn_protocols = (wire.ALPN,)

    def new_context(self, runtime: ProxyRuntime) -> PgContext:
        pool_config = runtime.config.target_group.connection_pool_config
        self.prepared_capacity = pool_config.max_prepared_statements
        return PgContext(
            runtime,
            classifier_for(runtime.config),
        )

    def new_session(self, context: PgContext) -> PgClient:
        return PgClient(context)

    async def answer_peer(self, context: PgContext, request: tuple[Any, ...]) -> Any:
        """("cancel", process id, secret key): a CancelRequest for one of this worker's
        clients reached another worker."""
        kind, process_id, secret_key = request
        if kind != "cancel":
            return await super().answer_peer(context, request)
        cancel_client(context, process_id, secret_key)
        return None

    async def connect(
        self,
        target: Target,
        credentials: Credentials,
        key: PoolKey,
        *,
        session_init: tuple[str, ...],
        read_limit: bool,
    ) -> ServerConnection:
        return await open_server(
            target.host,
            target.port,
            credentials,
            key.database,
            session_init=session_init,
            read_limit=read_limit,
            prepared_capacity=self.prepared_capacity,
            security=self.security,
        )

    async def probe(self, target: Target, credentials: Credentials, *, lag: bool) -> ProbeResult:
        server = await open_server(
            target.host,
            target.port,
            credentials,
            PROBE_DATABASE,
            session_init=(),
            read_limit=False,
            prepared_capacity=1,
            security=self.security,
        )
        try:
            rows = await server.run(LAG_QUERY if lag else "SELECT pg_is_in_recovery()")
        finally:
            server.close(graceful=True)
        writable = rows[0][0] == "f"
        behind = rows[0][1] if lag and not writable else None
        return ProbeResult(writable, float(behind) if behind is not None else None)
