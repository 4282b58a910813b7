"""A running proxy: its listeners, pools, janitor and shutdown; and the process running them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dbmux.admin.api import AdminApi
from dbmux.admin.listener import AdminListener
from dbmux.auth.admission import Admission, LoginThrottle
from dbmux.auth.directory import UserDirectory
from dbmux.auth.mysql import load_public_key
from dbmux.auth.secrets import Credentials, SecretError
from dbmux.auth.tls import ClientSideTls, TargetSideTls, TlsError
from dbmux.auth.tokens import TokenKeyError, TokenVerifier
from dbmux.config import (
    Address,
    Config,
    ConfigError,
    Endpoint,
    ProxyConfig,
    SecretsConfig,
    Target,
    TargetGroupConfig,
    TargetRole,
    TlsMode,
    load_config,
)
from dbmux.engines import engine_class
from dbmux.engines.base import (
    Clock,
    EngineContext,
    ErrorKind,
    Peers,
    PoolKey,
    ProbeResult,
    ProxyRuntime,
    ServerConnection,
    ServerError,
    TargetSecurity,
)
from dbmux.metrics import ProxyMetrics, Registry
from dbmux.pool import Opener, PoolSet, ShareFactory, TargetBudget
from dbmux.replicas import ReplicaRoute
from dbmux.session import ClientSession
from dbmux.targets import Instance, TargetGroup

log = logging.getLogger("dbmux.proxy")

JANITOR_INTERVAL = 1.0
WRITER = "writer"  # the name of the writer's budget (a replica's is the replica's name)
DRAIN_INTERVAL = 0.05  # seconds between looks for clients a drain may end
# What a reload cannot take from a config file it refuses.
RELOAD_ERRORS = (ConfigError, SecretError, TlsError, TokenKeyError, OSError)

_T = TypeVar("_T")


def refused(reason: str) -> dict[str, Any]:
    """A reload's answer when the config cannot be used: the running one stays."""
    log.error("reload refused, the running configuration stays: %s", reason)
    return {"status": "refused", "reason": reason}


def target_security(group: TargetGroupConfig, base_dir: Path) -> TargetSecurity:
    """How the proxy logs in to the group's databases; files that cannot be used raise
    TlsError naming them."""
    tls = TargetSideTls(group.tls, base_dir) if group.tls.mode is not TlsMode.DISABLE else None
    key = None
    if group.server_public_key_file is not None:
        path = base_dir / group.server_public_key_file
        try:
            key = path.read_bytes()
            load_public_key(key)
        except (OSError, ValueError) as error:
            raise TlsError(
                f"target_group.server_public_key_file: cannot use {path}: {error}"
            ) from None
    return TargetSecurity(tls, group.allow_cleartext_password, key)


@dataclass
class Listener:
    """One listening socket of a proxy (its own `listen`, or an endpoint's) and what its
    clients run on: a runtime of their own, so a drain finds exactly this listener's."""

    name: str  # "" for the proxy's own listen, else the endpoint's
    spec: Address | Endpoint  # what the config says of it: a change means a new listener
    runtime: ProxyRuntime
    context: EngineContext
    server: asyncio.Server | None = None
    address: tuple[str, int] = ("", 0)  # where it listens (the port chosen for port 0)


@dataclass
class ProxyUpdate:
    """A reload's new settings for a running proxy, everything that could fail already
    built: applied at once by `Proxy.apply`, or dropped by `Proxy.discard`."""

    config: ProxyConfig
    users: UserDirectory | None  # None: the auth entries did not change
    tls: ClientSideTls | None
    tokens: TokenVerifier | None
    security: TargetSecurity | None  # None: how it reaches the targets did not change
    added: list[Listener]  # bound, not yet serving
    removed: list[Listener]
    routes: dict[str, ReplicaRoute]  # of added READ_ONLY endpoints


class Proxy:
    """One configured proxy: a listener per endpoint in front of one target group."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        registry: Registry,
        base_dir: Path,
        state_dir: Path,
        secrets: SecretsConfig | None = None,
        worker: int = 0,
        peers: Peers | None = None,
        shares: ShareFactory | None = None,
    ) -> None:
        self.config = config
        self.base_dir = base_dir
        self.shares = shares  # several workers: each target's budget is shared among them
        self.secrets = secrets or SecretsConfig()
        self.paused = False  # pause(): nothing is lent until resume()
        self.draining = False
        self.shutdown_timeout = 30.0  # seconds a removed listener's clients have (Config's)
        self.engine = engine_class(config.engine_family)(
            target_security(config.target_group, base_dir)
        )
        self.registry = registry
        self.metrics = ProxyMetrics(registry, config.name, timed=config.latency_histograms)
        self.users = UserDirectory.from_config(config.auth, self.secrets, base_dir)
        self.users.load()
        self.pool_config = config.target_group.connection_pool_config
        self.targets = TargetGroup(
            list(config.target_group.targets),
            self._probe,
            self.engine.classify_error,
            interval=config.target_group.probe_interval,
            on_writer_change=self._writer_changed,
            on_probed=self._probed,
            on_failover=lambda writer, seconds: self.metrics.count_failover(writer.name, seconds),
        )
        self.users.on_change = self.targets.credentials_changed
        self.pools = PoolSet(
            self._writer_opener(read_only=False), self.metrics, self._budget(WRITER)
        )
        read_only = [e for e in config.endpoints if e.target_role is TargetRole.READ_ONLY]
        self.routes = {e.name: self._route(e) for e in read_only}
        self._measure_lag = any(e.max_replica_lag is not None for e in config.endpoints)
        clients: set[ClientSession] = set()
        self.runtime = ProxyRuntime(
            config,
            self.pools,
            self.users,
            self.metrics,
            Clock(),
            self.targets,
            clients,
            Admission(clients, config, self.metrics),
            LoginThrottle(
                config.max_login_failure_delay,
                config.client_login_timeout,
                self.metrics,
                time.monotonic,
            ),
            (
                ClientSideTls(config.tls, base_dir, self.engine.alpn_protocols)
                if config.tls is not None
                else None
            ),
            base_dir,
            state_dir,
            TokenVerifier.for_proxy(config, base_dir),
            worker=worker,
            peers=peers,
        )
        self.listeners: list[Listener] = []  # serving: the proxy's listen first
        self._janitor: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[Any]] = set()  # of removed listeners
        self._register_gauges()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens: its own listen, then its endpoints'."""
        return [listener.address for listener in self.listeners]

    @property
    def endpoint_addresses(self) -> dict[str, tuple[str, int]]:
        return {x.name: x.address for x in self.listeners if x.name}

    @property
    def budgets(self) -> list[TargetBudget]:
        return list({id(s.budget): s.budget for s in self.pool_sets}.values())

    @property
    def pool_sets(self) -> list[PoolSet]:
        """Every PoolSet: the writer's, and each read-only endpoint's replicas' and fallback."""
        sets = [self.pools]
        for route in self.routes.values():
            sets += route.sets.values()
            if route.fallback is not None:
                sets.append(route.fallback)
        return sets

    def _register_gauges(self) -> None:
        """The gauges read at scrape time, from the pools and clients themselves."""
        m, proxy, clients = self.metrics, self.config.name, self.runtime.clients

        def lent() -> int:
            return sum(len(p.lent) for b in self.budgets for p in b.pools)

        def longest_wait() -> float:
            pools = [p for b in self.budgets for p in b.pools if p.waiters]
            return max((p.loop.time() - p.waiters[0][0] + p.timeout for p in pools), default=0.0)

        def prepared() -> int:
            pools = [p for b in self.budgets for p in b.pools]
            return sum(len(c.prepared) for p in pools for c in (*p.idle, *p.lent))

        m.database_connections.observe_with(lambda: sum(b.open for b in self.budgets), proxy=proxy)
        m.database_connections_borrowed.observe_with(lent, proxy=proxy)
        m.database_connections_in_transaction.observe_with(
            lambda: sum(1 for c in clients if c.server is not None and c.in_transaction),
            proxy=proxy,
        )
        m.database_connections_pinned.observe_with(
            lambda: sum(1 for c in clients if c.server is not None and c.pin_reason is not None),
            proxy=proxy,
        )
        m.max_database_connections.observe_with(lambda: self.pools.budget.limit or 0, proxy=proxy)
        m.clients_waiting.observe_with(lambda: sum(1 for c in clients if c.waiting), proxy=proxy)
        m.longest_wait.observe_with(longest_wait, proxy=proxy)
        m.prepared_statements.observe_with(prepared, proxy=proxy)
        for instance in self.targets.instances:
            m.availability.observe_with(instance.availability, proxy=proxy, target=instance.name)

    def _session_init(self, read_only: bool) -> tuple[str, ...]:
        init = self.pool_config.init_query
        return ((self.engine.read_only_statement,) if read_only else ()) + ((init,) if init else ())

    def _writer_opener(self, read_only: bool) -> Opener:
        async def open_to_writer(key: PoolKey, read_limit: bool) -> ServerConnection:
            return await self._open(key, read_limit, self._session_init(read_only))

        return open_to_writer

    def _route(self, endpoint: Endpoint) -> ReplicaRoute:
        fallback = None
        if endpoint.fallback_to_writer:
            opener = self._writer_opener(read_only=True)
            budget = self.pools.budget  # the writer's, shared
            fallback = PoolSet(
                opener, self.metrics, budget, follows_writer=False, owns_budget=False
            )
        return ReplicaRoute(
            endpoint,
            self.targets.instances,
            self._replica_pools,
            fallback,
            self.pool_config.connection_borrow_timeout,
        )

    def _replica_pools(self, instance: Instance) -> PoolSet:
        """The pools of one replica: read-only sessions to that instance only."""

        async def open_to_replica(key: PoolKey, read_limit: bool) -> ServerConnection:
            generation = pools.budget.generation
            if not instance.is_replica:
                raise ServerError(f"{instance.name} is no longer a replica", code="08001")
            conn = await self._log_in(
                key.user,
                lambda credentials: self.engine.connect(
                    instance.target,
                    credentials,
                    key,
                    session_init=self._session_init(read_only=True),
                    read_limit=read_limit,
                ),
            )
            conn.generation = generation
            return conn

        budget = self._budget(instance.name)
        pools = PoolSet(open_to_replica, self.metrics, budget, follows_writer=False)
        return pools

    def _budget(self, name: str) -> TargetBudget:
        """The budget of one target (`name`: WRITER, or a replica's name); trouble with its
        connections probes the targets."""
        budget = TargetBudget(self.pool_config, self.targets.suspect)
        if self.shares is not None:
            budget.share = self.shares((self.config.name, name), budget)
        budget.paused = self.paused
        return budget

    async def _open(
        self, key: PoolKey, read_limit: bool, session_init: tuple[str, ...]
    ) -> ServerConnection:
        """A connection to the writer; during a failover, to the next one."""

        async def connect(target: Target) -> ServerConnection:
            return await self._log_in(
                key.user,
                lambda credentials: self.engine.connect(
                    target, credentials, key, session_init=session_init, read_limit=read_limit
                ),
            )

        return await self.targets.connect_to_writer(
            connect, self.pool_config.connection_borrow_timeout
        )

    async def _log_in(
        self, user: str | None, attempt: Callable[[Credentials], Awaitable[_T]]
    ) -> _T:
        """`attempt` with the user's credentials (None: any user's, for probes). During a
        rotation a user has two passwords and the database takes one of them: a refused
        one is followed by the other, and if all are refused the secrets are read again
        in case the proxy is behind the database."""
        refused: ServerError | None = None
        for again in (False, True):
            if again and not await self.users.reread_after_failure():
                break
            logins = self.users.logins(user) if user is not None else self.users.any_logins()
            for credentials in logins:
                try:
                    result = await attempt(credentials)
                except ServerError as error:
                    if self.engine.classify_error(error) is not ErrorKind.AUTH:
                        raise
                    refused = error
                    continue
                self.users.worked(credentials)
                return result
        if refused is not None:
            raise refused
        problems = "; ".join(self.users.problems) or "no auth entry holds this user"
        raise ServerError(
            f"no usable credentials for {user or 'any user'}: {problems}", kind=ErrorKind.AUTH
        )

    async def _probe(self, target: Target) -> ProbeResult:
        return await self._log_in(
            None, lambda credentials: self.engine.probe(target, credentials, lag=self._measure_lag)
        )

    def _probed(self, instance: Instance) -> None:
        for route in self.routes.values():
            route.instance_probed(instance)

    def _writer_changed(self, old: Instance | None, new: Instance | None) -> None:
        if old is not None:
            log.warning(
                "proxy %s: writer %s -> %s; connections to %s are retired",
                self.config.name,
                old.name,
                new.name if new is not None else "(none yet)",
                old.name,
            )
        self.pools.retire(self.targets.generation)
        if new is not None and self.runtime.peers is not None:
            self.runtime.peers.writer_changed(self.config.name)

    def _listener(self, name: str, spec: Address | Endpoint) -> Listener:
        """A listener (not yet bound) and the runtime of its clients: an endpoint's has its
        own client metrics (the endpoint label) and, read-only, its own pools."""
        route = self.routes.get(name)
        pools = route if route is not None else self.pools
        metrics = self.metrics
        if name:
            metrics = ProxyMetrics(self.registry, self.config.name, name, timed=metrics.timed)
        runtime = dataclasses.replace(self.runtime, pools=pools, metrics=metrics)
        return Listener(name, spec, runtime, self.engine.context_for(runtime))

    def _wanted_listeners(self, config: ProxyConfig) -> dict[str, Address | Endpoint]:
        return {"": config.listen} | {e.name: e for e in config.endpoints}

    async def _bind(self, listener: Listener) -> None:
        """Listen, sharing the port with another dbmux process if one listens there too
        (SO_REUSEPORT: a new process takes over while the old one drains)."""
        address = listener.spec if isinstance(listener.spec, Address) else listener.spec.listen
        context = listener.context
        new_session = self.engine.new_session
        listener.server = await asyncio.get_running_loop().create_server(
            lambda: new_session(context),
            address.host,
            address.port,
            reuse_address=True,
            reuse_port=True,
            backlog=4096,
        )
        listener.address = listener.server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        listeners = [self._listener(n, s) for n, s in self._wanted_listeners(self.config).items()]
        try:
            for listener in listeners:
                await self._bind(listener)
        except OSError:
            for listener in listeners:
                if listener.server is not None:
                    listener.server.close()
            raise
        self.listeners = listeners
        self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())
        self.targets.start()
        log.info(
            "proxy %s (%s) listening on %s, targets %s",
            self.config.name,
            self.config.engine_family,
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            ", ".join(i.name for i in self.targets.instances),
        )

    async def _run_janitor(self) -> None:
        """Once a second: advance the clock, reap idle server connections, expire idle clients."""
        clock = self.runtime.clock
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            clock.now = time.monotonic()
            try:
                if self.runtime.tls is not None:
                    self.runtime.tls.reload_if_changed()
                if self.engine.security.tls is not None:
                    self.engine.security.tls.reload_if_changed()
                if self.runtime.tokens is not None:
                    self.runtime.tokens.reload_if_changed()
                self.users.refresh_in_background()
                for pools in self.pool_sets:
                    pools.sweep()
                self._drop_unused_pools(clock.now)
                self._expire_idle_clients(clock.now)
            except Exception:
                log.exception("janitor pass failed")

    def _drop_unused_pools(self, now: float) -> None:
        in_use: set[object] = {client.pool for client in self.runtime.clients}
        for pools in self.pool_sets:
            pools.drop_unused(in_use, now)
        for route in self.routes.values():
            route.drop_unused(in_use, now)

    def _expire_idle_clients(self, now: float) -> None:
        """Disconnect clients silent for idle_client_timeout with nothing in flight. A client
        with something in flight (a long query, a result it reads slowly, a wait for a
        server connection) is active now, so its idle time starts when that ends.
        `last_active` comes from the coarse clock, up to one janitor interval before the
        client's real last move: the interval is added so that no client is cut off early."""
        limit = self.config.idle_client_timeout
        for client in [c for c in self.runtime.clients if c.logged_in]:
            if client.active:
                client.last_active = now
            elif now - client.last_active > limit + JANITOR_INTERVAL:
                client.expire(f"idle_client_timeout ({limit:g} s)")

    # -- reload ------------------------------------------------------------------------------

    def rebuilt_by(self, new: ProxyConfig) -> bool:
        """`new` changes what this proxy cannot change while it runs (the engine, the MySQL
        RSA key its clients may have pinned): a new proxy takes its listeners over
        (SO_REUSEPORT) and this one drains."""
        old = self.config
        return (
            new.engine_family != old.engine_family
            or new.rsa_private_key_file != old.rsa_private_key_file
        )

    async def prepare(self, new: ProxyConfig, secrets: SecretsConfig) -> ProxyUpdate:
        """Build what `new` needs (users, TLS, token keys, new listeners bound but not yet
        serving); raises, changing nothing, if any of it cannot be used."""
        users = None
        if new.auth != self.config.auth or secrets != self.secrets:
            users = UserDirectory.from_config(new.auth, secrets, self.base_dir)
            await asyncio.to_thread(users.load)
        tls = (
            ClientSideTls(new.tls, self.base_dir, self.engine.alpn_protocols)
            if new.tls is not None
            else None
        )
        tokens = TokenVerifier.for_proxy(new, self.base_dir)
        old_group, group = self.config.target_group, new.target_group
        security = None
        if (group.tls, group.allow_cleartext_password, group.server_public_key_file) != (
            old_group.tls,
            old_group.allow_cleartext_password,
            old_group.server_public_key_file,
        ):
            security = target_security(group, self.base_dir)
        wanted = self._wanted_listeners(new)
        current = {x.name: x for x in self.listeners}
        removed = [x for x in self.listeners if wanted.get(x.name) != x.spec]
        update = ProxyUpdate(new, users, tls, tokens, security, [], removed, {})
        for endpoint in new.endpoints:
            changed = current.get(endpoint.name) in removed or endpoint.name not in current
            if changed and endpoint.target_role is TargetRole.READ_ONLY:
                update.routes[endpoint.name] = self._route(endpoint)
        saved, self.routes = self.routes, {**self.routes, **update.routes}
        try:
            for name, spec in wanted.items():
                if name not in current or current[name] in removed:
                    listener = self._listener(name, spec)
                    update.added.append(listener)
                    await self._bind(listener)
        except OSError:
            self.discard(update)
            raise
        finally:
            self.routes = saved
        return update

    def discard(self, update: ProxyUpdate) -> None:
        """A reload refused after `prepare`: close what it bound."""
        for listener in update.added:
            if listener.server is not None:
                listener.server.close()
        for route in update.routes.values():
            route.close_all()

    def apply(self, update: ProxyUpdate, secrets: SecretsConfig) -> list[str]:
        """Switch to the prepared settings, clients staying connected: what is read at use
        (timeouts, limits, require_tls, debug_logging...) applies at once, pool sizes at once,
        init_query and session settings to new connections. Returns what changed."""
        old, new = self.config, update.config
        changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)]
        self.config, self.secrets = new, secrets
        self.pool_config = new.target_group.connection_pool_config
        if update.users is not None:
            self.users.on_change = lambda: None
            self.users = update.users
            self.users.on_change = self.targets.credentials_changed
            self.targets.credentials_changed()
        removed = {x.name for x in update.removed}
        routes = {n: r for n, r in self.routes.items() if n not in removed}
        dropped = {n: r for n, r in self.routes.items() if n in removed}
        self.routes = routes | update.routes
        self._measure_lag = any(e.max_replica_lag is not None for e in new.endpoints)
        keep = [x for x in self.listeners if x.name not in removed]
        for runtime in [self.runtime, *(x.runtime for x in keep + update.added)]:
            runtime.config = new
            runtime.users = self.users
            runtime.tls = update.tls
            runtime.tokens = update.tokens
        admission, throttle = self.runtime.admission, self.runtime.throttle
        admission.max_clients = new.max_client_connections
        admission.max_pending = new.max_pending_logins
        throttle.cap = new.max_login_failure_delay
        throttle.horizon = new.client_login_timeout
        self.engine.prepared_capacity = self.pool_config.max_prepared_statements
        for budget in self.budgets:
            budget.reconfigure(self.pool_config)
        for route in self.routes.values():
            route.timeout = self.pool_config.connection_borrow_timeout
        self._change_targets(old, new, update.security)
        if old.target_group.connection_pool_config.init_query != self.pool_config.init_query:
            for pools in self.pool_sets:
                pools.retire(pools.budget.generation)  # idle ones close; new ones run it
        for listener in keep + update.added:
            listener.context.refresh()
        self.listeners = sorted(keep + update.added, key=lambda x: x.name != "")
        for listener in update.removed:
            assert listener.server is not None
            listener.server.close()
            task = asyncio.get_running_loop().create_task(
                self._drain_listener(listener, dropped.get(listener.name))
            )
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return changed

    def _change_targets(
        self, old: ProxyConfig, new: ProxyConfig, security: TargetSecurity | None
    ) -> None:
        """The target group's instances, probe interval and way in (TLS, keys): new server
        connections follow at once; transactions under way finish where they are."""
        self.targets.interval = new.target_group.probe_interval
        if new.target_group.targets != old.target_group.targets:
            added, removed = self.targets.set_targets(list(new.target_group.targets))
            for route in self.routes.values():
                route.targets_changed(added, removed)
            log.info(
                "proxy %s: targets now %s",
                new.name,
                ", ".join(i.name for i in self.targets.instances),
            )
        if security is not None:
            self.engine.security = security
            for pools in self.pool_sets:
                pools.retire(pools.budget.generation)  # idle ones close; new ones use it
            self.targets.credentials_changed()  # probe with it now

    # -- pause, resume, drain, stop ----------------------------------------------------------

    def _in_transaction(self) -> list[Any]:
        """Clients with a transaction on a borrowed server connection (not pinned)."""
        return [c for c in self.runtime.clients if c.server is not None and c.pin_reason is None]

    async def pause(self, timeout: float = 30.0) -> dict[str, Any]:
        """PgBouncer's PAUSE: transactions under way finish; every request that needs a
        server connection from now on waits (no borrow timeout) until `resume`. Returns once
        no transaction is left on a borrowed connection, or after `timeout` seconds.
        Pinned sessions keep their own connection and are not held."""
        self.paused = True
        for budget in self.budgets:
            budget.pause()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._in_transaction() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_INTERVAL)
        left = len(self._in_transaction())
        pinned = sum(1 for c in self.runtime.clients if c.pin_reason is not None)
        log.info(
            "proxy %s paused (%d transactions still under way, %d pinned sessions)",
            self.config.name,
            left,
            pinned,
        )
        return {
            "proxy": self.config.name,
            "paused": True,
            "transactions_in_flight": left,
            "pinned_sessions": pinned,
        }

    async def resume(self) -> dict[str, Any]:
        """PgBouncer's RESUME: the held requests go on, in the order they came."""
        held = sum(len(b.held) for b in self.budgets)
        self.paused = False
        for budget in self.budgets:
            budget.resume()
        log.info("proxy %s resumed (%d held requests go on)", self.config.name, held)
        return {"proxy": self.config.name, "paused": False, "resumed_requests": held}

    async def drain(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop accepting; let transactions finish (up to `timeout` seconds); end each
        client between transactions with the engine's shutdown error (PostgreSQL 57P01,
        MySQL 1053); then close the server connections and stop."""
        self.draining = True
        for listener in self.listeners:
            assert listener.server is not None
            listener.server.close()
        if self.paused:
            await self.resume()  # held requests would wait for ever
        log.info(
            "proxy %s drains: %d clients, up to %g s",
            self.config.name,
            len(self.runtime.clients),
            timeout,
        )
        cut = await self._drain_clients(lambda client: True, timeout)
        await self.stop()
        log.info("proxy %s drained (%d clients cut off mid-transaction)", self.config.name, cut)
        return {"proxy": self.config.name, "drained": True, "clients_cut_off": cut}

    async def _drain_clients(self, which: Callable[[Any], bool], timeout: float) -> int:
        """End `which` clients as each gets between transactions (looked at by the engine at
        the end of each reply, and here for those that stay silent); those still in one
        after `timeout` are ended anyway. Returns how many were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reason = "the proxy is shutting down"
        for client in [c for c in self.runtime.clients if which(c)]:
            client.runtime.draining = client.watched = True
        while True:
            left = [c for c in self.runtime.clients if which(c)]
            for client in left:
                client.leave_if_between_transactions()
            left = [c for c in left if c in self.runtime.clients]
            if not left:
                return 0
            if loop.time() >= deadline:
                for client in left:
                    client.shut_down(reason)
                return len(left)
            await asyncio.sleep(DRAIN_INTERVAL)

    async def _drain_listener(self, listener: Listener, route: ReplicaRoute | None) -> None:
        """A listener a reload removed: its clients end between transactions; then the
        pools of its route, if it had one of its own."""
        timeout = self.shutdown_timeout
        cut = await self._drain_clients(lambda c: c.runtime is listener.runtime, timeout)
        if route is not None:
            route.close_all()
        log.info(
            "proxy %s: listener %s drained (%d clients cut off mid-transaction)",
            self.config.name,
            listener.name or "listen",
            cut,
        )

    async def stop(self) -> None:
        """Stop at once: every client is told the proxy shuts down, whatever it does."""
        if self._janitor is not None:
            self._janitor.cancel()
        self.targets.stop()
        for task in self._drains:
            task.cancel()
        for listener in self.listeners:
            assert listener.server is not None
            listener.server.close()
        for client in list(self.runtime.clients):
            client.shut_down("the proxy is shutting down")
        for pools in self.pool_sets:
            pools.close_all()
        for route in self.routes.values():
            route.close_all()
        for listener in self.listeners:
            assert listener.server is not None
            await listener.server.wait_closed()


class Process:
    """Every proxy of a config file, the shared metrics registry, and the admin listener."""

    def __init__(
        self,
        config: Config,
        path: Path | None = None,
        *,
        worker: int = 0,
        peers: Peers | None = None,
        shares: ShareFactory | None = None,
    ) -> None:
        """`worker`, `peers`, `shares`: one of several worker processes (dbmux.workers),
        whose supervisor serves the admin API."""
        self.config = config
        self.path = path  # the config file SIGHUP and reload() read again
        self.worker = worker
        self.peers = peers
        self.shares = shares
        self.registry = Registry()
        self._drains: set[asyncio.Task[Any]] = set()  # of proxies a reload removed
        self._reloading = asyncio.Lock()  # one reload at a time (SIGHUP, the admin API)
        self.proxies = [self._new_proxy(p) for p in config.proxies]
        self.admin = AdminListener(self, lambda token: AdminApi(self, token)) if not peers else None

    def _new_proxy(self, config: ProxyConfig) -> Proxy:
        proxy = Proxy(
            config,
            registry=self.registry,
            base_dir=self.config.base_dir,
            state_dir=self.config.state_path,
            secrets=self.config.secrets,
            worker=self.worker,
            peers=self.peers,
            shares=self.shares,
        )
        proxy.shutdown_timeout = self.config.shutdown_timeout
        return proxy

    def proxy(self, name: str) -> Proxy:
        """The running proxy `name`; KeyError if there is none."""
        for proxy in self.proxies:
            if proxy.config.name == name:
                return proxy
        raise KeyError(f"no proxy named {name!r}")

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin API listens (the port chosen, for admin.listen port 0)."""
        return self.admin.address if self.admin is not None else None

    def describe(self) -> str:
        return f"{len(self.proxies)} proxies"

    async def start(self) -> None:
        for proxy in self.proxies:
            await proxy.start()
        if self.admin is None:
            return
        try:
            await self.admin.start()
        except Exception:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        for proxy in self.proxies:
            await proxy.stop()

    async def drain(self, timeout: float | None = None) -> dict[str, Any]:
        """Drain every proxy at once (SIGTERM), for up to `timeout` seconds (default:
        shutdown_timeout)."""
        limit = self.config.shutdown_timeout if timeout is None else timeout
        results = await asyncio.gather(*(p.drain(limit) for p in self.proxies))
        await asyncio.gather(*self._drains, return_exceptions=True)  # proxies a reload removed
        return {"proxies": list(results)}

    async def reload(
        self, path: Path | None = None, config: Config | None = None
    ) -> dict[str, Any]:
        """Read the config file again (or take `config`, read by the supervisor) and apply it
        without dropping clients (SIGHUP, the admin API). A file that cannot be used is
        refused, naming why, and the running configuration stays: `{"status": "refused",
        "reason": ...}`. Otherwise `{"status": "applied", "added": [...], "removed": [...],
        "rebuilt": [...], "changed": {proxy: [setting, ...]}}`."""
        path = path or self.path
        try:
            if path is None and config is None:
                raise ConfigError("this process was not started from a config file")
            async with self._reloading:
                if config is None:
                    assert path is not None
                    config = await asyncio.to_thread(load_config, path)
                return await self._apply(config)
        except RELOAD_ERRORS as error:
            reason = str(error)
        except Exception as error:  # a bug must cost the reload only, and say so
            log.exception("reload failed unexpectedly")
            reason = f"internal error: {error}"
        return refused(reason)

    async def _apply(self, config: Config) -> dict[str, Any]:
        running = {p.config.name: p for p in self.proxies}
        wanted = {p.name: p for p in config.proxies}
        gone = [p for n, p in running.items() if n not in wanted]
        rebuilt = [p for n, p in running.items() if n in wanted and p.rebuilt_by(wanted[n])]
        kept = [p for p in running.values() if p not in gone and p not in rebuilt]
        old_config, self.config = self.config, config  # new proxies are built with it
        started: list[Proxy] = []
        updates: list[tuple[Proxy, ProxyUpdate]] = []
        try:
            for proxy in kept:
                update = await proxy.prepare(wanted[proxy.config.name], config.secrets)
                updates.append((proxy, update))
            for name, proxy_config in wanted.items():
                if name not in running or running[name] in rebuilt:
                    proxy = self._new_proxy(proxy_config)
                    await proxy.start()
                    started.append(proxy)
        except BaseException:
            self.config = old_config
            for proxy, update in updates:
                proxy.discard(update)
            for proxy in started:
                await proxy.stop()
            raise
        changed = {}
        for proxy, update in updates:
            proxy.shutdown_timeout = config.shutdown_timeout
            settings = proxy.apply(update, config.secrets)
            if settings:
                changed[proxy.config.name] = settings
        for proxy in gone + rebuilt:
            task = asyncio.get_running_loop().create_task(proxy.drain(config.shutdown_timeout))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        if config.state_dir != old_config.state_dir:
            log.warning("state_dir changed: it applies at the next start")
        order = [p.name for p in config.proxies]
        self.proxies = sorted(kept + started, key=lambda p: order.index(p.config.name))
        result = {
            "status": "applied",
            "added": [p.config.name for p in started if p.config.name not in running],
            "removed": [p.config.name for p in gone],
            "rebuilt": [p.config.name for p in rebuilt],
            "changed": changed,
        }
        log.info("configuration reloaded: %s", result)
        return result
