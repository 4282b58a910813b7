"""The MySQL engine: what one MySQL/MariaDB proxy shares among its client connections."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from dbmux.auth.mysql import RsaKey, RsaKeyError, load_rsa_key, rsa_key_file
from dbmux.auth.secrets import Credentials
from dbmux.bounded import SetResults
from dbmux.config import (
    ClientPasswordAuthType,
    ConfigError,
    PinningFilter,
    ProxyConfig,
    SessionState,
    Target,
)
from dbmux.engines.base import (
    CLIENT_ID_BITS,
    WORKER_SHIFT,
    Engine,
    EngineContext,
    ErrorKind,
    PoolKey,
    ProbeResult,
    ProxyRuntime,
    ServerConnection,
    ServerError,
)
from dbmux.engines.mysql import handshake, wire
from dbmux.engines.mysql.backend import NATIVE, SHA2, MyServer, open_server, read_greeting
from dbmux.engines.mysql.frontend import MyClient
from dbmux.engines.mysql.login import error_of
from dbmux.engines.mysql.pinning import Classifier

log = logging.getLogger("dbmux.mysql")

# Error numbers (and the core's own 08001, no writer) by what they mean to the core.
ERROR_KINDS = {
    "1045": ErrorKind.AUTH,  # access denied
    "1044": ErrorKind.AUTH,  # access denied to the database
    "1040": ErrorKind.BUSY,  # too many connections
    "2003": ErrorKind.GONE,  # cannot connect
    "2013": ErrorKind.GONE,  # lost connection
    "2026": ErrorKind.AUTH,  # TLS to the server failed or is not offered (target_group.tls)
    "2061": ErrorKind.AUTH,  # the login would expose the password (target_group settings)
    "08001": ErrorKind.GONE,
}
PROBE_WAIT = 10.0  # seconds the first client waits for a writer to show to it
BINARY_CHARSET = 63
# MySQL (5.7.20 and later, and 8, which dropped the old names) spells the transaction
# characteristics that MariaDB still calls tx_isolation and tx_read_only like this.
MYSQL_ALIASES = {
    "tx_isolation": "transaction_isolation",
    "tx_read_only": "transaction_read_only",
}


@dataclass
class MyContext(EngineContext):
    """State shared by the client connections of one MySQL proxy."""

    classifier: Classifier
    rsa_key: RsaKey
    # SET statement text (per pool variant) -> the values it leaves, for SETs whose outcome
    # does not depend on the session (literal values only).
    set_results: SetResults = field(default_factory=SetResults)
    # The connection id each client was given in its greeting -> that client (for KILL).
    sessions: dict[int, MyClient] = field(default_factory=dict)
    # The classifier's names of variables that this server spells otherwise.
    aliases: dict[str, str] = field(default_factory=dict)
    _greeting: handshake.Greeting | None = None
    _greeting_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.config = self.runtime.config
        self.pools = self.runtime.pools
        self.metrics = self.runtime.metrics
        self.clock = self.runtime.clock
        self.clients = self.runtime.clients
        self.loop = asyncio.get_running_loop()
        self.targets = self.runtime.targets
        # Clients of the writer's endpoint (not a read-only one, where a refused write is
        # the right answer) get writes the old writer refused run again on the next one.
        self.follows_writer = self.pools.follows_writer
        types = {entry.client_password_auth_type for entry in self.config.auth}
        self.default_plugin = (
            SHA2 if types == {ClientPasswordAuthType.MYSQL_CACHING_SHA2_PASSWORD} else NATIVE
        )

    def refresh(self) -> None:
        self.__post_init__()
        self.classifier = classifier_for(self.config)

    @staticmethod
    def plugin_for(auth_type: ClientPasswordAuthType | None) -> str:
        return SHA2 if auth_type is ClientPasswordAuthType.MYSQL_CACHING_SHA2_PASSWORD else NATIVE

    async def server_greeting(self) -> handshake.Greeting:
        """The database's greeting (version, capabilities, charset), read once without
        logging in: clients see the server they would see directly."""
        if self._greeting is None:
            async with self._greeting_lock:
                if self._greeting is None:
                    # Any healthy instance of the group will do (they run the same server);
                    # with none known yet, wait for the writer.
                    target = await self.runtime.targets.any_available(PROBE_WAIT)
                    self._greeting = await read_greeting(target.host, target.port)
                    if "mariadb" not in self._greeting.version.lower():
                        self.aliases = MYSQL_ALIASES
        return self._greeting

    def new_connection_id(self, client: MyClient) -> int:
        """A connection id no client of this proxy holds, naming this worker (see
        WORKER_SHIFT)."""
        worker = self.runtime.worker << WORKER_SHIFT
        while True:
            connection_id = worker | (next(self._ids) & CLIENT_ID_BITS)
            if connection_id not in self.sessions and connection_id & CLIENT_ID_BITS:
                self.sessions[connection_id] = client
                return connection_id


def classifier_for(config: ProxyConfig) -> Classifier:
    """The pinning classifier the proxy's settings ask for."""
    return Classifier(
        exclude_variable_sets=PinningFilter.EXCLUDE_VARIABLE_SETS
        in config.target_group.connection_pool_config.session_pinning_filters,
        replay_settings=config.session_state is SessionState.REPLAY,
    )


class MysqlEngine(Engine):
    """MySQL client/server protocol 4.1+, for MySQL 5.7+/8 and MariaDB 10.2+."""

    read_only_statement = "SET SESSION TRANSACTION READ ONLY"
    auth_types = (
        ClientPasswordAuthType.MYSQL_NATIVE_PASSWORD,
        ClientPasswordAuthType.MYSQL_CACHING_SHA2_PASSWORD,
    )
    error_kinds = ERROR_KINDS

    def new_context(self, runtime: ProxyRuntime) -> MyContext:
        config = runtime.config
        try:
            rsa_key = load_rsa_key(config, runtime.base_dir, runtime.state_dir)
        except RsaKeyError as error:
            raise ConfigError(str(error)) from None
        log.info(
            "proxy %s: caching_sha2_password's RSA key is %s; `dbmux rsa-public-key` prints "
            "its public half for clients to pin",
            config.name,
            rsa_key_file(config, runtime.base_dir, runtime.state_dir),
        )
        pool_config = runtime.config.target_group.connection_pool_config
        self.prepared_capacity = pool_config.max_prepared_statements
        return MyContext(
            runtime,
            classifier_for(runtime.config),
            rsa_key,
        )

    def new_session(self, context: MyContext) -> MyClient:
        return MyClient(context)

    async def answer_peer(self, context: MyContext, request: tuple[Any, ...]) -> Any:
        """("kill", connection id, user, query): a KILL [QUERY] for one of this worker's
        clients, sent by `user` through another worker. Answers None when done, else the
        error (code, text) the killer is to get."""
        kind, connection_id, user, query = request
        if kind != "kill":
            return await super().answer_peer(context, request)
        target = context.sessions.get(connection_id)
        if target is None:
            return (wire.ER_NO_SUCH_THREAD, f"Unknown thread id: {connection_id}")
        if target.user != user:
            return (wire.ER_KILL_DENIED, f"You are not owner of thread {connection_id}")
        try:
            await target.killed(query=query)
        except ServerError as error:
            return (error_of(error), str(error))
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
        capabilities = (
            key.variant & handshake.SESSION_CAPABILITIES
        ) | handshake.SERVER_BASE_CAPABILITIES
        return await open_server(
            target.host,
            target.port,
            credentials,
            key.database,
            capabilities=capabilities,
            charset=(key.variant >> 48) & 0xFF,
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
            "",
            capabilities=handshake.SERVER_BASE_CAPABILITIES,
            charset=BINARY_CHARSET,
            session_init=(),
            read_limit=False,
            prepared_capacity=1,
            security=self.security,
        )
        try:
            _, rows = await server.query("SELECT @@read_only OR @@innodb_read_only")
            writable = rows[0][0] == b"0"
            behind = await replica_lag(server) if lag and not writable else None
        finally:
            server.close(graceful=True)
        return ProbeResult(writable, behind)


async def replica_lag(server: MyServer) -> float | None:
    """Seconds_Behind_Master of the replica's (first) connection to its primary; None when
    it replicates from nobody, its SQL thread is stopped, or the probing account may not
    ask (it needs REPLICA MONITOR, or REPLICATION CLIENT on MySQL)."""
    try:
        columns, rows = await server.query("SHOW SLAVE STATUS")
    except ServerError as error:
        if error.code in ("1227", "1142"):  # access denied
            return None
        raise
    names = [c.name for c in columns]
    if not rows or "Seconds_Behind_Master" not in names:
        return None
    value = rows[0][names.index("Seconds_Behind_Master")]
    return float(value) if value is not None else None
