"""A running proxy: its listeners, pools, janitor and shutdown; and the process running them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from dbmux.admin.listener import AdminListener
from dbmux.auth.admission import Admission, LoginThrottle
from dbmux.auth.directory import UserDirectory
from dbmux.auth.mysql import load_public_key
from dbmux.auth.secrets import Credentials
from dbmux.auth.tls import ClientSideTls, TargetSideTls, TlsError
from dbmux.auth.tokens import TokenVerifier
from dbmux.config import (
    Config,
    Endpoint,
    ProxyConfig,
    SecretsConfig,
    Target,
    TargetGroupConfig,
    TargetRole,
    TlsMode,
)
from dbmux.engines import engine_class
from dbmux.engines.base import (
    Clock,
    ErrorKind,
    PoolKey,
    ProbeResult,
    ProxyRuntime,
    ServerConnection,
    ServerError,
    TargetSecurity,
)
from dbmux.metrics import ProxyMetrics, Registry
from dbmux.pool import Opener, PoolSet, TargetBudget
from dbmux.replicas import ReplicaRoute
from dbmux.session import ClientSession
from dbmux.targets import Instance, TargetGroup

log = logging.getLogger("dbmux.proxy")

JANITOR_INTERVAL = 1.0

_T = TypeVar("_T")


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
    ) -> None:
        self.config = config
        self.engine = engine_class(config.engine_family)(
            target_security(config.target_group, base_dir)
        )
        self.registry = registry
        self.metrics = ProxyMetrics(registry, config.name, timed=config.latency_histograms)
        self.users = UserDirectory.from_config(config.auth, secrets or SecretsConfig(), base_dir)
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
        self.pools = PoolSet(self._writer_opener(read_only=False), self.metrics, self._budget())
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
        )
        self.servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []  # the proxy's listen, then its endpoints'
        self.endpoint_addresses: dict[str, tuple[str, int]] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._register_gauges()

    @property
    def pool_sets(self) -> list[PoolSet]:
        """Every PoolSet: the writer's, and each read-only endpoint's replicas' and fallback."""
        sets = [self.pools]
        for route in self.routes.values():
            sets += route.sets.values()
            if route.fallback is not None:
                sets.append(route.fallback)
        return sets

    @property
    def _budgets(self) -> list[TargetBudget]:
        return list({id(s.budget): s.budget for s in self.pool_sets}.values())

    def _register_gauges(self) -> None:
        """The gauges read at scrape time, from the pools and clients themselves."""
        m, proxy, clients = self.metrics, self.config.name, self.runtime.clients

        def lent() -> int:
            return sum(len(p.lent) for b in self._budgets for p in b.pools)

        def longest_wait() -> float:
            pools = [p for b in self._budgets for p in b.pools if p.waiters]
            return max((p.loop.time() - p.waiters[0][0] + p.timeout for p in pools), default=0.0)

        def prepared() -> int:
            pools = [p for b in self._budgets for p in b.pools]
            return sum(len(c.prepared) for p in pools for c in (*p.idle, *p.lent))

        m.database_connections.observe_with(lambda: sum(b.open for b in self._budgets), proxy=proxy)
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
        session_init = self._session_init(read_only)

        async def open_to_writer(key: PoolKey, read_limit: bool) -> ServerConnection:
            return await self._open(key, read_limit, session_init)

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
        session_init = self._session_init(read_only=True)

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
                    session_init=session_init,
                    read_limit=read_limit,
                ),
            )
            conn.generation = generation
            return conn

        pools = PoolSet(open_to_replica, self.metrics, self._budget(), follows_writer=False)
        return pools

    def _budget(self) -> TargetBudget:
        """A budget for one target; trouble with its connections probes the targets."""
        return TargetBudget(self.pool_config, self.targets.suspect)

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

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listens = [(self.config.listen, self.engine.serve(self.runtime))]
        for endpoint in self.config.endpoints:
            # Its own metrics (the endpoint label), and a read-only one its own pools.
            metrics = ProxyMetrics(
                self.registry, self.config.name, endpoint.name, timed=self.metrics.timed
            )
            pools = self.routes.get(endpoint.name, self.runtime.pools)
            runtime = dataclasses.replace(self.runtime, pools=pools, metrics=metrics)
            listens.append((endpoint.listen, self.engine.serve(runtime)))
        for address, factory in listens:
            server = await loop.create_server(
                factory, address.host, address.port, reuse_address=True, backlog=4096
            )
            self.servers.append(server)
            self.addresses.append(server.sockets[0].getsockname()[:2])
        names = [e.name for e in self.config.endpoints]
        self.endpoint_addresses = dict(zip(names, self.addresses[1:], strict=True))
        self._janitor = loop.create_task(self._run_janitor())
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

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        self.targets.stop()
        for server in self.servers:
            server.close()
        for client in list(self.runtime.clients):
            client.expire("the proxy is shutting down")
        for pools in self.pool_sets:
            pools.close_all()
        for route in self.routes.values():
            route.close_all()
        for server in self.servers:
            await server.wait_closed()


class Process:
    """Every proxy of a config file, the shared metrics registry, and the admin listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = Registry()
        self.proxies = [
            Proxy(
                p,
                registry=self.registry,
                base_dir=config.base_dir,
                state_dir=config.state_path,
                secrets=config.secrets,
            )
            for p in config.proxies
        ]
        self.admin = AdminListener(self)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin API listens (the port chosen, for admin.listen port 0)."""
        return self.admin.address

    async def start(self) -> None:
        for proxy in self.proxies:
            await proxy.start()
        try:
            await self.admin.start()
        except Exception:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.admin.stop()
        for proxy in self.proxies:
            await proxy.stop()
